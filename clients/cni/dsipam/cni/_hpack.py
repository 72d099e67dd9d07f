"""HPACK (RFC 7541): a complete header-block decoder and the small encoder a gRPC request needs.

Only builtins are used, so that loading this module costs nearly nothing; the Huffman
decoding tables are built the first time a Huffman-coded string arrives.
"""

# RFC 7541 Appendix A. Names with their values where the table gives one.
_STATIC_NAMES = (
    ":authority :method :method :path :path :scheme :scheme :status :status :status :status :status :status "
    ":status accept-charset accept-encoding accept-language accept-ranges accept access-control-allow-origin "
    "age allow authorization cache-control content-disposition content-encoding content-language "
    "content-length content-location content-range content-type cookie date etag expect expires from host "
    "if-match if-modified-since if-none-match if-range if-unmodified-since last-modified link location "
    "max-forwards proxy-authenticate proxy-authorization range referer refresh retry-after server set-cookie "
    "strict-transport-security transfer-encoding user-agent vary via www-authenticate"
).split()
_STATIC_VALUES = {2: "GET", 3: "POST", 4: "/", 5: "/index.html", 6: "http", 7: "https", 8: "200", 9: "204",
                  10: "206", 11: "304", 12: "400", 13: "404", 14: "500", 16: "gzip, deflate"}
STATIC_TABLE: tuple[tuple[str, str], ...] = tuple(
    (name, _STATIC_VALUES.get(i, "")) for i, name in enumerate(_STATIC_NAMES, start=1)
)

# RFC 7541 Appendix B is a canonical Huffman code, so the code length of each of the 257
# symbols (0-255 and EOS) defines it completely. One letter per symbol: length = ord(letter) - 60.
_HUFFMAN_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCCDCDIOIJBKA"
    "BABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSSQQRQSRSSPRRRSRRSVVPORS"
    "RUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)
EOS = 256

DEFAULT_TABLE_SIZE = 4096


class HpackError(Exception):
    """A header block that does not decode (a COMPRESSION_ERROR in HTTP/2 terms)."""


_huffman: tuple[list[int], list[int], list[int], list[int]] | None = None


def _huffman_tables() -> tuple[list[int], list[int], list[int], list[int]]:
    """(symbols in code order, first code per length, first index per length, count per length)."""
    global _huffman
    if _huffman is None:
        lengths = [ord(c) - 60 for c in _HUFFMAN_LENGTHS]
        symbols = sorted(range(257), key=lambda s: (lengths[s], s))
        count = [0] * 31
        for n in lengths:
            count[n] += 1
        first_code = [0] * 31
        first_index = [0] * 31
        code = index = 0
        for n in range(1, 31):
            first_code[n] = code
            first_index[n] = index
            code = (code + count[n]) << 1
            index += count[n]
        _huffman = (symbols, first_code, first_index, count)
    return _huffman


def huffman_encode(data: bytes) -> bytes:
    """Huffman-codes ``data`` (used by the tests; the client sends plain strings)."""
    symbols, first_code, first_index, count = _huffman_tables()
    codes = {}
    for n in range(1, 31):
        for k in range(count[n]):
            codes[symbols[first_index[n] + k]] = (first_code[n] + k, n)
    acc = bits = 0
    for byte in data:
        code, n = codes[byte]
        acc = (acc << n) | code
        bits += n
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((bits + pad) // 8, "big")


def huffman_decode(data: bytes) -> bytes:
    """Decodes a Huffman-coded string; padding must be at most 7 one-bits (RFC 7541 section 5.2)."""
    symbols, first_code, first_index, count = _huffman_tables()
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in (7, 6, 5, 4, 3, 2, 1, 0):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            offset = code - first_code[length]
            if 0 <= offset < count[length]:
                symbol = symbols[first_index[length] + offset]
                if symbol == EOS:
                    raise HpackError("Huffman string contains EOS")
                out.append(symbol)
                code = length = 0
            elif length >= 30:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def _read_int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(block):
            raise HpackError("truncated integer")
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
        if shift > 28:
            raise HpackError("integer too large")


def _read_string(block: bytes, i: int) -> tuple[bytes, int]:
    if i >= len(block):
        raise HpackError("truncated string")
    huffman = block[i] & 0x80
    n, i = _read_int(block, i, 7)
    if i + n > len(block):
        raise HpackError("truncated string")
    raw = block[i : i + n]
    return (huffman_decode(raw) if huffman else raw), i + n


class Decoder:
    """Decodes header blocks of one connection, keeping its dynamic table."""

    def __init__(self, max_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.limit = max_size  # what we announced (SETTINGS_HEADER_TABLE_SIZE)
        self.max_size = max_size  # the encoder's current choice, at most the limit
        self.size = 0
        self.dynamic: list[tuple[str, str]] = []  # newest first

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= 61:
            return STATIC_TABLE[index - 1]
        k = index - 62
        if 0 <= k < len(self.dynamic):
            return self.dynamic[k]
        raise HpackError(f"header table index {index} out of range")

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.dynamic:
            name, value = self.dynamic.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """Returns the header list of one complete header block, in order."""
        headers = []
        i = 0
        end = len(block)
        while i < end:
            byte = block[i]
            if byte & 0x80:  # indexed field
                index, i = _read_int(block, i, 7)
                if index == 0:
                    raise HpackError("header table index 0")
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, i = _read_int(block, i, 5)
                if size > self.limit:
                    raise HpackError(f"table size {size} exceeds {self.limit}")
                self.max_size = size
                self._evict()
                continue
            indexing = byte & 0x40
            index, i = _read_int(block, i, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                raw_name, i = _read_string(block, i)
                name = raw_name.decode("latin-1")
            raw_value, i = _read_string(block, i)
            value = raw_value.decode("latin-1")
            if indexing:
                self._add(name, value)
            headers.append((name, value))
        return headers


def _int_bytes(value: int, prefix: int, flags: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_bytes(data: bytes) -> bytes:
    return _int_bytes(len(data), 7, 0) + data


def encode(headers: list[tuple[str, str]]) -> bytes:
    """Encodes headers without touching any dynamic table: exact static matches are indexed,
    everything else is a literal without indexing (with an indexed name where the table has it)."""
    out = bytearray()
    for name, value in headers:
        index = name_index = 0
        for k, (static_name, static_value) in enumerate(STATIC_TABLE, start=1):
            if static_name == name:
                if static_value == value:
                    index = k
                    break
                if not name_index:
                    name_index = k
        if index:
            out += _int_bytes(index, 7, 0x80)
            continue
        out += _int_bytes(name_index, 4, 0x00)
        if not name_index:
            out += _string_bytes(name.encode("latin-1"))
        out += _string_bytes(value.encode("latin-1"))
    return bytes(out)
