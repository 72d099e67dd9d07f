"""The plugin's HTTP/2 client against a scripted peer, for what a healthy grpc server rarely does.

The real server is used everywhere else (tests/e2e/test_cni_plugin.py); here a thread plays
the server side frame by frame over a unix socket to force small flow-control windows,
CONTINUATION frames, padding, PINGs, Huffman-coded and dynamic-table headers, trailers-only
responses, RST_STREAM, GOAWAY and a vanishing peer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dsipam.cni import _h2, _hpack

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20


class Conn:
    """The server side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self, **settings: int) -> None:
        assert self._read(len(_h2.PREFACE)) == _h2.PREFACE
        ids = {"window": 4, "max_frame": 5}
        payload = b"".join(ids[k].to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in settings.items())
        self.send(SETTINGS, 0, 0, payload)

    def frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        payload = self._read(int.from_bytes(head[:3], "big"))
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    def send(self, kind: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload)

    def request(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Reads frames until a whole request (headers and body) has arrived; answers SETTINGS."""
        decoder, headers, body, stream = _hpack.Decoder(), None, b"", 0
        while True:
            kind, flags, sid, payload = self.frame()
            if kind == SETTINGS and not flags & ACK:
                self.send(SETTINGS, ACK, 0)
            elif kind == HEADERS:
                stream, headers = sid, decoder.decode(payload)
                if flags & END_STREAM:
                    return stream, headers, body
            elif kind == DATA:
                body += payload
                if flags & END_STREAM:
                    return stream, headers or [], body

    def respond(self, stream: int, message: bytes, status: int = 0, extra_trailers: bytes = b"") -> None:
        self.send(HEADERS, END_HEADERS, stream, _hpack.encode([(":status", "200"), ("content-type", "application/grpc")]))
        self.send(DATA, 0, stream, b"\x00" + len(message).to_bytes(4, "big") + message)
        self.send(HEADERS, END_HEADERS | END_STREAM, stream, _hpack.encode([("grpc-status", str(status))]) + extra_trailers)


@pytest.fixture
def peer(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "peer.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def serve(*scripts: Callable[[Conn], None]) -> str:
        def run() -> None:
            try:
                for script in scripts:  # one script per connection, in order
                    sock, _ = listener.accept()
                    with sock:
                        script(Conn(sock))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return f"unix://{path}"

    yield serve
    listener.close()
    for thread in threads:
        thread.join(10)
    assert not errors, errors


def channel(target: str, timeout: float = 10.0) -> _h2.Channel:
    return _h2.Channel(target, time.monotonic() + timeout)


def test_request_body_respects_the_connection_window(peer) -> None:  # type: ignore[no-untyped-def]
    request = bytes(range(256)) * 800  # 200 KiB: more than the 65,535-byte initial connection window
    seen: dict[str, object] = {}

    def script(c: Conn) -> None:
        c.handshake(window=1 << 20)
        decoder, body, granted = _hpack.Decoder(), b"", 65535
        while True:
            kind, flags, stream, payload = c.frame()
            if kind == SETTINGS and not flags & ACK:
                c.send(SETTINGS, ACK, 0)
            elif kind == HEADERS:
                seen["headers"] = dict(decoder.decode(payload))
            elif kind == DATA:
                assert len(payload) <= 16384, "frame larger than SETTINGS_MAX_FRAME_SIZE"
                body += payload
                assert len(body) <= granted, "sent beyond the connection window"
                if flags & END_STREAM:
                    break
                if len(body) == granted:  # only when the window is used up: the client must wait
                    granted += 30000
                    c.send(WINDOW_UPDATE, 0, 0, (30000).to_bytes(4, "big"))
        seen["body"] = body
        c.respond(stream, b"ok")

    ch = channel(peer(script))
    assert ch.call("/dsipam.v1.IpamService/GetPool", request) == b"ok"
    ch.close()
    assert seen["body"] == b"\x00" + len(request).to_bytes(4, "big") + request
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers[":path"] == "/dsipam.v1.IpamService/GetPool" and headers["te"] == "trailers"
    assert headers["content-type"] == "application/grpc" and headers["grpc-timeout"].endswith("m")


def _literal_indexed(name: str, value: str, huffman: bool) -> bytes:
    """Literal header field with incremental indexing, new name (RFC 7541 section 6.2.1)."""
    raw = value.encode()
    coded = _hpack.huffman_encode(raw) if huffman else raw
    return (bytes([0x40, len(name)]) + name.encode()
            + bytes([(0x80 if huffman else 0) | len(coded)]) + coded)


def test_continuation_padding_ping_huffman_and_dynamic_table(peer) -> None:  # type: ignore[no-untyped-def]
    pinged: list[bytes] = []

    def script(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        c.send(PING, 0, 0, b"12345678")
        block = _hpack.encode([(":status", "200")]) + _literal_indexed("x-served-by", "peer-one", huffman=True)
        # HEADERS with padding and priority, continued in a CONTINUATION frame
        c.send(HEADERS, PADDED | PRIORITY, stream, bytes([3]) + b"\x00\x00\x00\x00\x10" + block[:3] + b"\x00" * 3)
        c.send(CONTINUATION, END_HEADERS, stream, block[3:])
        message = b"\x00\x00\x00\x00\x05hello"
        c.send(DATA, PADDED, stream, bytes([4]) + message[:6] + b"\x00" * 4)
        c.send(DATA, 0, stream, message[6:])
        c.send(HEADERS, END_HEADERS | END_STREAM, stream, _hpack.encode([("grpc-status", "0")]))
        kind, flags, _, payload = c.frame()
        while kind == SETTINGS:
            kind, flags, _, payload = c.frame()
        assert (kind, flags) == (PING, ACK)
        pinged.append(payload)
        # second call: the dynamic table entry (index 62) is used, and a Huffman-coded
        # percent-encoded grpc-message comes back
        stream, _, _ = c.request()
        c.send(HEADERS, END_HEADERS, stream, _hpack.encode([(":status", "200")]) + bytes([0x80 | 62]))
        trailers = (_hpack.encode([("grpc-status", "5")])
                    + _literal_indexed("grpc-message", "owner%3A 'c1' holds nothing %E2%9C%93", huffman=True))
        c.send(HEADERS, END_HEADERS | END_STREAM, stream, trailers)

    ch = channel(peer(script))
    assert ch.call("/m", b"") == b"hello"
    with pytest.raises(_h2.RpcError) as exc:
        ch.call("/m", b"")
    ch.close()
    assert exc.value.code == _h2.NOT_FOUND
    assert exc.value.message == "owner: 'c1' holds nothing \u2713"
    assert pinged == [b"12345678"]


@pytest.mark.parametrize(("headers", "code"), [
    ([(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", "down")],
     _h2.UNAVAILABLE),
    ([(":status", "503")], _h2.UNAVAILABLE),
    ([(":status", "404")], _h2.UNIMPLEMENTED),
    ([(":status", "200")], _h2.INTERNAL),  # no grpc-status at all
])
def test_trailers_only_and_http_errors(peer, headers: list[tuple[str, str]], code: int) -> None:  # type: ignore[no-untyped-def]
    def script(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        c.send(HEADERS, END_HEADERS | END_STREAM, stream, _hpack.encode(headers))

    with pytest.raises(_h2.RpcError) as exc:
        channel(peer(script)).call("/m", b"x")
    assert exc.value.code == code


def _refuse(c: Conn) -> None:
    c.handshake()
    stream, _, _ = c.request()
    c.send(RST_STREAM, 0, stream, (7).to_bytes(4, "big"))  # REFUSED_STREAM: not processed


def _answer(text: bytes) -> Callable[[Conn], None]:
    def script(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        assert stream == 1  # a new connection starts again at stream 1
        c.respond(stream, text)
    return script


def test_refused_stream_is_sent_again_once_on_a_new_connection(peer) -> None:  # type: ignore[no-untyped-def]
    assert channel(peer(_refuse, _answer(b"second try"))).call("/m", b"x") == b"second try"


def test_refused_twice_is_unavailable(peer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(_h2.RpcError) as exc:
        channel(peer(_refuse, _refuse)).call("/m", b"x")
    assert exc.value.code == _h2.UNAVAILABLE


def test_goaway_between_calls_makes_the_next_call_reconnect(peer) -> None:  # type: ignore[no-untyped-def]
    def first(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        c.respond(stream, b"one")
        c.send(GOAWAY, 0, 0, stream.to_bytes(4, "big") + (0).to_bytes(4, "big"))
        time.sleep(0.3)  # a graceful server keeps the connection a while

    ch = channel(peer(first, _answer(b"two")))
    assert ch.call("/m", b"") == b"one"
    time.sleep(0.1)  # the GOAWAY is there before the next call
    assert ch.call("/m", b"") == b"two"
    ch.close()


def test_goaway_below_a_sent_request_sends_it_again(peer) -> None:  # type: ignore[no-untyped-def]
    def first(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        c.respond(stream, b"one")
        later, _, _ = c.request()  # the second request arrives, but the server is leaving
        c.send(GOAWAY, 0, 0, stream.to_bytes(4, "big") + (0).to_bytes(4, "big"))
        assert later > stream

    ch = channel(peer(first, _answer(b"two")))
    assert ch.call("/m", b"") == b"one"
    assert ch.call("/m", b"") == b"two"
    ch.close()


def test_peer_closing_mid_call_is_unavailable(peer) -> None:  # type: ignore[no-untyped-def]
    def script(c: Conn) -> None:
        c.handshake()
        c.request()  # and hang up without answering

    with pytest.raises(_h2.RpcError) as exc:
        channel(peer(script)).call("/m", b"x")
    assert exc.value.code == _h2.UNAVAILABLE


def test_error_details_are_read_from_grpc_status_details_bin(peer) -> None:  # type: ignore[no-untyped-def]
    import base64

    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status(code=8, message="pool: full")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="POOL_EXHAUSTED", domain="dsipam.io",
                                                          metadata={"pool": "p"}))
    details = base64.b64encode(status.SerializeToString()).decode().rstrip("=")  # gRPC sends it unpadded

    def script(c: Conn) -> None:
        c.handshake()
        stream, _, _ = c.request()
        c.respond(stream, b"", status=8, extra_trailers=_hpack.encode([("grpc-message", "pool: full")])
                  + _literal_indexed("grpc-status-details-bin", details, huffman=True))

    with pytest.raises(_h2.RpcError) as exc:
        channel(peer(script)).call("/m", b"x")
    assert (exc.value.code, exc.value.reason, exc.value.metadata) == (8, "POOL_EXHAUSTED", {"pool": "p"})
