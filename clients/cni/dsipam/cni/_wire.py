"""Protocol-buffer wire codec for the few dsipam.v1 messages the plugin sends and reads.

Hand-written so that a plugin run does not import protobuf (tens of milliseconds per pod).
The field numbers mirror proto/dsipam/v1/ipam.proto; tests/e2e/test_cni_wire.py checks every
one of them against the generated descriptors and round-trips through ipam_pb2.
"""

IPV4 = 1  # dsipam.v1.IpFamily
IPV6 = 2
FAMILY_VERSION = {IPV4: 4, IPV6: 6}

SINGLE_STACK = 1  # dsipam.v1.IpFamilyPolicy
PREFER_DUAL_STACK = 2
REQUIRE_DUAL_STACK = 3


_MAX_FIELD = (1 << 31) - 1  # the largest field number protobuf's Go decoder takes (MessageSet's)


class WireError(ValueError):
    """Bytes that do not parse as the expected message."""


# -- encoding ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _string(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode("utf-8")) if text else b""


def _uint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _packed(number: int, values: list[int]) -> bytes:
    return _bytes_field(number, b"".join(_varint(v) for v in values)) if values else b""


def _map(number: int, values: dict[str, str]) -> bytes:
    return b"".join(_bytes_field(number, _string(1, k) + _string(2, v)) for k, v in values.items())


def allocate_request(pool: str, owner: str, policy: int, families: list[int], addresses: list[str],
                     attributes: dict[str, str], node: str = "") -> bytes:
    """dsipam.v1.AllocateRequest."""
    return (_string(1, pool) + _string(2, owner) + _uint(3, policy) + _packed(4, families)
            + b"".join(_bytes_field(5, a.encode()) for a in addresses) + _map(6, attributes) + _string(7, node))


def release_request(pool: str, owner: str) -> bytes:
    """dsipam.v1.ReleaseRequest (every family)."""
    return _string(1, pool) + _string(2, owner)


def get_allocation_request(pool: str, owner: str) -> bytes:
    """dsipam.v1.GetAllocationRequest."""
    return _string(1, pool) + _string(2, owner)


def get_pool_request(name: str) -> bytes:
    """dsipam.v1.GetPoolRequest."""
    return _string(1, name)


def duration(seconds_float: float) -> tuple[int, int]:
    """(seconds, nanos) of a google.protobuf.Duration: the fraction rounded half to even, and a
    rounding up to 1e9 ns carried into the seconds (0.9999999996 is 1 s)."""
    seconds = int(seconds_float)
    nanos = int(round((seconds_float - seconds) * 1e9))
    if nanos == 1_000_000_000:
        seconds, nanos = seconds + 1, 0
    return seconds, nanos


def garbage_collect_request(pool: str, valid_owners: list[str], grace: float | None, node: str = "",
                            attribute_selector: dict[str, str] | None = None) -> bytes:
    """dsipam.v1.GarbageCollectRequest; ``grace`` None leaves the server's default."""
    out = _string(1, pool) + b"".join(_bytes_field(2, o.encode()) for o in valid_owners)
    if grace is not None:
        seconds, nanos = duration(grace)
        out += _bytes_field(3, _uint(1, seconds) + _uint(2, nanos))  # google.protobuf.Duration
    return out + _string(4, node) + _map(5, attribute_selector or {})


# -- decoding ----------------------------------------------------------------------------


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at ``i`` and the index after it: at most 10 bytes and below 2^64, as protobuf's
    Go decoder takes them (checked as it goes: a long run of 0xff costs no more than 10 bytes)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")
    if value >= 1 << 64:
        raise WireError("varint past 64 bits")
    return value, i


def parse(data: bytes) -> dict[int, list]:
    """Splits a message into {field number: [values]}: ints for varints, bytes otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("a varint where a message belongs")
    fields: dict[int, list] = {}
    i = 0
    end = len(data)
    try:
        while i < end:
            key, i = _read_varint(data, i)
            kind = key & 7
            if not 1 <= key >> 3 <= _MAX_FIELD:
                raise WireError(f"field number {key >> 3} out of range")
            value: int | bytes
            if kind == 0:
                value, i = _read_varint(data, i)
            elif kind == 2:
                n, i = _read_varint(data, i)
                if i + n > end:
                    raise WireError("truncated length-delimited field")
                value = data[i : i + n]
                i += n
            elif kind == 1:
                value = data[i : i + 8]
                i += 8
            elif kind == 5:
                value = data[i : i + 4]
                i += 4
            else:
                raise WireError(f"unsupported wire type {kind}")
            fields.setdefault(key >> 3, []).append(value)
    except IndexError:
        raise WireError("truncated message") from None
    if i != end:
        raise WireError("truncated message")
    return fields


def _values(fields: dict[int, list], number: int, kind: type | tuple[type, ...]) -> list:
    """A field's values, each of the wire type the message has there (else the answer does not parse)."""
    values = fields.get(number, [])
    for value in values:
        if not isinstance(value, kind):
            raise WireError(f"field {number} of the wrong wire type")
    return values


def _text(fields: dict[int, list], number: int) -> str:
    values = _values(fields, number, (bytes, memoryview))
    return bytes(values[-1]).decode("utf-8") if values else ""


def _int(fields: dict[int, list], number: int) -> int:
    values = _values(fields, number, int)
    return values[-1] if values else 0


def _decode_map(fields: dict[int, list], number: int) -> dict[str, str]:
    out = {}
    for entry in fields.get(number, ()):
        f = parse(entry)
        out[_text(f, 1)] = _text(f, 2)
    return out


class Address:
    """dsipam.v1.Address: ``version`` is 4 or 6."""

    __slots__ = ("version", "ip", "prefix_length", "gateway")

    def __init__(self, version: int, ip: str, prefix_length: int, gateway: str) -> None:
        self.version = version
        self.ip = ip
        self.prefix_length = prefix_length
        self.gateway = gateway

    def __repr__(self) -> str:
        return f"Address({self.ip}/{self.prefix_length} gw={self.gateway or '-'})"


class Allocation:
    """dsipam.v1.Allocation; ``create_time`` in seconds since the epoch."""

    __slots__ = ("pool", "owner", "addresses", "attributes", "create_time", "node")

    def __init__(self, pool: str, owner: str, addresses: list[Address], attributes: dict[str, str],
                 create_time: float, node: str = "") -> None:
        self.pool = pool
        self.owner = owner
        self.addresses = addresses
        self.attributes = attributes
        self.create_time = create_time
        self.node = node

    def __repr__(self) -> str:
        return f"Allocation({self.pool}/{self.owner} {self.addresses})"


class FamilyUsage:
    """dsipam.v1.FamilyUsage: ``version`` is 4 or 6."""

    __slots__ = ("version", "size", "allocated", "free")

    def __init__(self, version: int, size: int, allocated: int, free: int) -> None:
        self.version = version
        self.size = size
        self.allocated = allocated
        self.free = free


def address(data: bytes) -> Address:
    """Decodes dsipam.v1.Address."""
    f = parse(data)
    return Address(FAMILY_VERSION.get(_int(f, 1), 0), _text(f, 2), _int(f, 3), _text(f, 4))


def allocation(data: bytes) -> Allocation:
    """Decodes dsipam.v1.Allocation."""
    f = parse(data)
    created = 0.0
    if 5 in f:
        ts = parse(_values(f, 5, (bytes, memoryview))[-1])
        created = _int(ts, 1) + _int(ts, 2) / 1e9
    return Allocation(_text(f, 1), _text(f, 2), [address(a) for a in f.get(3, ())], _decode_map(f, 4), created,
                      _text(f, 6))


def allocate_response(data: bytes) -> tuple[Allocation, bool]:
    """Decodes dsipam.v1.AllocateResponse into (allocation, created)."""
    f = parse(data)
    return allocation(_values(f, 1, (bytes, memoryview))[-1] if 1 in f else b""), bool(_int(f, 2))


def release_response(data: bytes) -> list[Address]:
    """Decodes dsipam.v1.ReleaseResponse into the released addresses."""
    return [address(a) for a in parse(data).get(1, ())]


def pool_usage(data: bytes) -> list[FamilyUsage]:
    """Decodes the usage of a dsipam.v1.Pool, in the pool's family order."""
    out = []
    for entry in parse(data).get(4, ()):
        u = parse(entry)
        out.append(FamilyUsage(FAMILY_VERSION.get(_int(u, 1), 0), _int(u, 2), _int(u, 3), _int(u, 4)))
    return out


def garbage_collect_response(data: bytes) -> list[Allocation]:
    """Decodes dsipam.v1.GarbageCollectResponse into the released allocations."""
    return [allocation(a) for a in parse(data).get(1, ())]


ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


def status_details(data: bytes) -> tuple[str, dict[str, str]]:
    """The google.rpc.ErrorInfo (reason, metadata) inside a google.rpc.Status, or ("", {})."""
    for detail in parse(data).get(3, ()):
        any_fields = parse(detail)
        if _text(any_fields, 1) == ERROR_INFO_TYPE:
            info = parse(any_fields.get(2, [b""])[-1])
            return _text(info, 1), _decode_map(info, 3)
    return "", {}
