"""The fast path's own connection pool (store/_conns.py), on real PostgreSQL sessions: a bound on
open sessions, no connection lost to a cancelled waiter or a failed connect, expired and closed
connections gone from the server, and a cancelled statement cancelled on the server before its
connection serves the next one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgproxy import PgProxy, upstream_port, via

from dsipam.server.store._conns import ConnectionPool
from dsipam.server.store._fast import FastPath, asyncpg_dsn


@pytest.fixture
async def admin(clean_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to look at the server (pg_stat_activity) and lock tables."""
    conn = await asyncpg.connect(asyncpg_dsn(clean_db))
    yield conn
    await conn.close()


def _named(url: str) -> tuple[str, str]:
    """A DSN whose sessions carry an application_name of their own (the session server's pools
    share the test database)."""
    name = f"dsipam-pool-test-{uuid.uuid4().hex[:8]}"
    return f"{asyncpg_dsn(url)}{'&' if '?' in asyncpg_dsn(url) else '?'}application_name={name}", name


async def _sessions(admin: asyncpg.Connection, name: str, wait_for: int | None = None) -> int:
    """Sessions of ``name`` on the server; with ``wait_for``, polls until that many are left (an
    ended session's backend leaves pg_stat_activity when it has exited)."""
    for _ in range(50):
        n = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
        if wait_for is None or n == wait_for:
            return int(n)
        await asyncio.sleep(0.1)
    return int(n)


async def test_never_more_sessions_than_max_size_and_every_caller_served(clean_db, admin):
    dsn, name = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=3)
    peak = 0

    async def one(i: int) -> int:
        nonlocal peak
        conn = await pool.acquire()
        try:
            peak = max(peak, pool.size)
            return int(await conn.fetchval("SELECT $1::int FROM pg_sleep(0.01)", i))
        finally:
            pool.release(conn)

    assert await asyncio.gather(*(one(i) for i in range(40))) == list(range(40))
    assert peak == 3 and pool.size == 3 and pool.idle == 3
    assert await _sessions(admin, name) == 3
    await pool.close()
    assert pool.size == 0
    assert await _sessions(admin, name, wait_for=0) == 0


async def test_a_waiter_cancelled_before_or_after_it_was_handed_a_connection_loses_none(clean_db):
    dsn, _ = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=1)
    held = await pool.acquire()
    # Cancelled while it waits: nothing was handed to it.
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Cancelled after the release handed it the connection, before it ran: it gives it back.
    handed = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held)
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    again = await asyncio.wait_for(pool.acquire(), 2)  # the one connection, not a new one
    assert again is held and pool.size == 1
    pool.release(again)
    await pool.close()


async def test_a_failed_connect_frees_its_slot_and_the_next_caller_connects(clean_db):
    dsn, _ = _named(clean_db)
    failures = 2

    async def connect() -> asyncpg.Connection:
        nonlocal failures
        if failures:
            failures -= 1
            return await asyncpg.connect("postgresql://postgres@127.0.0.1:1/postgres", timeout=2)  # nothing listens
        return await asyncpg.connect(dsn)

    pool = ConnectionPool(connect, max_size=1)
    with pytest.raises(OSError):
        await pool.acquire()
    assert pool.size == 0
    # A waiter queued behind a connect that fails gets its own turn to connect.
    first, second = asyncio.ensure_future(pool.acquire()), asyncio.ensure_future(pool.acquire())
    done = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)
    assert isinstance(done[0], OSError) and isinstance(done[1], asyncpg.Connection), done
    pool.release(done[1])
    assert pool.size == 1
    await pool.close()


async def test_a_connection_ended_by_the_server_is_replaced(clean_db, admin):
    dsn, name = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=1)
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    pool.release(conn)
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    for _ in range(50):  # asyncpg marks it closed when it reads the end of the stream
        if conn.is_closed():
            break
        await asyncio.sleep(0.05)
    conn = await pool.acquire()
    assert not conn.is_closed() and conn.get_server_pid() != pid
    assert await conn.fetchval("SELECT 1") == 1
    pool.release(conn)
    assert pool.size == 1 and await _sessions(admin, name) == 1
    await pool.close()


async def test_expire_ends_the_idle_sessions_now_and_the_handed_out_one_when_it_comes_back(clean_db, admin):
    dsn, name = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=2)
    a, b = await pool.acquire(), await pool.acquire()
    old = {a.get_server_pid(), b.get_server_pid()}
    pool.release(a)
    pool.expire()
    assert await _sessions(admin, name, wait_for=1) == 1  # b's
    pool.release(b)
    assert await _sessions(admin, name, wait_for=0) == 0
    c = await pool.acquire()
    assert c.get_server_pid() not in old
    pool.release(c)
    await pool.close()


async def test_close_waits_for_the_connection_in_use_and_refuses_waiters(clean_db, admin):
    dsn, name = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=1)
    conn = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(pool.close())
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await waiter
    await asyncio.sleep(0.05)
    assert not closing.done()  # the connection in use is not pulled from under its statement
    assert await conn.fetchval("SELECT 2") == 2
    pool.release(conn)
    await asyncio.wait_for(closing, 5)
    assert pool.size == 0 and await _sessions(admin, name, wait_for=0) == 0
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await pool.acquire()


async def test_a_cancelled_statement_is_cancelled_on_the_server_before_the_connection_serves_again(clean_db, admin):
    """FastPath gives a connection back as it is when its statement was cancelled (a caller of a
    page read hung up): PostgreSQL must stop that statement, and the next statement on the same
    connection must run after it, not fail."""
    dsn, name = _named(clean_db)
    fast = FastPath(dsn, pool_size=1)
    try:
        pid = (await fast.fetch("SELECT pg_backend_pid() AS pid"))[0]["pid"]
        slow = asyncio.ensure_future(fast.fetch("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        started = time.monotonic()
        again = (await asyncio.wait_for(fast.fetch("SELECT pg_backend_pid() AS pid"), 10))[0]["pid"]
        assert again == pid and time.monotonic() - started < 5
        running = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE '%pg_sleep(30)%' "
            "AND state = 'active'", name)
        assert running == 0
        assert fast.errors == {} and fast.reconnects == 0
    finally:
        await fast.close()


_STEPS = ("acquire", "acquire", "release", "cancel", "expire", "kill", "settle")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(_STEPS), max_size=30), max_size=st.integers(1, 3))
def test_any_interleaving_keeps_the_bound_and_loses_no_slot(clean_db, steps, max_size):
    """Acquires, releases, cancelled acquires, expiries and connections killed under the pool, in any
    order: never more than ``max_size`` open, and afterwards every slot is usable again."""
    dsn, name = _named(clean_db)

    async def main() -> None:
        pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=max_size)
        pending: list[asyncio.Future[asyncpg.Connection]] = []
        held: list[asyncpg.Connection] = []
        for step in steps:
            if step == "acquire":
                pending.append(asyncio.ensure_future(pool.acquire()))
            elif step == "release" and held:
                pool.release(held.pop(0))
            elif step == "cancel" and pending:
                pending.pop(0).cancel()
            elif step == "expire":
                pool.expire()
            elif step == "kill" and held:
                held[0].terminate()  # its session is gone; the pool learns it on release
            await asyncio.sleep(0.02 if step == "settle" else 0)
            for fut in [f for f in pending if f.done()]:
                pending.remove(fut)
                if not fut.cancelled():
                    held.append(fut.result())
            assert pool.size <= max_size
        for fut in pending:
            fut.cancel()
        for fut in pending:
            try:
                held.append(await fut)
            except asyncio.CancelledError:
                pass
        for conn in held:
            pool.release(conn)
        # Every slot usable: max_size callers at once each get a working connection.
        conns = await asyncio.wait_for(asyncio.gather(*(pool.acquire() for _ in range(max_size))), 10)
        assert [await c.fetchval("SELECT 1") for c in conns] == [1] * max_size
        assert pool.size == max_size
        for c in conns:
            pool.release(c)
        await asyncio.wait_for(pool.close(), 10)
        admin = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            assert await _sessions(admin, name, wait_for=0) == 0
        finally:
            await admin.close()

    asyncio.run(main())


async def test_a_cancelled_statements_connection_is_not_handed_out_until_it_settles(clean_db, caplog):
    """Found by attack: asyncpg cancels a statement over a new connection, and the next statement on
    the cancelled one waits for that first. With new connections stalled, the pool handed the
    cancelled connection (last in, first out) to every later caller, who waited with it, while an
    idle connection that worked sat unused. It is now held back, its slot counted, until it settles;
    close() ends it if it has not after ``settle_seconds``."""
    proxy = PgProxy(upstream_port(clean_db))
    fast = FastPath(via(clean_db, await proxy.start()), pool_size=2)
    try:
        await asyncio.gather(*(fast.fetch("SELECT pg_sleep(0.05)") for _ in range(2)))  # two open, idle
        assert fast._pool is not None and fast._pool.size == 2
        fast._pool.settle_seconds = 1.0
        proxy.stall_new = True
        slow = asyncio.ensure_future(fast.fetch("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.1)
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        for i in range(3):  # served at once by the other connection
            rows = await asyncio.wait_for(fast.fetch("SELECT $1::int AS v", i), 0.5)
            assert rows[0]["v"] == i
        await asyncio.sleep(0.8)  # its statement has ended, but its CancelRequest's connection stalls
        assert fast._pool.size == 2 and fast._pool.idle == 1  # still held back, still counted
        assert fast.errors == {}
        started = time.monotonic()
        await asyncio.wait_for(fast.close(), 10)
        assert time.monotonic() - started < 3  # settle_seconds, then ended
        assert "has not settled after 1 s" in caplog.text  # logged at WARNING, never silent
    finally:
        proxy.stall_new = False
        await asyncio.wait_for(fast.close(), 10)
        await proxy.close()


async def test_cancellations_that_never_reach_postgresql_keep_the_sessions_within_the_bound(clean_db, admin):
    """Found by a second attack: when a settle gave up after a few seconds and ended the connection,
    only the client's socket closed; PostgreSQL went on running the cancelled statement, and the
    pool opened new sessions beside it (4 more every 5 s, unbounded) when the CancelRequests never
    reached PostgreSQL. A cancelled statement's connection now keeps its slot until its statement
    has ended."""
    proxy = PgProxy(upstream_port(clean_db))
    dsn, name = _named(clean_db)
    fast = FastPath(via(dsn, await proxy.start()), pool_size=2)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await _sessions(admin, name))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        proxy.drop_cancels = True
        assert fast._closed is False
        await fast.fetch("SELECT 1")
        assert fast._pool is not None
        fast._pool.settle_seconds = 0.3  # close()'s bound; a settle itself has none
        for _ in range(4):  # callers that hang up on statements that run on: cancels that are lost
            await asyncio.gather(*(asyncio.wait_for(fast.fetch("SELECT pg_sleep(1.2)"), 0.1) for _ in range(2)),
                                 return_exceptions=True)
            await asyncio.sleep(0.2)
        assert proxy.cancels_dropped >= 2
        # Once the statements have run out, their connections settle and serve again.
        rows = await asyncio.wait_for(fast.fetch("SELECT 7 AS v"), 5)
        assert rows[0]["v"] == 7
        assert peak <= 2, f"{peak} sessions of a pool of 2"
        assert fast.errors == {}
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.wait_for(fast.close(), 10)
        await proxy.close()


async def test_close_twice_returns_both_times(clean_db):
    """Found by attack: a second close() while a connection was in use replaced what the first
    waited for, and the first never returned."""
    dsn, _ = _named(clean_db)
    pool = ConnectionPool(lambda: asyncpg.connect(dsn), max_size=1)
    conn = await pool.acquire()
    first, second = asyncio.ensure_future(pool.close()), asyncio.ensure_future(pool.close())
    await asyncio.sleep(0.05)
    pool.release(conn)
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_close_while_the_fast_path_opens_its_pool_leaves_no_session(clean_db, admin):
    """Found by attack (older than the pool): close() that came while the first statement was
    opening the pool returned at once, and the pool was kept afterwards with its session open and
    serving."""
    from dsipam.server.domain import DatabaseUnavailable

    dsn, name = _named(clean_db)
    fast = FastPath(dsn, pool_size=2)
    first = asyncio.ensure_future(fast.fetch("SELECT 1"))
    await asyncio.sleep(0)  # it is connecting
    await fast.close()
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await first
    assert fast._pool is None
    assert await _sessions(admin, name, wait_for=0) == 0



async def test_close_ends_a_statement_blocked_behind_a_lock_after_settle_seconds(clean_db, caplog, admin):
    """Found by attack: close() waited for every connection in use with no bound, so a server whose
    batch was blocked behind a lock (DDL, a migration) did not stop until the lock went. It now ends
    them after ``settle_seconds``; their callers get DatabaseUnavailable."""
    from dsipam.server.domain import DatabaseUnavailable

    table = f"lock_{uuid.uuid4().hex[:8]}"
    fast = FastPath(clean_db, pool_size=2)
    try:
        await admin.execute(f"CREATE TABLE {table} (x int)")
        async with admin.transaction():
            await admin.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            blocked = asyncio.ensure_future(fast.fetch(f"SELECT count(*) FROM {table}"))
            await asyncio.sleep(0.3)
            assert not blocked.done()
            assert fast._pool is not None
            fast._pool.settle_seconds = 0.5
            started = time.monotonic()
            await asyncio.wait_for(fast.close(), 5)
            assert time.monotonic() - started < 2
            with pytest.raises(DatabaseUnavailable):
                await asyncio.wait_for(blocked, 5)
        assert "still run a statement after 0.5 s; they are ended" in caplog.text
    finally:
        await fast.close()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
