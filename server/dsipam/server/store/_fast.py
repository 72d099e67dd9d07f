"""The allocation fast path: concurrent Allocates of one pool are coalesced into one call of
the server-side function ``dsipam_allocate_batch`` (migration 0004), over asyncpg directly.

One round trip and one transaction serve a whole batch, under the same row locks as the
full path (``FOR UPDATE SKIP LOCKED`` on block rows, the owner's row locked, the allocation
and its event inserted in the same transaction). Whatever the function cannot do in that
simple way (a family without a free bit in an unlocked block, an upgrade, a race on the same
owner) it leaves untouched and reports as ``slow``: the caller then runs the full path for
that request, which creates and claims blocks, waits for locks and decides exhaustion.

Group commit: a batch is sent as soon as a request arrives and fewer than ``max_inflight``
batches of the pool are in flight; requests that arrive meanwhile wait for the next batch. At
low load a request goes alone, so coalescing adds no latency. Under load (another batch of
the pool already in flight, or requests queued while this task's last batch was) a batch
lingers up to ``linger`` seconds, or until a quarter of
``max_batch`` requests wait, before it is sent: a gRPC server hands requests over a few at a
time, and without the linger batches stay at 3-4 requests, so PostgreSQL pays its per-call
and per-commit cost for every few pairs (docs/performance.md, "Engine changes").

Never silent: the full path runs for a request only when the function hands it over (a
``slow`` or ``stale`` row, or no row for it). A database outage (a refused or lost connection,
a timeout) is raised to the callers as :class:`DatabaseUnavailable`, as on the full path. A
pooled connection whose session the server ended while it was idle (see :func:`ended_while_idle`)
is neither: nothing of the batch was sent on it, so the batch runs on another connection (logged
at WARNING, counted in ``self.reconnects`` and ``dsipam_db_reconnects_total{path="fast"}``). Nor is
a batch refused as "cannot execute ... in a read-only transaction" (25006: the connections reach a
primary that was demoted behind a pooler or a virtual IP): nothing of it was written, so every
pooled connection is dropped and the batch runs on a new one, likewise logged and counted; when
the new connections cannot write either, the callers get :class:`DatabaseUnavailable`. A batch that PostgreSQL aborted as the loser of a
deadlock (40P01) or a serialization failure (40001) is a lost race, as on the full path (which
runs such a transaction again and counts it in ``dsipam_db_lock_retries``): the whole statement
was rolled back, so nothing of the batch happened, and its requests run the full path -- that is
the retry. It is logged at WARNING with the batch and counted in
``dsipam_fast_path_lock_retries_total{kind,sqlstate}``. Any
other exception of a batch (a bug in a function, a driver error) is an error: it
is logged at ERROR with the batch (kind, pool, size, owners), counted in ``self.errors`` and in
the ``dsipam_fast_path_errors_total`` counter (registered by observability.Metrics), and the
batch's callers still get their answer from the full path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from ..domain import DatabaseUnavailable
from ._conns import CLOSED_MESSAGE, ConnectionPool
from .db import READ_ONLY_MESSAGE, READ_ONLY_SQLSTATE, RECONNECTS, LogEvery, is_read_only

log = logging.getLogger("dsipam.store.fast")

KINDS = ("allocate", "allocate-node", "release")
# Process-wide, like the process metrics: observability.Metrics registers it in its registry.
FAST_PATH_ERRORS = Counter(
    "dsipam_fast_path_errors",
    "Fast-path batches that failed with an unexpected exception (not a database outage); their requests "
    "were served by the full path. Any non-zero value is a bug to report (docs/operations.md).",
    ["kind"], registry=None,
)
for _kind in KINDS:
    FAST_PATH_ERRORS.labels(_kind)  # zeros from the start
FAST_PATH_LOCK_RETRIES = Counter(
    "dsipam_fast_path_lock_retries",
    "Fast-path batches aborted by PostgreSQL as the loser of a deadlock (40P01) or serialization failure "
    "(40001): rolled back whole, their requests ran the full path.",
    ["kind", "sqlstate"], registry=None,
)
_LOST_RACE_SQLSTATES = ("40P01", "40001")
FAST_PATH_BATCH_SIZE = Histogram(
    "dsipam_fast_path_batch_size",
    "Requests per fast-path batch that the database answered, by kind (group commit: 1 at low load; "
    "kind read: the GetPool and GetAllocation callers that one shared read answered).",
    ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=None,
)
FAST_PATH_BATCH_SECONDS = Histogram(
    "dsipam_fast_path_batch_duration_seconds",
    "Time of a fast-path batch's database call (one statement, one transaction), the wait for a "
    "pooled connection included, by kind.",
    ["kind"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=None,
)
for _kind in KINDS:
    FAST_PATH_BATCH_SIZE.labels(_kind)
    FAST_PATH_BATCH_SECONDS.labels(_kind)
FAST_PATH_BATCH_SIZE.labels("read")  # shared reads (FastPath.fetch_shared): callers per statement
for _kind in KINDS:
    for _state in _LOST_RACE_SQLSTATES:
        FAST_PATH_LOCK_RETRIES.labels(_kind, _state)
# asyncpg's InterfaceError also reports client-side bugs (a wrong number of arguments): only
# these messages mean the connection or the pool went away.
_CLOSED_MESSAGES = ("connection is closed", CLOSED_MESSAGE, "underlying connection is closed")
# SQLSTATE classes of an outage, as store.db: 08 connection, 57P shutdown/cannot connect, 53 resources,
# 25006 a read-only server (no writable primary behind the connection).
_OUTAGE_SQLSTATES = ("08", "57P", "53", "25006")


_RECONNECT_LOG = LogEvery(1.0)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable (not a bug of the fast path)."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError
                  | asyncpg.TargetServerAttributeNotMatched):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return any(m in str(exc) for m in _CLOSED_MESSAGES)
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "").startswith(_OUTAGE_SQLSTATES)
    return False

# asyncpg's message when an operation starts on a connection whose protocol is in its "error
# consume" state (2) with no operation of ours waiting on it (see ended_while_idle).
_ENDED_WHILE_IDLE = re.compile(r"^cannot switch to state \d+; another operation \(2\) is in progress$")


def ended_while_idle(exc: BaseException, conn: asyncpg.Connection) -> bool:
    """True when ``exc`` says that the server ended ``conn``'s session while it was idle, so that
    nothing of the statement that raised it was sent.

    PostgreSQL ends an idle session (a restart's fast shutdown, pg_terminate_backend,
    idle_session_timeout, a standby's recovery conflict) by sending a FATAL ErrorResponse and
    then closing the socket. asyncpg reads an ErrorResponse on an idle connection as a protocol
    error: its state becomes "error consume" (2), and the connection is only marked closed when
    the end of the stream is read, a loop iteration or more later. A statement started in between
    fails in asyncpg's state switch, before any of its messages is written, with
    ``InternalClientError('cannot switch to state N; another operation (2) is in progress')``,
    and asyncpg aborts the connection (so it is closed by the time the exception is seen; the
    pool then replaces it). The fast path reaches state 2 in no other way: a connection serves
    one statement of one task between acquire and release, and a statement that fails is
    answered only after the server's ReadyForQuery, which leaves the connection idle.
    Reproduced in tests/integration/test_fast_path_errors.py (a proxy that holds the close back).
    """
    return (isinstance(exc, asyncpg.InternalClientError) and bool(_ENDED_WHILE_IDLE.search(str(exc)))
            and conn.is_closed())


_SQL = {
    # Owners without a node: set-based, one block update per block touched (migration 0009).
    "allocate": "SELECT * FROM dsipam_allocate_many($1, $2, $3, $4, $5, $6::jsonb[])",
    # Owners that name a node: owner by owner, claiming blocks for nodes (0008).
    "allocate-node": "SELECT * FROM dsipam_allocate_batch($1, $2, $3, $4, $5, $6::jsonb[], $7)",
    "release": "SELECT * FROM dsipam_release_batch($1, $2, $3, $4, $5)",
}


@dataclass
class _Request:
    args: tuple[Any, ...]  # allocate: (owner, want4, want6, attributes JSON, node); release: (owner, drop4, drop6)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _ReadQueue:
    waiting: list[tuple[Any, asyncio.Future[list[Any]]]] = field(default_factory=list)  # (item, caller)
    inflight: int = 0
    single_sql: str | None = None  # the statement for a batch of one item (fetch_shared)


@dataclass
class _PoolQueue:
    waiting: deque[_Request] = field(default_factory=deque)
    inflight: int = 0
    lingering: list[asyncio.Future[None]] = field(default_factory=list)  # woken when enough requests wait


def asyncpg_dsn(url: str) -> str:
    """``url`` as asyncpg's DSN: hosts, user, database and the parameters asyncpg reads (TLS,
    target_session_attrs); the session's parameters are :func:`session_args`."""
    from .db import parse_database_url

    return parse_database_url(url).asyncpg_dsn()


def session_args(url: str, application_name: str, timeout: float) -> dict[str, Any]:
    """asyncpg's connection arguments from the URL's connect_timeout, application_name and options
    (``application_name`` and ``timeout`` when the URL has none)."""
    from .db import parse_database_url

    parsed = parse_database_url(url)
    return {"timeout": parsed.timeout or timeout,
            "server_settings": {"application_name": application_name, **parsed.server_settings}}


def _wake(filled: asyncio.Future[None]) -> None:
    if not filled.done():
        filled.set_result(None)


class FastPath:
    def __init__(self, url: str, *, pool_size: int = 4, pgbouncer: bool = False, max_batch: int = 64,
                 max_inflight: int = 2, linger: float = 0.003) -> None:
        self.url = url
        self.pool_size = pool_size
        self.pgbouncer = pgbouncer
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.linger = linger
        self.linger_batch = max(1, max_batch // 4)
        self._pool: ConnectionPool | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False  # close() ran: no new pool
        self._queues: dict[tuple[str, str, int], _PoolQueue] = {}
        self._reads: dict[tuple[str, str, bool], _ReadQueue] = {}
        self.read_batches = 0  # shared reads sent (see fetch_shared)
        self.read_requests = 0  # callers they answered
        self.batches = 0  # batches the database answered
        self.requests = 0  # requests in those batches
        self.errors: dict[str, int] = {}  # batches that failed unexpectedly, by kind (see the module doc)
        self.reconnects = 0  # batches sent again because their connection had been ended while idle
        self.lock_retries = 0  # batches rolled back by a deadlock or serialization failure (full path ran)

    async def _connect(self) -> ConnectionPool:
        if self._pool is not None:
            return self._pool
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._closed:
                raise DatabaseUnavailable("database: the server is shutting down (its fast path is closed)")
            if self._pool is None:
                args = session_args(self.url, "dsipam-fast", 5)
                if not self.pgbouncer:
                    # The functions this pool calls run in implicit transactions, whose isolation is
                    # the session's default: READ COMMITTED whatever the database's or role's (see
                    # db.create_engine). A pooler refuses this start-up parameter; there it is checked.
                    args["server_settings"] = {**args["server_settings"],
                                               "default_transaction_isolation": "read committed"}
                dsn, cache = asyncpg_dsn(self.url), 0 if self.pgbouncer else 100
                # Every statement this pool runs is one function call in its own implicit
                # transaction and the session is never changed: nothing to reset on release.
                pool = ConnectionPool(lambda: asyncpg.connect(dsn, statement_cache_size=cache, **args),
                                      self.pool_size)
                conn = await pool.acquire()
                try:
                    isolation = await conn.fetchval("SHOW transaction_isolation")
                finally:
                    pool.release(conn)
                if isolation != "read committed":
                    await pool.close()
                    raise RuntimeError(
                        f"database: its transactions default to {isolation!r} isolation "
                        "(default_transaction_isolation of the database, role or pooler's server "
                        "connections); dsipam's fast path needs 'read committed'")
                if self._closed:  # close() ran while the pool was being opened (found by attack)
                    await pool.close()
                    raise DatabaseUnavailable("database: the server is shutting down (its fast path is closed)")
                self._pool = pool
        return self._pool

    async def close(self) -> None:
        """Closes the pool for good: a batch that was lingering (or queued, or a read that comes)
        when it closed gets DatabaseUnavailable instead of opening a new pool that nothing would
        close (found by attack: a session left open after close)."""
        self._closed = True
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def allocate(self, pool_name: str, version: int, owner: str, want4: bool, want6: bool,
                       attributes: str, node: str) -> Any:
        """Returns the function's row for this request, or None when the full path must run."""
        # Requests that name a node go in their own queue, one batch in flight at a time: two batches
        # of this process would otherwise contend for the same node blocks (SKIP LOCKED would send
        # the loser to the full path).
        kind = "allocate-node" if node else "allocate"
        return await self._submit(kind, pool_name, version, (owner, want4, want6, attributes, node))

    async def release(self, pool_name: str, version: int, owner: str, drop4: bool, drop6: bool) -> Any:
        """Returns the function's row for this request, or None when the full path must run."""
        return await self._submit("release", pool_name, version, (owner, drop4, drop6))

    async def _submit(self, kind: str, pool_name: str, version: int, args: tuple[Any, ...]) -> Any:
        req = _Request(args)
        key = (kind, pool_name, version)
        queue = self._queues.setdefault(key, _PoolQueue())
        queue.waiting.append(req)
        if queue.lingering and len(queue.waiting) >= self.linger_batch:
            for filled in queue.lingering:
                _wake(filled)
            queue.lingering.clear()
        if queue.inflight < (1 if kind == "allocate-node" else self.max_inflight):
            queue.inflight += 1
            asyncio.get_running_loop().create_task(self._drain(key, queue))
        return await req.future

    async def _drain(self, key: tuple[str, str, int], queue: _PoolQueue) -> None:
        kind, pool_name, version = key
        try:
            first = True
            while queue.waiting:
                # Under load (another batch in flight, or this task just sent one and requests
                # queued meanwhile) wait a little for more; a lone request is sent at once.
                loaded = queue.inflight > 1 or not first
                if self.linger > 0 and loaded and len(queue.waiting) < self.linger_batch:
                    await self._linger(queue)
                first = False
                n = min(len(queue.waiting), self.max_batch)
                if n == 0:  # another drain task took the requests while this one lingered
                    continue
                batch = [queue.waiting.popleft() for _ in range(n)]
                try:
                    rows = await self._call(kind, pool_name, version, batch)
                except DatabaseUnavailable as exc:
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                except asyncpg.PostgresError as exc:
                    if exc.sqlstate in _LOST_RACE_SQLSTATES:
                        self._lost_race(kind, pool_name, batch, exc.sqlstate)
                    else:
                        self._failed(kind, pool_name, batch, exc)
                    rows = [None] * len(batch)  # every request of the batch: the full path
                except Exception as exc:  # noqa: BLE001 - never leave a caller waiting, never hide it
                    self._failed(kind, pool_name, batch, exc)
                    rows = [None] * len(batch)  # every request of the batch: the full path
                except BaseException:  # cancelled (shutdown): nobody may wait for ever
                    for r in batch:
                        if not r.future.done():
                            r.future.cancel()
                    raise
                for r, row in zip(batch, rows, strict=True):
                    if not r.future.done():
                        r.future.set_result(row)
        finally:
            queue.inflight -= 1
            if not queue.waiting and queue.inflight == 0:
                self._queues.pop(key, None)

    def _lost_race(self, kind: str, pool_name: str, batch: list[_Request], sqlstate: str) -> None:
        """A batch rolled back as the loser of a deadlock or serialization failure (module doc)."""
        self.lock_retries += 1
        FAST_PATH_LOCK_RETRIES.labels(kind, sqlstate).inc()
        log.warning("fast path %s batch of %d for pool %r lost a lock race (SQLSTATE %s) and was rolled back; "
                    "the full path serves its requests", kind, len(batch), pool_name, sqlstate)

    def _failed(self, kind: str, pool_name: str, batch: list[_Request], exc: Exception) -> None:
        """An unexpected exception of a whole batch: logged at ERROR and counted (see the module doc)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1
        FAST_PATH_ERRORS.labels(kind).inc()
        owners = [str(r.args[0]) for r in batch[:3]] + (["..."] if len(batch) > 3 else [])
        log.error("fast path error: %s batch of %d for pool %r (owners %s) failed with %r; "
                  "the full path serves its requests", kind, len(batch), pool_name, ", ".join(owners), exc,
                  exc_info=exc)

    async def _linger(self, queue: _PoolQueue) -> None:
        loop = asyncio.get_running_loop()
        filled = loop.create_future()
        queue.lingering.append(filled)
        timer = loop.call_later(self.linger, _wake, filled)
        try:
            await filled
        finally:
            timer.cancel()
            if filled in queue.lingering:
                queue.lingering.remove(filled)

    async def fetch(self, sql: str, *args: Any, what: str = "a read") -> list[Any]:
        """Runs one statement (its own implicit transaction: no BEGIN and COMMIT round trips) on a
        pooled connection, as a prepared statement that asyncpg caches per connection.

        A connection the server ended while it sat idle in the pool fails before anything of the
        statement is sent; asyncpg aborts it, so the next acquire gets another (or a new) one. At
        most every pooled connection can be such a one: beyond that, the server ends sessions as
        fast as they are made, which is an outage. An outage is :class:`DatabaseUnavailable`.
        """
        read_only = False
        for attempt in range(self.pool_size + 1):
            try:
                pool = await self._connect()
                conn = await pool.acquire()
                cancelled = False
                try:
                    try:
                        return await conn.fetch(sql, *args)
                    except asyncio.CancelledError:
                        cancelled = True  # the connection settles before it serves again (_conns.py)
                        raise
                    except asyncpg.InternalClientError as exc:
                        if not ended_while_idle(exc, conn):
                            raise
                        self.reconnects += 1
                        RECONNECTS.labels("fast", "ended-while-idle").inc()
                        log.warning("fast path: PostgreSQL had ended the pooled session %s while it was idle "
                                    "(%r); %s runs on another connection (attempt %d)",
                                    conn.get_server_pid(), exc, what, attempt + 2)
                        continue
                    except asyncpg.PostgresError as exc:
                        if exc.sqlstate != READ_ONLY_SQLSTATE or read_only:
                            raise  # a new connection to a read-only server: DatabaseUnavailable below
                        # The server takes no writes any more (a demoted primary behind a pooler or
                        # a virtual IP): the statement was refused whole. Every pooled connection
                        # went to that server: drop them all, and run it on a new connection.
                        read_only = True
                        self.reconnects += 1
                        RECONNECTS.labels("fast", "read-only").inc()
                        if held := _RECONNECT_LOG.due():
                            log.warning("fast path: the server of pooled session %s takes no writes (%s); the "
                                        "pool's connections are dropped and %s runs on a new one (%d such retries "
                                        "since the last line)", conn.get_server_pid(), exc, what, held)
                        conn.terminate()
                        pool.expire()
                        continue
                finally:
                    pool.release(conn, cancelled=cancelled)
            except Exception as exc:
                if is_read_only(exc):
                    raise DatabaseUnavailable(READ_ONLY_MESSAGE) from exc
                if is_outage(exc):
                    raise DatabaseUnavailable("database: unreachable, try again later") from exc
                raise
        raise DatabaseUnavailable("database: unreachable, try again later (PostgreSQL ended every session of "
                                  "the fast path's pool while it was idle)")

    async def fetch_shared(self, sql: str, name: str, item: Any = None, *, items: bool = False,
                           single_sql: str | None = None) -> list[Any]:
        """One read of pool ``name`` shared by the callers that wait for it: the rows of ``sql`` with
        ``$1`` the pool's name and, when ``items``, ``$2`` the array of the callers' ``item``s (each
        caller picks its own rows out of the shared list, which it must not change). A batch of one
        item runs ``single_sql`` (``$2`` the item itself) when given: PostgreSQL plans ``= ANY($2)``
        of a short array anew at every execution (a custom plan is cheaper than the generic one's
        ten-element guess), 0.15 ms against 0.05 ms for ``= $2``.

        A read is sent as soon as a caller arrives and fewer than ``max_inflight`` reads of the same
        statement and pool are in flight; callers that arrive meanwhile wait for the next one, which
        serves all of them with one statement. Every caller's answer therefore comes from a statement
        that started after the caller arrived: as exact as a read of its own (never a result that was
        already on its way), at the cost of one round trip per batch instead of one per caller. At
        low load a caller reads alone, with no added wait. An exception of the statement is every
        caller's exception (a read has no other path to fall back to).
        """
        key = (sql, name, items)
        queue = self._reads.get(key)
        if queue is None:
            queue = self._reads[key] = _ReadQueue(single_sql=single_sql)
        caller: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        queue.waiting.append((item, caller))
        if queue.inflight < self.max_inflight:
            queue.inflight += 1
            asyncio.get_running_loop().create_task(self._drain_reads(key, queue))
        return await caller

    async def _drain_reads(self, key: tuple[str, str, bool], queue: _ReadQueue) -> None:
        sql, name, items = key
        try:
            while queue.waiting:
                batch = queue.waiting[:self.max_batch]
                del queue.waiting[:self.max_batch]
                statement, args = sql, (name,)
                if items:
                    unique = list(dict.fromkeys(item for item, _ in batch))
                    single = queue.single_sql
                    statement, args = (single, (name, unique[0])) if len(unique) == 1 and single else (sql, (name, unique))
                try:
                    rows = await self.fetch(statement, *args,
                                            what=f"a read of pool {name!r} for {len(batch)} callers")
                except Exception as exc:  # noqa: BLE001 - every caller's answer, raised where it waits
                    for _, caller in batch:
                        if not caller.done():
                            caller.set_exception(exc)
                    continue
                except BaseException:  # cancelled (shutdown): nobody may wait for ever
                    for _, caller in batch:
                        caller.cancel()
                    raise
                self.read_batches += 1
                self.read_requests += len(batch)
                FAST_PATH_BATCH_SIZE.labels("read").observe(len(batch))
                for _, caller in batch:
                    if not caller.done():
                        caller.set_result(rows)
        finally:
            queue.inflight -= 1
            if queue.inflight == 0 and queue.waiting:
                # Only when this task ends by an exception (cancelled: the loop's teardown) with callers
                # queued for its next read and no other read of the pool on its way to serve them:
                # they are cancelled as its batch was, never left waiting for a caller to come.
                for _, caller in queue.waiting:
                    caller.cancel()
                queue.waiting.clear()
            if not queue.waiting and queue.inflight == 0 and self._reads.get(key) is queue:
                del self._reads[key]

    async def _call(self, kind: str, pool_name: str, version: int, batch: list[_Request]) -> list[Any]:
        columns = [list(col) for col in zip(*(r.args for r in batch), strict=True)]
        if kind == "allocate":
            del columns[4]  # no node
        started = time.perf_counter()
        rows = await self.fetch(_SQL[kind], pool_name, version, *columns,
                                what=f"the {kind} batch of {len(batch)} for pool {pool_name!r}")
        took = time.perf_counter() - started
        self.batches += 1
        self.requests += len(batch)
        FAST_PATH_BATCH_SIZE.labels(kind).observe(len(batch))
        FAST_PATH_BATCH_SECONDS.labels(kind).observe(took)
        out: list[Any] = [None] * len(batch)
        for row in rows:
            out[row["idx"]] = row
        return out
