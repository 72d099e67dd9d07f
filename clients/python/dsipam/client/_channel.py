"""Connection settings shared by both clients: target, TLS, bearer tokens and channel options."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._errors import InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"
"""The target used when none is given (and ``DSIPAM_TARGET`` is unset)."""

USER_AGENT = "dsipam-python/0.1.0"

ChannelOptions = Sequence[tuple[str, Any]]
"""gRPC channel arguments, such as ``[("grpc.max_receive_message_length", 8 << 20)]``."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings, all from files (PEM).

    Attributes:
        ca_file: CA bundle that signs the server's certificate; None for the system roots.
        cert_file: client certificate for mutual TLS (needs ``key_file``).
        key_file: private key of ``cert_file``.
        server_name: the name to verify the server's certificate against when it differs from
            the target's host (for example when connecting by IP address).
    """

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files and builds the channel credentials."""
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                "tls: cert_file and key_file go together (mutual TLS needs both)", metadata={"field": "tls"}
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file"),
            private_key=_read(self.key_file, "key_file"),
            certificate_chain=_read(self.cert_file, "cert_file"),
        )


def _read(path: str | os.PathLike[str] | None, where: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{where}: cannot read {os.fspath(path)!r}: {exc.strerror}",
                              metadata={"field": where}) from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(address: str) -> str:
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0]


def normalise_target(target: str) -> tuple[str, bool]:
    """Returns the gRPC target and whether it names several addresses.

    Accepts ``host:port``, ``[v6]:port``, ``unix:///path``, any gRPC URI such as
    ``ipv4:127.0.0.1:50051,127.0.0.1:50052`` or ``dns:///ipam.example:50051``, and a plain
    comma-separated list of IP ``host:port`` addresses (made into an ``ipv4:``/``ipv6:`` URI).
    """
    target = target.strip()
    if not target:
        raise InvalidArgument("target: required (host:port or unix:///path)", metadata={"field": "target"})
    if "," not in target:
        if "://" not in target and ":" not in target and not target.startswith("unix:"):
            raise InvalidArgument(
                f"target: {target!r} has no port (expected host:port or unix:///path)", metadata={"field": "target"}
            )
        return target, target.startswith("dns:")
    scheme, sep, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6") and sep:
        return target, True
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    hosts = [_split_host(a) for a in addresses]
    if not all(_is_ip(h) for h in hosts):
        raise InvalidArgument(
            f"target: {target!r}: a list of addresses must be IP host:port pairs "
            "(use dns:///name:port for a name with several addresses)",
            metadata={"field": "target"},
        )
    versions = {ipaddress.ip_address(h).version for h in hosts}
    if len(versions) > 1:
        raise InvalidArgument(f"target: {target!r} mixes IPv4 and IPv6 addresses", metadata={"field": "target"})
    return f"ipv{versions.pop()}:{','.join(addresses)}", True


def channel_options(
    *,
    several: bool,
    lb_policy: str | None,
    tls: TlsConfig | None,
    extra: ChannelOptions | None,
) -> list[tuple[str, Any]]:
    """The channel arguments: short reconnect backoff (so retries see a restarted server soon),
    round-robin over several addresses, the TLS name override, then the caller's own."""
    options: list[tuple[str, Any]] = [
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    policy = lb_policy or ("round_robin" if several else None)
    if policy:
        options.append(("grpc.lb_policy_name", policy))
    if policy == "round_robin":
        # Client-side health checking: a replica whose health turns NOT_SERVING (draining on
        # SIGTERM, or its database unreachable) gets no new calls while the others serve.
        import json

        options.append(("grpc.service_config", json.dumps({
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": "dsipam.v1.IpamService"},
        })))
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    options.extend(extra or ())
    return options


def resolve_tls(tls: TlsConfig | bool | None) -> TlsConfig | None:
    """``True`` means TLS with the system roots; ``False``/``None`` plaintext."""
    if tls is True:
        return TlsConfig()
    if tls is False or tls is None:
        return None
    return tls


@dataclass(frozen=True)
class Auth:
    """Bearer token settings: a fixed token, or a file read before each call (so that a
    rotated token, such as a Kubernetes projected service account token, is picked up)."""

    token: str | None = None
    token_file: str | os.PathLike[str] | None = None

    def metadata(self) -> list[tuple[str, str]]:
        """The ``authorization`` metadata for one call (empty without a token)."""
        token = self.token
        if self.token_file is not None:
            raw = _read(self.token_file, "token_file")
            token = (raw or b"").decode().strip()
        if not token:
            return []
        return [("authorization", f"Bearer {token}")]
