"""The fast path's connections: a pool that does only what the fast path needs of one.

asyncpg's ``Pool`` costs about as much client CPU per use as the statement it serves: its
``acquire`` and ``release`` create a proxy object, a future, an idle-lifetime timer and, on
release, a task (``asyncio.shield``) and a timeout scope. Measured on the 2-core development
machine (``python bench/pool_cost.py``, 2026-12-06; docs/performance.md, "2026-12-06, night"): a
one-row prepared statement cost 44 µs of the process's CPU through ``Pool``, 25 µs on a held
connection and 27 µs through this pool. Every fast-path batch and shared read takes one connection
for one statement, so that difference was paid on every one of them.

:class:`ConnectionPool` keeps at most ``max_size`` connections and hands idle ones out last in,
first out. A connection that is closed when it comes back (or when it would be handed out) is
dropped and a new one is opened in its place when needed. What asyncpg's pool did besides, and
the fast path does not need: resetting a session on release (the fast path never changes one),
closing connections idle for five minutes (at most ``max_size`` stay open), closing a connection
after 50,000 statements. A connection whose statement was cancelled part-way comes back with
``cancelled=True`` and is held out of circulation, its slot counted, until the cancellation is
over: asyncpg sends PostgreSQL a CancelRequest on a new connection, and the next statement on the
cancelled one first waits for that and for the statement's end, so a caller handed it at once
would wait as long (found by attack: with new connections stalled, every later caller waited on it
while an idle connection sat unused). A statement of its own (``SELECT 1``) waits for that, with
no time limit, as asyncpg's pool waited in ``release``: ending the connection sooner would close
only the client's socket while PostgreSQL went on running the statement, and the pool would open
sessions beyond its bound (found by a second attack, with CancelRequests that never reached
PostgreSQL: 4 more sessions every 5 s). Only :meth:`close` ends a connection still settling, after
``settle_seconds``. The fast path's batches and shared reads run in tasks of its own and are
cancelled only at shutdown; a page read runs in its gRPC caller's task and is cancelled when the
caller hangs up, which stops it on the server (a third attack showed why it must be: shielded from
the hang-up, reads blocked behind a lock held every connection, and shutdown waited for them).

:meth:`close` waits ``settle_seconds`` for the connections in use to come back, then ends them (a
batch blocked behind a lock at shutdown held the server's stop without bound; found by attack).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg

from .db import LogEvery

CLOSED_MESSAGE = "pool is closed"  # an asyncpg.InterfaceError message FastPath's is_outage knows
log = logging.getLogger("dsipam.store.fast")
_UNSETTLED_LOG = LogEvery(1.0)


class ConnectionPool:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], max_size: int,
                 settle_seconds: float = 5.0) -> None:
        if max_size < 1:
            raise ValueError(f"max_size: {max_size} is not at least 1")
        self._connect = connect
        self.max_size = max_size
        self.settle_seconds = settle_seconds  # how long close() waits for connections in use or settling
        self._idle: list[asyncpg.Connection] = []
        self._size = 0  # connections open, handed out or being opened
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._generation = 0
        self._born: dict[asyncpg.Connection, int] = {}  # each open connection's generation
        self._closed = False
        self._emptied: asyncio.Future[None] | None = None  # close() waits for the handed-out ones
        self._background: set[asyncio.Task[None]] = set()  # graceful closes (_retire) and settles under way
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self) -> asyncpg.Connection:
        """An open connection: an idle one, else a new one while fewer than ``max_size`` are
        open, else the next one released. A failed connect raises (the slot is freed)."""
        while True:
            if self._closed:
                raise asyncpg.InterfaceError(CLOSED_MESSAGE)
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._drop(conn)
            if self._size < self.max_size:
                self._size += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._size -= 1
                    self._wake_one(None)  # a waiter may open one in its turn
                    self._maybe_emptied()
                    raise
                if self._closed:  # closed while this one was being opened
                    self._retire(conn)
                    raise asyncpg.InterfaceError(CLOSED_MESSAGE)
                self._born[conn] = self._generation
                return conn
            waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed a connection (or a turn) just as this task was cancelled: pass it on.
                    late = waiter.result()
                    if late is not None:
                        self.release(late)
                    elif not self._closed:
                        self._wake_one(None)
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            if handed is None:
                continue  # a connection was dropped: this waiter may open one in its place
            if handed.is_closed():  # closed between its release and now
                self._drop(handed)
                continue
            return handed

    def release(self, conn: asyncpg.Connection, *, cancelled: bool = False) -> None:
        """Gives ``conn`` back: to the first waiter, else to the idle list. A closed connection, or
        one opened before :meth:`expire` or that comes back after :meth:`close`, is dropped. One
        whose statement was ``cancelled`` is first left to settle (the module's doc)."""
        if cancelled and not conn.is_closed():
            task = self._in_background(self._settle(conn))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            return
        if conn.is_closed() or self._closed or self._born.get(conn) != self._generation:
            self._retire(conn)
            return
        if not self._wake_one(conn):
            self._idle.append(conn)

    def expire(self) -> None:
        """Every connection opened so far is dropped: the idle ones now, the others when they
        come back (the server behind them takes no writes any more)."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            self._retire(conn)

    async def close(self) -> None:
        """Closes the idle connections and waits for the others to come back and be closed, and for
        connects under way to end: ``settle_seconds`` for those still settling, then as long again
        for those in use, after which they are ended (logged). Waiters get InterfaceError."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError(CLOSED_MESSAGE))
        idle, self._idle = self._idle, []
        for conn in idle:
            self._retire(conn)
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=self.settle_seconds)
            for task in list(self._settling):  # still running its cancelled statement: ended now
                log.warning("fast path: closing while a cancelled statement's session has not settled after "
                            "%g s; it is ended", self.settle_seconds)
                task.cancel()
        if self._size > 0:
            if self._emptied is None:  # a second close() waits for the same (found by attack: it hung the first)
                self._emptied = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), self.settle_seconds)
            except TimeoutError:
                log.warning("fast path: closing while %d session(s) still run a statement after %g s; they are "
                            "ended", len(self._born), self.settle_seconds)
                for conn in list(self._born):
                    conn.terminate()  # its statement fails as an outage; the connection comes back closed
                await asyncio.shield(self._emptied)

    def _retire(self, conn: asyncpg.Connection) -> None:
        """Drops ``conn``; an open one is closed first (a Terminate message, as asyncpg's pool
        does), its slot held until it is."""
        if conn.is_closed():
            self._drop(conn)
            return
        self._in_background(self._close_one(conn))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _settle(self, conn: asyncpg.Connection) -> None:
        settled = False
        try:
            await conn.fetchval("SELECT 1")
            settled = True
        except Exception as exc:  # noqa: BLE001 - the connection failed meanwhile: logged, and it is ended
            # (a session terminated while its statement was being cancelled: InternalClientError "cannot
            # switch to state ..."; found by attack, where it escaped as an unretrieved task exception)
            if held := _UNSETTLED_LOG.due():
                log.warning("fast path: the session %s of a cancelled statement failed while it settled (%r); "
                            "it is ended and another opened when needed (%d such since the last line)",
                            conn.get_server_pid(), exc, held)
        finally:
            if not settled:
                conn.terminate()
            self.release(conn)  # its slot was held meanwhile; a terminated one is dropped

    async def _close_one(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()  # gone already, or too slow to say goodbye: nothing more to do
        finally:
            self._drop(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        self._born.pop(conn, None)
        self._size -= 1
        if not self._closed:
            self._wake_one(None)  # a waiter opens a new connection in its place
        self._maybe_emptied()

    def _wake_one(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _maybe_emptied(self) -> None:
        if self._size == 0 and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)
