"""What the sync and async clients share: the RPC table and the connection settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from dsipam.v1 import ipam_pb2 as pb

from ._channel import (
    DEFAULT_TARGET,
    Auth,
    ChannelOptions,
    TlsConfig,
    channel_options,
    normalise_target,
    resolve_tls,
)
from ._errors import InvalidArgument
from ._retry import RetryPolicy

log = logging.getLogger("dsipam.client")

SERVICE = "dsipam.v1.IpamService"
DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take, retries included, unless the client or the call says otherwise."""

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True)
class Method(Generic[Req, Resp]):
    """One RPC of IpamService (unary, or server streaming for the ``*_STREAM`` ones)."""

    name: str
    request: type[Req]
    response: type[Resp]

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"

    @property
    def deserialize(self) -> Callable[[bytes], Resp]:
        return self.response.FromString


def serialize(message: Message) -> bytes:
    return message.SerializeToString()


CREATE_POOL = Method("CreatePool", pb.CreatePoolRequest, pb.Pool)
GET_POOL = Method("GetPool", pb.GetPoolRequest, pb.Pool)
LIST_POOLS = Method("ListPools", pb.ListPoolsRequest, pb.ListPoolsResponse)
DELETE_POOL = Method("DeletePool", pb.DeletePoolRequest, pb.DeletePoolResponse)
ALLOCATE = Method("Allocate", pb.AllocateRequest, pb.AllocateResponse)
RELEASE = Method("Release", pb.ReleaseRequest, pb.ReleaseResponse)
GET_ALLOCATION = Method("GetAllocation", pb.GetAllocationRequest, pb.Allocation)
LIST_ALLOCATIONS = Method("ListAllocations", pb.ListAllocationsRequest, pb.ListAllocationsResponse)
GARBAGE_COLLECT = Method("GarbageCollect", pb.GarbageCollectRequest, pb.GarbageCollectResponse)
UPDATE_POOL = Method("UpdatePool", pb.UpdatePoolRequest, pb.Pool)
RESERVE_ADDRESSES = Method("ReserveAddresses", pb.ReserveAddressesRequest, pb.Pool)
UNRESERVE_ADDRESSES = Method("UnreserveAddresses", pb.UnreserveAddressesRequest, pb.Pool)
ADD_POOL_RANGE = Method("AddPoolRange", pb.AddPoolRangeRequest, pb.Pool)
REMOVE_POOL_RANGE = Method("RemovePoolRange", pb.RemovePoolRangeRequest, pb.Pool)
LIST_BLOCKS = Method("ListBlocks", pb.ListBlocksRequest, pb.ListBlocksResponse)
RELEASE_NODE = Method("ReleaseNode", pb.ReleaseNodeRequest, pb.ReleaseNodeResponse)
MIGRATE_POOL_STREAM = Method("MigratePool", pb.MigratePoolRequest, pb.MigratePoolResponse)
WATCH_ALLOCATIONS_STREAM = Method("WatchAllocations", pb.WatchAllocationsRequest, pb.WatchAllocationsResponse)


@dataclass(frozen=True)
class Connection:
    """Everything a client needs to open its channel and make calls."""

    target: str
    options: list[tuple[str, object]]
    tls: TlsConfig | None
    auth: Auth
    timeout: float | None
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Static metadata plus the bearer token, for one call."""
        return self.metadata + tuple(self.auth.metadata())


def connection(
    target: str | None,
    *,
    tls: TlsConfig | bool | None,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    timeout: float | None,
    retry: RetryPolicy | None,
    lb_policy: str | None,
    options: ChannelOptions | None,
    metadata: Sequence[tuple[str, str]] | Mapping[str, str] | None,
) -> Connection:
    """Validates a client's arguments (target from ``DSIPAM_TARGET`` when None)."""
    grpc_target, several = normalise_target(target or os.environ.get("DSIPAM_TARGET") or DEFAULT_TARGET)
    if timeout is not None and timeout <= 0:
        raise InvalidArgument(f"timeout: {timeout} is not positive", metadata={"field": "timeout"})
    resolved = resolve_tls(tls)
    if isinstance(metadata, Mapping):
        metadata = list(metadata.items())
    return Connection(
        target=grpc_target,
        options=channel_options(several=several, lb_policy=lb_policy, tls=resolved, extra=options),
        tls=resolved,
        auth=Auth(token=token, token_file=token_file),
        timeout=timeout,
        retry=retry or RetryPolicy(),
        metadata=tuple((k.lower(), v) for k, v in (metadata or ())),
    )


def env_settings(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Client keyword arguments from ``DSIPAM_*`` variables (the CLI's environment forms).

    ``DSIPAM_TARGET``, ``DSIPAM_TLS=1``, ``DSIPAM_CA_FILE``, ``DSIPAM_CERT_FILE``,
    ``DSIPAM_KEY_FILE``, ``DSIPAM_SERVER_NAME``, ``DSIPAM_TOKEN``, ``DSIPAM_TOKEN_FILE``,
    ``DSIPAM_TIMEOUT`` (seconds).
    """
    env = os.environ if env is None else env
    out: dict[str, object] = {}
    if env.get("DSIPAM_TARGET"):
        out["target"] = env["DSIPAM_TARGET"]
    ca, cert, key, name = (env.get(f"DSIPAM_{k}") or None for k in ("CA_FILE", "CERT_FILE", "KEY_FILE", "SERVER_NAME"))
    if ca or cert or key or name:
        out["tls"] = TlsConfig(ca_file=ca, cert_file=cert, key_file=key, server_name=name)
    elif env.get("DSIPAM_TLS", "").lower() in ("1", "true", "yes"):
        out["tls"] = True
    if env.get("DSIPAM_TOKEN"):
        out["token"] = env["DSIPAM_TOKEN"]
    if env.get("DSIPAM_TOKEN_FILE"):
        out["token_file"] = env["DSIPAM_TOKEN_FILE"]
    if env.get("DSIPAM_TIMEOUT"):
        try:
            out["timeout"] = float(env["DSIPAM_TIMEOUT"])
        except ValueError:
            raise InvalidArgument(
                f"DSIPAM_TIMEOUT: {env['DSIPAM_TIMEOUT']!r} is not a number of seconds",
                metadata={"field": "DSIPAM_TIMEOUT"},
            ) from None
    return out
