"""Hostile input against a real server: random and malformed requests at every RPC.

Hypothesis builds requests for every IpamService method from the proto's own descriptors
(random strings, huge fields, out-of-range numbers and enum values, wrong families, big maps),
sends raw random bytes and messages with invalid UTF-8 in string fields, and garbage
credentials. The only answers allowed are clean status codes; afterwards the server is still
SERVING and ``dsipam fsck`` is clean for every pool.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, V4, V6, pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess, scratch_database, spawn_server
from test_auth import md, new_token, write_config

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["IpamService"]
METHODS = list(SERVICE.methods)
# Answers that say "your request" or "the state" — never "the server broke".
CLEAN = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
}
POOLS = ("hostile", "hostile4", "hostile6")
STRINGS = (
    *POOLS, "", "-", "a", "A" * 64, "x" * 300, "c1/eth0", "node-1", "198.18.10.7", "198.18.10.0/24", "198.18.10.0/28",
    "198.18.11.0/24", "fd00:10::7", "fd00:10::/120", "fd00:10::/64", "::", "::/0", "0.0.0.0/0", "0.0.0.0",
    "255.255.255.255", "198.18.10.300", "fd00:10::/129", "198.18.10.7/33", "1.2.3.4", "::ffff:198.18.10.7",
    "fe80::1%eth0", "labels", "cooldown", "pool.labels", "\x00", "ü/ß", "\u202e", "😀" * 10, " ", "%s%n",
    "'; DROP TABLE ipam_pools; --", "eyJhIjogMX0=", "e30=", "AAAA",
)
HUGE = ("h" * 70_000, "ü" * 20_000)
_OWNERS = st.one_of(st.sampled_from(["c0/eth0", "c1/eth0", "c4/eth0", "new/eth0", "other/net1"]),
                    st.from_regex(r"[!-~]{1,24}", fullmatch=True))
_ADDRESSES = st.sampled_from(["198.18.10.1", "198.18.10.77", "198.18.10.255", "198.18.11.9", "198.18.12.5",
                              "fd00:10::5", "fd00:10::ff", "fd00:11::7", "fd00:12::9", "198.18.10.0/30", "fd00:10::/126"])
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    # Values that get past validation often, so that random requests reach the store, not only the checks.
    "pool": st.sampled_from([*POOLS, "hostile-new"]),
    "name": st.sampled_from([*POOLS, "hostile-new", "hostile-x"]),
    "owner": _OWNERS,
    "valid_owners": _OWNERS,
    "cidr": st.sampled_from(["198.18.10.0/24", "198.18.12.0/24", "198.18.13.0/28", "fd00:10::/120", "fd00:12::/120",
                             "fd00:13::/124", "198.18.11.0/25"]),
    "first": _ADDRESSES, "last": _ADDRESSES, "gateway": _ADDRESSES, "exclude": _ADDRESSES, "addresses": _ADDRESSES,
    "node": st.sampled_from(["node-1", "node-2", ""]),
    "paths": st.sampled_from(["labels", "cooldown", "bogus", "pool.labels"]),
    "page_size": st.sampled_from([0, 1, 2, 1000, 1001, -1]),
    "batch_size": st.sampled_from([0, 1, 2, 100, 100_000, -1]),
    "block_size": st.sampled_from([0, 1, 3, 4, 16, 64, 256, 2**31]),
    "seconds": st.sampled_from([0, 1, 30, 86_400, -1, 2**40]),
    "nanos": st.sampled_from([0, 5, -5, 999_999_999, 10**9]),
}


def _field_value(f: FieldDescriptor, depth: int) -> st.SearchStrategy:
    generic = _generic_value(f, depth)
    plausible = PLAUSIBLE.get(f.name)
    if plausible is None or f.type == FieldDescriptor.TYPE_MESSAGE:
        return generic
    return _mostly(plausible, generic)


def _mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times in five: random requests should often get past validation into the store."""
    return st.sampled_from((usual, usual, usual, usual, rare)).flatmap(lambda chosen: chosen)


def _generic_value(f: FieldDescriptor, depth: int) -> st.SearchStrategy:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(STRINGS), st.text(max_size=40), st.sampled_from(HUGE) if depth == 0
                         else st.nothing())
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return _mostly(st.sampled_from([v.number for v in f.enum_type.values]),
                       st.one_of(st.integers(-3, 50), st.sampled_from([2**31 - 1, -(2**31)])))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.sampled_from([0, 1, -1, 100, 1000, 1001, 2**31 - 1, -(2**31)]),
                         st.integers(-(2**31), 2**31 - 1))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from([0, 1, 2, 3, 64, 65, 4096, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from([0, 1, -1, 59, 86400, 2**63 - 1, -(2**63), 315_576_000_001]),
                         st.integers(-(2**63), 2**63 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(f.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def message_strategy(desc, depth: int = 0) -> st.SearchStrategy:  # type: ignore[no-untyped-def]
    """Random instances of any message type, built from its descriptor."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy] = {}
    always: dict[str, st.SearchStrategy] = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            small = st.dictionaries(_field_value(key_f, depth + 1), _field_value(value_f, depth + 1), max_size=4)
            big = st.integers(60, 80).map(lambda n: {f"k{i}": "v" for i in range(n)})
            fields[f.name] = _mostly(small, big)
        elif f.is_repeated:
            fields[f.name] = _mostly(st.lists(_field_value(f, depth), max_size=2),
                                     st.lists(_field_value(f, depth), max_size=6))
        elif f.name in PLAUSIBLE:  # names, owners, CIDRs: nearly every request needs them
            always[f.name] = _field_value(f, depth)
        else:
            fields[f.name] = _field_value(f, depth)

    def build(values: dict) -> object:  # type: ignore[type-arg]
        msg = cls()
        for name, value in values.items():
            f = desc.fields_by_name[name]
            target = getattr(msg, name) if f.is_repeated or f.type == FieldDescriptor.TYPE_MESSAGE else None
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    if f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif f.is_repeated and f.type == FieldDescriptor.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            elif f.is_repeated:
                target.extend(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries(always, optional=fields).map(build)


@pytest.fixture(scope="module")
def admin() -> tuple[str, str]:
    """An admin token and its auth config entry."""
    return new_token("admin")


@pytest.fixture(scope="module")
def admin_token(admin) -> str:
    return admin[0]


BASE_POOLS = {
    "hostile": ("198.18.10.0/24", "fd00:10::/120"),
    "hostile4": ("198.18.11.0/24",),
    "hostile6": ("fd00:11::/120",),
}


def ensure_pools(channel: grpc.Channel, admin_token: str) -> None:
    """(Re)creates the base pools that random DeletePool calls may have deleted, and a few allocations."""
    stub = ipam_pb2_grpc.IpamServiceStub(channel)
    auth = md(admin_token)
    have = {p.name for p in stub.ListPools(pb.ListPoolsRequest(page_size=1000), metadata=auth, timeout=10).pools}
    for name, ranges in BASE_POOLS.items():
        if name in have:
            continue
        stub.CreatePool(pool(name, *ranges), metadata=auth, timeout=10)
        if name == "hostile":
            for i in range(5):
                stub.Allocate(pb.AllocateRequest(pool="hostile", owner=f"c{i}/eth0", ip_family_policy=REQUIRE,
                                                 attributes={"k8s.pod": f"p{i}"}), metadata=auth, timeout=10)


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, admin) -> Iterator[tuple[ServerProcess, str]]:
    """A server with authentication on its own database, holding three pools with allocations."""
    tmp = tmp_path_factory.mktemp("hostile")
    admin_token = admin[0]
    config = write_config(tmp / "auth.yaml", {"admin": admin})
    with scratch_database("dsipam_hostile") as url:
        server = spawn_server(url, tmp, extra_env={"DSIPAM_AUTH_CONFIG": str(config)})
        try:
            with grpc.insecure_channel(server.target) as ch:
                ensure_pools(ch, admin_token)
            yield server, url
        finally:
            server.terminate()


def call_raw(channel: grpc.Channel, method, payload: bytes, metadata) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Sends ``payload`` as the request bytes of ``method``; returns the final status code."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.server_streaming:
            responses = channel.unary_stream(path)(payload, metadata=metadata, timeout=10)
            for _ in responses:
                break  # a watch streams forever: one answer is enough
            responses.cancel()
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        assert err.code() in CLEAN, (method.name, err.code(), err.details(), payload[:200])
        assert "Traceback" not in (err.details() or "") and "Exception" not in (err.details() or ""), err.details()
        return err.code()
    return grpc.StatusCode.OK


def _wire_string(number: int, raw: bytes) -> bytes:
    """A length-delimited field ``number`` holding ``raw`` (not necessarily UTF-8)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(raw)) + raw


_SETTINGS = settings(max_examples=200, deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def channel(hostile_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile_server[0].target,
                               options=[("grpc.max_send_message_length", 16 << 20)]) as ch:
        yield ch


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_invalid_utf8_in_every_string_field_is_invalid_argument(channel, admin_token, method):
    """Each string field (and each map's keys and values) set to bytes that are not UTF-8."""
    bad = b"\xff\xfe\xc3\x28"
    cases = []
    for f in method.input_type.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            cases.append(_wire_string(f.number, bad))
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            cases.append(_wire_string(f.number, _wire_string(1, bad) + _wire_string(2, b"v")))
            cases.append(_wire_string(f.number, _wire_string(1, b"k") + _wire_string(2, bad)))
        elif f.message_type is not None and f.message_type.full_name.startswith("dsipam."):
            for sub in f.message_type.fields:
                if sub.type == FieldDescriptor.TYPE_STRING:
                    cases.append(_wire_string(f.number, _wire_string(sub.number, bad)))
    if not cases:
        pytest.skip(f"{method.name} has no string fields")
    for payload in cases:
        assert call_raw(channel, method, payload, md(admin_token)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.AllocateRequest(pool="hostile", owner="o" * 400_000), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile", owner="o", attributes={f"k{i}": "v" for i in range(65)}),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile", owner="o", attributes={"k": "v" * 1025}), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile", owner="o", attributes={"k" * 254: "v"}), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile4", owner="o", ip_families=[V6]), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.AllocateRequest(pool="hostile6", owner="o", ip_family_policy=REQUIRE), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.AllocateRequest(pool="hostile", owner="o", ip_families=[V4], addresses=["fd00:10::9"]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile", owner="o", addresses=["198.18.11.9"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AllocateRequest(pool="hostile", owner="o", ip_families=[V4, V4]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListAllocationsRequest(pool="hostile", page_size=1001), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListAllocationsRequest(pool="hostile", page_size=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListAllocationsRequest(pool="hostile", page_token="not-a-token"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListPoolsRequest(page_size=2**31 - 1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GarbageCollectRequest(pool="hostile", valid_owners=["x" * 300]), grpc.StatusCode.INVALID_ARGUMENT),
        # An error message that echoes a 10,000-character value (finding 7: it was RESOURCE_EXHAUSTED
        # "received metadata size exceeds hard limit" at the client).
        (pb.AllocateRequest(pool="hostile", owner="o", addresses=["1" * 10_000]), grpc.StatusCode.INVALID_ARGUMENT),
        # A grace past PostgreSQL's timestamp range (found by the fuzzer above: it was INTERNAL).
        (pb.GarbageCollectRequest(pool="hostile", grace=duration_pb2.Duration(seconds=2**40)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=lambda v: "" if isinstance(v, grpc.StatusCode) else type(v).__name__,
)
def test_limits_are_invalid_argument(channel, admin_token, request_, code):
    method = next(m for m in METHODS if m.input_type.name == type(request_).DESCRIPTOR.name)
    assert call_raw(channel, method, request_.SerializeToString(), md(admin_token)) == code


def test_a_message_over_the_size_limit_is_refused_before_parsing(channel, admin_token):
    """Past DSIPAM_MAX_MESSAGE_BYTES (512 KiB) gRPC's C-core refuses the message from its length
    prefix, naming the limit, before it is buffered (the old 4x margin is gone)."""
    method = SERVICE.methods_by_name["Allocate"]
    for n in (600, 5000, 15000):  # about 0.6, 5 and 15 MB (the old hard cap was 16 MiB)
        huge = pb.AllocateRequest(pool="hostile", owner="o", addresses=["x" * 1000] * n)
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/{SERVICE.full_name}/Allocate")(huge.SerializeToString(), metadata=md(admin_token),
                                                                  timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (n, err.value)
        assert str(512 * 1024) in err.value.details(), err.value.details()
    assert call_raw(channel, method, pb.AllocateRequest(pool="hostile", owner="o", addresses=["x" * 1000] * 400)
                    .SerializeToString(), md(admin_token)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(600)
@_SETTINGS
@given(data=st.data())
def test_random_requests_get_clean_answers(channel, admin_token, data):
    ensure_pools(channel, admin_token)
    method = data.draw(st.sampled_from(METHODS), label="method")
    request = data.draw(message_strategy(method.input_type), label="request")
    call_raw(channel, method, request.SerializeToString(), md(admin_token))


@pytest.mark.timeout(600)
@_SETTINGS
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=512),
       credentials=st.sampled_from(["admin", "none", "garbage", "basic", "huge"]))
def test_random_bytes_and_credentials_get_clean_answers(channel, admin_token, method, payload, credentials):
    metadata = {
        "admin": md(admin_token), "none": (), "garbage": md("dsipam_garbage"),
        "basic": (("authorization", "Basic Zm9vOmJhcg=="),), "huge": md("t" * 6000),
    }[credentials]
    code = call_raw(channel, method, payload, metadata)
    if credentials != "admin":
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_server_survives_and_fsck_is_clean(hostile_server, channel, admin_token):
    """Runs last in this module: after everything above, the server serves and every pool is consistent."""
    server, url = hostile_server
    assert server.proc.poll() is None, server.log()
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    names, token = [], ""
    stub = ipam_pb2_grpc.IpamServiceStub(channel)
    while True:
        resp = stub.ListPools(pb.ListPoolsRequest(page_size=1000, page_token=token), metadata=md(admin_token))
        names += [p.name for p in resp.pools]
        token = resp.next_page_token
        if not token:
            break
    assert "hostile" in names or "hostile4" in names or len(names) >= 1
    for name in names:
        out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", url],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "clean" in out.stdout, (name, out.stdout, out.stderr)
    assert "Traceback" not in server.log(), server.log()[-3000:]
