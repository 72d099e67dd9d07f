"""The dsipam calls the plugin makes, over the built-in HTTP/2 client ("native") or grpcio ("grpc").

Both transports return the plain types of :mod:`._wire` and raise :class:`._h2.RpcError`,
so the plugin does not care which one it has.
"""

import time

from . import _h2, _wire

SERVICE = "/dsipam.v1.IpamService/"


class NativeClient:
    """dsipam over one cleartext HTTP/2 connection (unix socket or TCP); stdlib C modules only."""

    def __init__(self, target: str, timeout: float, token: str = "") -> None:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = _h2.Channel(target, time.monotonic() + timeout, user_agent="dsipam-cni", metadata=metadata)

    def allocate(self, pool: str, owner: str, policy: int, families: list[int], addresses: list[str],
                 attributes: dict[str, str], node: str = "") -> _wire.Allocation:
        """Allocate: idempotent per (pool, owner); ``node`` asks for the node's affine blocks."""
        data = self.channel.call(SERVICE + "Allocate",
                                 _wire.allocate_request(pool, owner, policy, families, addresses, attributes, node))
        return _wire.allocate_response(data)[0]

    def release(self, pool: str, owner: str) -> list[_wire.Address]:
        """Release everything the owner holds; an unknown owner releases nothing."""
        return _wire.release_response(self.channel.call(SERVICE + "Release", _wire.release_request(pool, owner)))

    def get_allocation(self, pool: str, owner: str) -> _wire.Allocation:
        """GetAllocation; NOT_FOUND when the owner holds nothing."""
        return _wire.allocation(self.channel.call(SERVICE + "GetAllocation",
                                                  _wire.get_allocation_request(pool, owner)))

    def pool_usage(self, pool: str) -> list[_wire.FamilyUsage]:
        """GetPool's usage per family."""
        return _wire.pool_usage(self.channel.call(SERVICE + "GetPool", _wire.get_pool_request(pool)))

    def garbage_collect(self, pool: str, valid_owners: list[str], grace: float | None, node: str = "",
                        selector: dict[str, str] | None = None) -> list[_wire.Allocation]:
        """GarbageCollect: releases what is not valid and older than the grace (of ``node`` and
        with attributes containing ``selector``, when given)."""
        return _wire.garbage_collect_response(self.channel.call(
            SERVICE + "GarbageCollect", _wire.garbage_collect_request(pool, valid_owners, grace, node, selector)))

    def close(self) -> None:
        """Closes the connection."""
        self.channel.close()


def connect(cfg) -> NativeClient:  # type: ignore[no-untyped-def]
    """The client for a parsed :class:`._config.IpamConfig`."""
    if cfg.transport == "grpc":
        try:
            from ._grpc_client import GrpcClient

            return GrpcClient(cfg.target, cfg.timeout, cfg.tls, cfg.token)  # type: ignore[return-value]
        except ImportError as exc:
            from ._errors import INVALID_CONFIG, CniError

            raise CniError(INVALID_CONFIG, f"ipam.transport: grpc needs grpcio and dsipam.v1, which this "
                           f"interpreter cannot import ({exc})") from None
    return NativeClient(cfg.target, cfg.timeout, cfg.token)
