"""dsipam over grpcio and the generated stubs: the transport for TLS (``"transport": "grpc"``).

It costs ~70 ms of imports per run, which is why cleartext endpoints use the built-in client.
"""

from __future__ import annotations

import sys
import time

from . import _h2, _wire


def _enable_site() -> None:
    """The installed launcher runs ``python -IS``; grpcio lives in site-packages."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def _read(path: str, field: str) -> bytes | None:
    if not path:
        return None
    from ._config import read_limited

    return read_limited(path, field)


_BEGIN, _END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


def _certificate_blocks(data: bytes) -> list[str]:
    """The PEM CERTIFICATE blocks of a file, as Go's pem.Decode finds them (what is around them
    is skipped, whatever its bytes)."""
    blocks = []
    start = data.find(_BEGIN)
    while start >= 0:
        stop = data.find(_END, start)
        if stop < 0:
            break
        blocks.append(data[start:stop + len(_END)].decode("ascii", "replace"))
        start = data.find(_BEGIN, stop)
    return blocks


def check_pem(tls: dict[str, str], ca: bytes | None, cert: bytes | None, key: bytes | None) -> None:
    """A CA file without a certificate, or a certificate and key that are not a pair, are the
    configuration's fault (7), as in the compiled plugin (Go's CertPool.AppendCertsFromPEM: any
    one good certificate will do; tls.X509KeyPair), not a failed handshake (11) later. OpenSSL,
    through the ssl module, does the parsing; an encrypted key is refused, never prompted for."""
    import ssl

    from ._config import _bad

    if ca is not None:
        good = 0
        for block in _certificate_blocks(ca):
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=block)
                good += 1
            except (ssl.SSLError, ValueError, TypeError):
                continue
        if not good:
            raise _bad("ipam.tls.ca", f"{tls['ca']!r} holds no PEM certificate")
    if cert is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certfile=tls["cert"], keyfile=tls["key"],
                                                                     password=b"")
        except (ssl.SSLError, OSError, ValueError, TypeError):
            raise _bad("ipam.tls.cert", f"{tls['cert']!r} and ipam.tls.key {tls['key']!r} are not a PEM "
                       "certificate and its key") from None


class GrpcClient:
    """The same calls as :class:`._client.NativeClient`, through ``grpc`` and ``dsipam.v1`` stubs."""

    def __init__(self, target: str, timeout: float, tls: dict[str, str] | None, token: str = "") -> None:
        _enable_site()
        import grpc

        from dsipam.v1 import ipam_pb2, ipam_pb2_grpc

        self._grpc = grpc
        self.pb = ipam_pb2
        self.target = target
        self.deadline = time.monotonic() + timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls is not None:
            ca = _read(tls.get("ca", ""), "ipam.tls.ca")
            key = _read(tls.get("key", ""), "ipam.tls.key")
            cert = _read(tls.get("cert", ""), "ipam.tls.cert")
            check_pem(tls, ca, cert, key)
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            options = [("grpc.ssl_target_name_override", tls["serverName"])] if tls.get("serverName") else []
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = ipam_pb2_grpc.IpamServiceStub(self.channel)

    def _call(self, method: str, request):  # type: ignore[no-untyped-def]
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _h2.RpcError(_h2.DEADLINE_EXCEEDED, f"deadline exceeded talking to {self.target}")
        try:
            return getattr(self.stub, method)(request, timeout=remaining, metadata=self.metadata)
        except self._grpc.RpcError as exc:
            reason, metadata = "", {}  # type: ignore[var-annotated]
            for item in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
                if item[0] == "grpc-status-details-bin":  # type: ignore[index]
                    try:
                        reason, metadata = _wire.status_details(item[1])  # type: ignore[index]
                    except ValueError:
                        pass
            raise _h2.RpcError(exc.code().value[0], exc.details() or "", reason, metadata) from None

    @staticmethod
    def _address(a) -> _wire.Address:  # type: ignore[no-untyped-def]
        return _wire.Address(_wire.FAMILY_VERSION.get(a.family, 0), a.ip, a.prefix_length, a.gateway)

    def _allocation(self, a) -> _wire.Allocation:  # type: ignore[no-untyped-def]
        created = a.create_time.seconds + a.create_time.nanos / 1e9
        return _wire.Allocation(a.pool, a.owner, [self._address(x) for x in a.addresses], dict(a.attributes), created,
                                a.node)

    def allocate(self, pool: str, owner: str, policy: int, families: list[int], addresses: list[str],
                 attributes: dict[str, str], node: str = "") -> _wire.Allocation:
        """Allocate: idempotent per (pool, owner); ``node`` asks for the node's affine blocks."""
        resp = self._call("Allocate", self.pb.AllocateRequest(
            pool=pool, owner=owner, ip_family_policy=policy, ip_families=families, addresses=addresses,
            attributes=attributes, node=node))
        return self._allocation(resp.allocation)

    def release(self, pool: str, owner: str) -> list[_wire.Address]:
        """Release everything the owner holds; an unknown owner releases nothing."""
        resp = self._call("Release", self.pb.ReleaseRequest(pool=pool, owner=owner))
        return [self._address(a) for a in resp.released]

    def get_allocation(self, pool: str, owner: str) -> _wire.Allocation:
        """GetAllocation; NOT_FOUND when the owner holds nothing."""
        return self._allocation(self._call("GetAllocation", self.pb.GetAllocationRequest(pool=pool, owner=owner)))

    def pool_usage(self, pool: str) -> list[_wire.FamilyUsage]:
        """GetPool's usage per family."""
        resp = self._call("GetPool", self.pb.GetPoolRequest(name=pool))
        return [_wire.FamilyUsage(_wire.FAMILY_VERSION.get(u.family, 0), u.size, u.allocated, u.free)
                for u in resp.usage]

    def garbage_collect(self, pool: str, valid_owners: list[str], grace: float | None, node: str = "",
                        selector: dict[str, str] | None = None) -> list[_wire.Allocation]:
        """GarbageCollect: releases what is not valid and older than the grace (of ``node`` and
        with attributes containing ``selector``, when given)."""
        request = self.pb.GarbageCollectRequest(pool=pool, valid_owners=valid_owners, node=node,
                                                attribute_selector=selector or {})
        if grace is not None:
            request.grace.seconds, request.grace.nanos = _wire.duration(grace)
        return [self._allocation(a) for a in self._call("GarbageCollect", request).released]

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()
