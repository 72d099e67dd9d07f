"""Small helpers for tests that talk to the server through the generated stubs."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dsipam.v1 import ipam_pb2 as pb

V4, V6 = pb.IP_FAMILY_IPV4, pb.IP_FAMILY_IPV6
SINGLE = pb.IP_FAMILY_POLICY_SINGLE_STACK
PREFER = pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK
REQUIRE = pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK


def pool(name: str, *ranges: pb.IpRange | str, cooldown: float | None = None, **labels: str) -> pb.CreatePoolRequest:
    """A CreatePoolRequest; ``cooldown`` in seconds (None: the server's default of 30 s)."""
    from google.protobuf import duration_pb2

    rs = [pb.IpRange(cidr=r) if isinstance(r, str) else r for r in ranges]
    p = pb.Pool(name=name, ranges=rs, labels=labels)
    if cooldown is not None:
        p.cooldown.CopyFrom(duration_pb2.Duration(seconds=int(cooldown), nanos=int((cooldown % 1) * 1e9)))
    return pb.CreatePoolRequest(pool=p)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def expect_error(call, request, code: grpc.StatusCode, reason: str | None = None, contains: str | None = None):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        call(request)
    err = exc.value
    assert err.code() == code, (err.code(), err.details())
    if reason is not None:
        assert error_info(err).reason == reason
    if contains is not None:
        assert contains in err.details(), err.details()
    return err


def ips(alloc: pb.Allocation) -> list[str]:
    return [a.ip for a in alloc.addresses]


def families(alloc: pb.Allocation) -> list[int]:
    return [a.family for a in alloc.addresses]


def next_owners(stream, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """The owners of the next ``count`` events of a WatchAllocations stream (bookmarks passed over)."""
    owners: list[str] = []
    while len(owners) < count:
        message = next(stream)
        if message.type != pb.EVENT_TYPE_BOOKMARK:
            owners.append(message.owner)
    return owners
