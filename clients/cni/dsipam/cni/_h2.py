"""A minimal gRPC client: unary calls over cleartext HTTP/2 ("prior knowledge", RFC 9113 section 3.3).

It speaks just enough HTTP/2 for sequential unary calls on one connection: SETTINGS, PING,
WINDOW_UPDATE and flow control both ways, GOAWAY, RST_STREAM, CONTINUATION and padding, with a
complete HPACK decoder. It uses only C modules of the standard library (``_socket``,
``binascii``, ``time``), so a plugin run pays no import cost for grpc or protobuf.
"""

import _socket
import time

from . import _hpack

# gRPC status codes
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16
CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0, 1, 3, 4, 5, 6, 7, 8, 9)
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20
_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65535
_MAX_RESPONSE = 64 << 20


class RpcError(Exception):
    """A call that did not return OK: the gRPC status code, message and ErrorInfo reason."""

    def __init__(self, code: int, message: str, reason: str = "", metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    @property
    def code_name(self) -> str:
        """The status code's name, such as ``RESOURCE_EXHAUSTED``."""
        return CODE_NAMES.get(self.code, str(self.code))

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code_name}{reason}: {self.message}"


class _Unprocessed(RpcError):
    """The server did not start on the request (GOAWAY below its stream, REFUSED_STREAM, or the
    connection found closed before sending): safe to send again on a new connection."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def percent_decode(text: str) -> str:
    """grpc-message is percent-encoded UTF-8."""
    if "%" not in text:
        return text
    raw = text.encode("latin-1")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _http_status_code(status: str) -> int:
    # https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md
    return {"400": INTERNAL, "401": UNAUTHENTICATED, "403": PERMISSION_DENIED, "404": UNIMPLEMENTED,
            "429": UNAVAILABLE, "502": UNAVAILABLE, "503": UNAVAILABLE, "504": UNAVAILABLE}.get(status, UNKNOWN)


def split_target(target: str) -> tuple[int, str | tuple[str, int], str]:
    """(address family, socket address, :authority) for ``unix:///path``, ``unix:path`` or ``host:port``."""
    if target.startswith("unix://"):
        return _socket.AF_UNIX, target[len("unix://"):], "localhost"
    if target.startswith("unix:"):
        return _socket.AF_UNIX, target[len("unix:"):], "localhost"
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"{target!r} is not host:port or unix:///path")
    return -1, (host, int(port.lstrip("0") or "0")), target  # leading zeros: no int() digit limit


class _Stream:
    __slots__ = ("id", "headers", "trailers", "data", "closed", "reset", "window", "block", "block_end")

    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.data = bytearray()
        self.closed = False
        self.reset: int | None = None
        self.window = window
        self.block = bytearray()
        self.block_end = False


class Channel:
    """One HTTP/2 connection to a gRPC server, for sequential unary calls.

    ``deadline`` (a ``time.monotonic()`` value) bounds everything done through the channel.
    """

    def __init__(self, target: str, deadline: float, user_agent: str = "dsipam-cni",
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.target = target
        self.metadata = metadata
        self.deadline = deadline
        self.user_agent = user_agent
        self.sock: _socket.socket | None = None
        self.stream: _Stream | None = None
        self.authority = "localhost"
        self._reset()

    # -- connection --------------------------------------------------------------------

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RpcError(DEADLINE_EXCEEDED, f"deadline exceeded talking to {self.target}")
        return left

    def _connect(self) -> None:
        try:
            family, address, self.authority = split_target(self.target)
        except ValueError as exc:
            raise RpcError(UNAVAILABLE, str(exc)) from None
        last: Exception | None = None
        candidates: list[tuple[int, object]]
        if family == _socket.AF_UNIX:
            candidates = [(family, address)]
        else:
            try:
                host, port = address  # type: ignore[misc,str-unpack]
                candidates = [(info[0], info[4]) for info in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)]
            except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA refuses (an empty label)
                raise RpcError(UNAVAILABLE, f"cannot resolve {self.target}: {exc}") from None
        for fam, addr in candidates:
            remaining = self._remaining()
            sock = _socket.socket(fam, _socket.SOCK_STREAM)
            try:
                sock.settimeout(remaining)
                sock.connect(addr)  # type: ignore[arg-type]
            except TimeoutError:
                sock.close()
                raise RpcError(DEADLINE_EXCEEDED, f"deadline exceeded connecting to {self.target}") from None
            except OSError as exc:
                sock.close()
                last = exc
                continue
            if fam != _socket.AF_UNIX:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self.sock = sock
            break
        else:
            raise RpcError(UNAVAILABLE, f"cannot connect to {self.target}: {last}")
        settings = (
            (2).to_bytes(2, "big") + (0).to_bytes(4, "big")  # SETTINGS_ENABLE_PUSH = 0
            + (4).to_bytes(2, "big") + _MAX_WINDOW.to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
        )
        self._send(PREFACE + _frame(_SETTINGS, 0, 0, settings)
                   + _frame(_WINDOW_UPDATE, 0, 0, (_MAX_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big")))

    def _reset(self) -> None:
        self.decoder = _hpack.Decoder()
        self.buffer = bytearray()
        self.next_stream = 1
        self.conn_window = _DEFAULT_WINDOW
        self.peer_initial_window = _DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.goaway: int | None = None
        self.broken = False

    def close(self) -> None:
        """Closes the connection (without GOAWAY: the server treats EOF the same)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self, data: bytes) -> None:
        if self.sock is None or self.broken:
            self._fail(UNAVAILABLE, "connection lost")
        assert self.sock is not None
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(data)
        except TimeoutError:
            self._fail(DEADLINE_EXCEEDED, "deadline exceeded sending")
        except OSError as exc:
            self._fail(UNAVAILABLE, f"connection lost: {exc}")

    def _send_control(self, data: bytes) -> None:
        """Sends an acknowledgement. If the peer has gone, what it sent before may still hold the
        whole response: keep reading, and open a new connection for the next call."""
        assert self.sock is not None
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(data)
        except TimeoutError:
            self._fail(DEADLINE_EXCEEDED, "deadline exceeded sending")
        except OSError:
            self.broken = True

    def _fail(self, code: int, message: str) -> None:
        self.close()
        raise RpcError(code, f"{message} ({self.target})")

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        assert self.sock is not None
        while True:
            if len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[0:3], "big")
                if len(self.buffer) >= 9 + length:
                    head = self.buffer[:9]
                    payload = bytes(self.buffer[9 : 9 + length])
                    del self.buffer[: 9 + length]
                    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload
            try:
                self.sock.settimeout(self._remaining())
                chunk = self.sock.recv(65536)
            except TimeoutError:
                self._fail(DEADLINE_EXCEEDED, "deadline exceeded waiting for the server")
            except RpcError:
                self.close()
                raise
            except OSError as exc:
                self._fail(UNAVAILABLE, f"connection lost: {exc}")
            if not chunk:
                self._fail(UNAVAILABLE, "connection closed by the server")
            self.buffer += chunk

    def _handle(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Processes one frame from the server."""
        stream = self.stream
        if kind == _SETTINGS:
            if flags & _ACK:
                return
            for k in range(0, len(payload) - 5, 6):
                ident = int.from_bytes(payload[k : k + 2], "big")
                value = int.from_bytes(payload[k + 2 : k + 6], "big")
                if ident == 4:
                    if stream is not None:
                        stream.window += value - self.peer_initial_window
                    self.peer_initial_window = value
                elif ident == 5:
                    self.peer_max_frame = value
            self._send_control(_frame(_SETTINGS, _ACK, 0))
        elif kind == _PING:
            if not flags & _ACK:
                self._send_control(_frame(_PING, _ACK, 0, payload))
        elif kind == _WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.conn_window += increment
            elif stream is not None and stream_id == stream.id:
                stream.window += increment
        elif kind == _GOAWAY:
            self.goaway = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream is not None and stream.id > self.goaway:
                self.close()
                raise _Unprocessed(UNAVAILABLE, f"the server is going away ({self.target})")
        elif stream is None or stream_id != stream.id:
            return  # frames of streams we no longer care about
        elif kind == _RST_STREAM:
            stream.reset = int.from_bytes(payload[:4], "big")
            stream.closed = True
        elif kind in (_HEADERS, _CONTINUATION):
            if kind == _HEADERS:
                payload = _strip(payload, flags, headers=True)
                stream.block_end = bool(flags & _END_STREAM)
            stream.block += payload
            if flags & _END_HEADERS:
                try:
                    headers = self.decoder.decode(bytes(stream.block))
                except _hpack.HpackError as exc:
                    self._fail(INTERNAL, f"undecodable response headers: {exc}")
                stream.block = bytearray()
                if stream.headers is None:
                    stream.headers = headers
                else:
                    stream.trailers = headers
                if stream.block_end:
                    stream.closed = True
        elif kind == _DATA:
            stream.data += _strip(payload, flags, headers=False)
            if len(stream.data) > _MAX_RESPONSE:
                self._fail(RESOURCE_EXHAUSTED, "response larger than 64 MiB")
            if flags & _END_STREAM:
                stream.closed = True
        elif kind == _PUSH_PROMISE:
            self._fail(INTERNAL, "server push received although disabled")

    # -- calls -------------------------------------------------------------------------

    def call(self, method: str, request: bytes) -> bytes:
        """Sends one unary request (serialized message) to ``method`` (``/pkg.Service/Method``);
        returns the serialized response or raises :class:`RpcError`.

        A request the server provably did not start on is sent once more on a new connection.
        """
        try:
            return self._call(method, request)
        except _Unprocessed:
            self.close()
            return self._call(method, request)

    def _drain(self) -> None:
        """Handles what the server sent between calls (a GOAWAY, or the connection's end)."""
        assert self.sock is not None
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.broken = True
                    break
                self.buffer += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.broken = True
        while len(self.buffer) >= 9 and len(self.buffer) >= 9 + int.from_bytes(self.buffer[0:3], "big"):
            self._handle(*self._read_frame())

    def _call(self, method: str, request: bytes) -> bytes:
        if self.sock is not None:
            self._drain()
        if self.goaway is not None or self.broken:  # the server is closing this connection: open another
            self.close()
        if self.sock is None:
            self._reset()
            self._connect()
        stream = self.stream = _Stream(self.next_stream, self.peer_initial_window)
        self.next_stream += 2
        timeout_ms = max(1, int(self._remaining() * 1000))
        block = _hpack.encode([
            (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", self.authority),
            ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", self.user_agent),
            ("grpc-timeout", f"{min(timeout_ms, 99_999_999)}m"), *self.metadata,
        ])
        body = b"\x00" + len(request).to_bytes(4, "big") + request
        out = _frame(_HEADERS, _END_HEADERS, stream.id, block)  # sent with the first DATA: one write
        sent = 0
        while sent < len(body):
            room = min(self.conn_window, stream.window, self.peer_max_frame)
            if room <= 0:
                if out:
                    self._send(out)
                    out = b""
                self._handle(*self._read_frame())
                if stream.closed:
                    break
                continue
            chunk = body[sent : sent + room]
            sent += len(chunk)
            self.conn_window -= len(chunk)
            stream.window -= len(chunk)
            self._send(out + _frame(_DATA, _END_STREAM if sent >= len(body) else 0, stream.id, chunk))
            out = b""
        while not stream.closed:
            self._handle(*self._read_frame())
        self.stream = None
        return _result(stream, self.target)


def _strip(payload: bytes, flags: int, headers: bool) -> bytes:
    start, end = 0, len(payload)
    if flags & _PADDED:
        if not payload:
            raise RpcError(INTERNAL, "malformed padded frame")
        start = 1
        end -= payload[0]
    if headers and flags & _PRIORITY:
        start += 5
    if end < start:
        raise RpcError(INTERNAL, "malformed padded frame")
    return payload[start:end]


def _result(stream: _Stream, target: str) -> bytes:
    headers = dict(stream.headers or ())
    trailers = dict(stream.trailers) if stream.trailers is not None else headers  # "Trailers-Only"
    if stream.reset is not None and "grpc-status" not in trailers:
        message = f"stream reset by {target} (HTTP/2 error {stream.reset})"
        if stream.reset == 7 and stream.headers is None:  # REFUSED_STREAM: not processed at all
            raise _Unprocessed(UNAVAILABLE, message)
        # ENHANCE_YOUR_CALM means "try again later"; CANCEL is a cancellation
        raise RpcError({8: CANCELLED, 11: UNAVAILABLE}.get(stream.reset, INTERNAL), message)
    status = headers.get(":status", "")
    if status != "200":
        raise RpcError(_http_status_code(status), f"HTTP status {status or 'missing'} from {target}")
    if "grpc-status" not in trailers:
        raise RpcError(INTERNAL, f"response from {target} has no grpc-status")
    code = int(trailers["grpc-status"]) if trailers["grpc-status"].isdigit() else UNKNOWN
    if code != OK:
        message = percent_decode(trailers.get("grpc-message", ""))
        reason, metadata = "", {}  # type: ignore[var-annotated]
        details = trailers.get("grpc-status-details-bin")
        if details:
            try:
                import binascii

                from . import _wire

                reason, metadata = _wire.status_details(binascii.a2b_base64(details + "=" * (-len(details) % 4)))
            except (ValueError, binascii.Error):
                pass
        raise RpcError(code, message, reason, metadata)
    data = stream.data
    if len(data) < 5:
        raise RpcError(INTERNAL, f"response from {target} has no message")
    if data[0] != 0:
        raise RpcError(INTERNAL, f"response from {target} is compressed, which was not asked for")
    length = int.from_bytes(data[1:5], "big")
    if len(data) != 5 + length:
        raise RpcError(INTERNAL, f"response from {target} has a malformed message frame")
    return bytes(data[5:])
