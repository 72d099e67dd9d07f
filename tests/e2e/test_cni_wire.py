"""The CNI plugin's own codecs, checked against independent references.

The plugin does not import protobuf, grpc or json (see docs/cni.md, "Start-up"): its
protobuf codec is checked against the generated dsipam.v1 descriptors and messages, its HPACK
Huffman table against the examples of RFC 7541 Appendix C.4, and its JSON reader against
``json``.
"""

from __future__ import annotations

import json
import os
import random

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from dsipam.cni import _hpack, _jsonio, _wire
from dsipam.v1 import ipam_pb2 as pb

# The field numbers _wire.py writes and reads, by message.
FIELDS = {
    "AllocateRequest": {"pool": 1, "owner": 2, "ip_family_policy": 3, "ip_families": 4, "addresses": 5, "attributes": 6,
                        "node": 7},
    "AllocateResponse": {"allocation": 1, "created": 2},
    "ReleaseRequest": {"pool": 1, "owner": 2},
    "ReleaseResponse": {"released": 1},
    "GetAllocationRequest": {"pool": 1, "owner": 2},
    "GetPoolRequest": {"name": 1},
    "Pool": {"usage": 4},
    "FamilyUsage": {"family": 1, "size": 2, "allocated": 3, "free": 4},
    "Address": {"family": 1, "ip": 2, "prefix_length": 3, "gateway": 4},
    "Allocation": {"pool": 1, "owner": 2, "addresses": 3, "attributes": 4, "create_time": 5, "node": 6},
    "GarbageCollectRequest": {"pool": 1, "valid_owners": 2, "grace": 3, "node": 4, "attribute_selector": 5},
    "GarbageCollectResponse": {"released": 1},
}


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_field_numbers_match_the_proto(message: str) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    for name, number in FIELDS[message].items():
        assert descriptor.fields_by_name[name].number == number, f"{message}.{name}"


def test_enum_values_match_the_proto() -> None:
    assert (_wire.IPV4, _wire.IPV6) == (pb.IP_FAMILY_IPV4, pb.IP_FAMILY_IPV6)
    assert (_wire.SINGLE_STACK, _wire.PREFER_DUAL_STACK, _wire.REQUIRE_DUAL_STACK) == (
        pb.IP_FAMILY_POLICY_SINGLE_STACK,
        pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK,
        pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK,
    )


def test_allocate_request_parses_as_the_generated_message() -> None:
    data = _wire.allocate_request(
        "pods", "c1/eth0", _wire.REQUIRE_DUAL_STACK, [_wire.IPV6, _wire.IPV4], ["198.18.0.9", "fd00::9"],
        {"cni.ifname": "eth0", "k8s.pod": "née"}, "node-7.example",
    )
    msg = pb.AllocateRequest.FromString(data)
    assert msg.pool == "pods" and msg.owner == "c1/eth0"
    assert msg.ip_family_policy == pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK
    assert list(msg.ip_families) == [pb.IP_FAMILY_IPV6, pb.IP_FAMILY_IPV4]
    assert list(msg.addresses) == ["198.18.0.9", "fd00::9"]
    assert dict(msg.attributes) == {"cni.ifname": "eth0", "k8s.pod": "née"}
    assert msg.node == "node-7.example"
    # defaults are left out, as protobuf does
    assert _wire.allocate_request("p", "o", 0, [], [], {}) == pb.AllocateRequest(pool="p", owner="o").SerializeToString()


def test_small_requests_are_byte_identical_to_protobuf() -> None:
    assert _wire.release_request("p", "c/eth0") == pb.ReleaseRequest(pool="p", owner="c/eth0").SerializeToString()
    assert _wire.get_pool_request("p") == pb.GetPoolRequest(name="p").SerializeToString()
    assert _wire.get_allocation_request("p", "o") == pb.GetAllocationRequest(pool="p", owner="o").SerializeToString()
    assert _wire.garbage_collect_request("p", ["a/eth0"], None) == pb.GarbageCollectRequest(
        pool="p", valid_owners=["a/eth0"]).SerializeToString()


@pytest.mark.parametrize("grace", [None, 0.0, 1.5, 60.0])
def test_garbage_collect_request(grace: float | None) -> None:
    selector = {"cni.node": "n1", "cni.network": "", "k": "née"}
    msg = pb.GarbageCollectRequest.FromString(
        _wire.garbage_collect_request("p", ["a/eth0", "b/eth1"], grace, "n1", selector))
    assert msg.pool == "p" and list(msg.valid_owners) == ["a/eth0", "b/eth1"]
    assert msg.node == "n1" and dict(msg.attribute_selector) == selector
    if grace is None:
        assert not msg.HasField("grace")
    else:
        assert msg.HasField("grace") and msg.grace.ToTimedelta().total_seconds() == grace


def _allocation_pb(owner: str, n: int) -> pb.Allocation:
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000 + n, nanos=250_000_000)
    return pb.Allocation(
        pool="pods", owner=owner, create_time=ts, attributes={"cni.node": f"node-{n}", "x": ""}, node=f"node-{n}",
        addresses=[
            pb.Address(family=pb.IP_FAMILY_IPV6, ip=f"fd00::{n:x}", prefix_length=120, gateway="fd00::1"),
            pb.Address(family=pb.IP_FAMILY_IPV4, ip=f"198.18.0.{n}", prefix_length=24),
        ],
    )


def test_responses_decode_from_the_generated_messages() -> None:
    alloc, created = _wire.allocate_response(
        pb.AllocateResponse(allocation=_allocation_pb("c1/eth0", 7), created=True).SerializeToString())
    assert created is True
    assert (alloc.pool, alloc.owner, alloc.attributes) == ("pods", "c1/eth0", {"cni.node": "node-7", "x": ""})
    assert alloc.node == "node-7"
    assert alloc.create_time == pytest.approx(1_700_000_007.25)
    assert [(a.version, a.ip, a.prefix_length, a.gateway) for a in alloc.addresses] == [
        (6, "fd00::7", 120, "fd00::1"), (4, "198.18.0.7", 24, "")]
    _, created = _wire.allocate_response(pb.AllocateResponse(allocation=_allocation_pb("c", 1)).SerializeToString())
    assert created is False

    released = _wire.release_response(pb.ReleaseResponse(released=_allocation_pb("c", 5).addresses).SerializeToString())
    assert [a.ip for a in released] == ["fd00::5", "198.18.0.5"]
    collected = _wire.garbage_collect_response(
        pb.GarbageCollectResponse(released=[_allocation_pb("gone/eth0", 9)]).SerializeToString())
    assert [a.owner for a in collected] == ["gone/eth0"]
    usage = _wire.pool_usage(pb.Pool(name="pods", usage=[
        pb.FamilyUsage(family=pb.IP_FAMILY_IPV4, size=254, allocated=4, free=250),
        pb.FamilyUsage(family=pb.IP_FAMILY_IPV6, size=2**64 - 1, allocated=0, free=2**64 - 1),
    ]).SerializeToString())
    assert [(u.version, u.size, u.allocated, u.free) for u in usage] == [(4, 254, 4, 250), (6, 2**64 - 1, 0, 2**64 - 1)]


def test_unknown_fields_are_skipped_and_garbage_is_refused() -> None:
    data = pb.Address(family=pb.IP_FAMILY_IPV4, ip="198.18.0.1", prefix_length=24).SerializeToString()
    extra = bytes([0x78, 0x05]) + bytes([0x82, 0x01, 0x03]) + b"abc" + bytes([0x8D, 0x01]) + b"\x00" * 4  # 15, 16, 17
    assert pb.Address.FromString(data + extra).ip == "198.18.0.1"  # protobuf's own decoder agrees
    assert _wire.address(data + extra).ip == "198.18.0.1"
    for bad in (b"\x00\x00", b"\x78" + b"\xff" * 10 + b"\x01", b"\x0b\x0c"):  # field 0, 11-byte varint, group
        with pytest.raises(_wire.WireError):
            _wire.address(data + bad)
    with pytest.raises(_wire.WireError):
        _wire.address(data[:-3])
    with pytest.raises(_wire.WireError):
        _wire.parse(b"\x0f")  # wire type 7


def test_status_details_reads_error_info() -> None:
    info = error_details_pb2.ErrorInfo(reason="POOL_EXHAUSTED", domain="dsipam.io", metadata={"pool": "p"})
    status = status_pb2.Status(code=8, message="pool: 'p' has no free IPv4 address")
    status.details.add().Pack(error_details_pb2.DebugInfo(detail="first, not ErrorInfo"))
    status.details.add().Pack(info)
    assert _wire.status_details(status.SerializeToString()) == ("POOL_EXHAUSTED", {"pool": "p"})
    assert _wire.status_details(status_pb2.Status(code=8).SerializeToString()) == ("", {})


def test_duration_encoding_is_protobufs() -> None:
    grace = pb.GarbageCollectRequest.FromString(_wire.garbage_collect_request("p", [], 2.000000001)).grace
    assert grace == duration_pb2.Duration(seconds=2, nanos=1)


# -- HPACK ---------------------------------------------------------------------------------

RFC7541_C4 = [  # RFC 7541 Appendix C.4: Huffman-coded request strings
    (b"www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
    (b"no-cache", "a8eb10649cbf"),
    (b"custom-key", "25a849e95ba97d7f"),
    (b"custom-value", "25a849e95bb8e8b4bf"),
]


@pytest.mark.parametrize(("text", "coded"), RFC7541_C4)
def test_huffman_matches_rfc7541(text: bytes, coded: str) -> None:
    assert _hpack.huffman_encode(text).hex() == coded
    assert _hpack.huffman_decode(bytes.fromhex(coded)) == text


def test_huffman_round_trips_every_byte() -> None:
    rng = random.Random(7)
    for data in (bytes(range(256)), os.urandom(300), bytes(rng.randrange(256) for _ in range(1000))):
        assert _hpack.huffman_decode(_hpack.huffman_encode(data)) == data


def test_huffman_refuses_bad_padding() -> None:
    coded = bytearray(_hpack.huffman_encode(b"no-cache"))
    coded[-1] &= 0xFE  # padding must be ones
    with pytest.raises(_hpack.HpackError):
        _hpack.huffman_decode(bytes(coded))
    with pytest.raises(_hpack.HpackError):
        _hpack.huffman_decode(_hpack.huffman_encode(b"a") + b"\xff")  # 8+ bits of padding


def test_rfc7541_c3_requests_decode_with_the_dynamic_table() -> None:
    # RFC 7541 Appendix C.3: three requests sharing one dynamic table.
    decoder = _hpack.Decoder()
    first = decoder.decode(bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"))
    assert first == [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    second = decoder.decode(bytes.fromhex("828684be58086e6f2d6361636865"))
    assert second[-1] == ("cache-control", "no-cache") and second[3] == (":authority", "www.example.com")
    third = decoder.decode(bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"))
    assert third == [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
                     (":authority", "www.example.com"), ("custom-key", "custom-value")]
    assert decoder.size == 164  # as the RFC's table after C.3.3


def test_dynamic_table_size_update_evicts() -> None:
    decoder = _hpack.Decoder()
    decoder.decode(bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572"))
    assert decoder.dynamic
    decoder.decode(bytes([0x20]))  # size 0
    assert decoder.dynamic == [] and decoder.size == 0
    with pytest.raises(_hpack.HpackError):
        decoder.decode(bytes([0x3F, 0xE2, 0x1F]))  # 4096 + 1 > announced limit
    with pytest.raises(_hpack.HpackError):
        decoder.decode(bytes([0xBE]))  # index 62, table empty


def test_request_headers_encode_and_decode() -> None:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/dsipam.v1.IpamService/Allocate"),
               (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
               ("grpc-timeout", "9999m")]
    block = _hpack.encode(headers)
    assert block[:2] == bytes([0x83, 0x86])  # indexed :method POST, :scheme http
    assert _hpack.Decoder().decode(block) == headers


# -- JSON ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"cniVersion": "1.0.0", "ipam": {"routes": [{"dst": "0.0.0.0/0"}], "n": -1.5e3, "t": true, "z": null}}',
    '  [1, "\\u00e9\\n", {}]\n', '"x"', "0",
])
def test_json_reads_what_json_reads(text: str) -> None:
    assert _jsonio.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "NaN", "[Infinity]", "[1,]", "{'a': 1}"])
def test_json_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        _jsonio.loads(text)


def test_json_writes_what_json_reads() -> None:
    value = {"cniVersion": "1.1.0", "ips": [{"address": "fd00::2/120"}], "msg": 'quote " é \u2028', "n": 3,
             "f": 0.25, "ok": True, "no": False, "none": None, "empty": {}}
    assert json.loads(_jsonio.dumps(value)) == value
