"""A TCP proxy on loopback in front of PostgreSQL, for the fast path's connection tests: it
forwards everything at once, except that

- ``hold_eof`` (seconds) holds the end of the server's stream back: the window in which a client
  has read the server's FATAL message but not yet the close (``server_closed`` is set when a
  server side ended its stream);
- ``stall_new``, while set, makes connections opened from then on be accepted and never answered
  (a server or path that drops new connections), while the ones already open keep working;
- ``drop_cancels``, while set, closes every connection that carries a CancelRequest without passing
  it on (a balancer that sends it to another server): PostgreSQL never learns of the cancellation.
  To see that message the proxy answers a connection's SSLRequest itself ("N": no TLS through it)."""

from __future__ import annotations

import asyncio
import struct
from urllib.parse import urlsplit, urlunsplit

_SSL_REQUEST, _CANCEL_REQUEST = 80877103, 80877102  # the codes of PostgreSQL's protocol


class PgProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold_eof = 0.0
        self.stall_new = False
        self.drop_cancels = False
        self.cancels_dropped = 0
        self.server_closed = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.stall_new:
                await asyncio.Event().wait()  # until the proxy closes
            first = b""
            if self.drop_cancels:
                try:
                    first = await creader.readexactly(8)
                    if struct.unpack("!ii", first) == (8, _SSL_REQUEST):
                        cwriter.write(b"N")
                        first = await creader.readexactly(8)
                except asyncio.IncompleteReadError:
                    return  # the client went away first
                if struct.unpack("!ii", first) == (16, _CANCEL_REQUEST):
                    self.cancels_dropped += 1
                    return
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            swriter.write(first)
            try:
                await asyncio.gather(self._pump(creader, swriter, hold=False), self._pump(sreader, cwriter, hold=True))
            finally:
                swriter.close()
        finally:
            self._tasks.discard(task)
            cwriter.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):  # the other side is gone: so is this direction
            pass
        if hold:
            self.server_closed.set()
            await asyncio.sleep(self.hold_eof)
        writer.close()


def upstream_port(url: str) -> int:
    return urlsplit(url).port or 5432


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's on 127.0.0.1."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, f"{netloc[0]}@{host}" if len(netloc) == 2 else host, parts.path, parts.query,
                       parts.fragment))
