"""Watch fan-out: one reader of the event outbox per process feeds every watch stream.

The outbox ``ipam_events`` is the truth; a trigger (migration 0013) sends
``NOTIFY dsipam_events, '<pool id>'`` in every transaction that writes events. The hub LISTENs on
one dedicated connection (``application_name`` ``dsipam-watch``) and, when woken for a pool that
someone watches (or every ``fallback`` seconds, in case a wake-up is lost), reads the new events
of all watched pools in one query on that connection, in ``(xid, id)`` order below the horizon
(docs/lifecycle.md, "Watch"). Each stream takes its events from what that one read fetched,
from its own position, in memory: idle streams cost the database nothing.

A stream starts (or resumes from a token) with reads of its own until it has reached the
shared reader's position, then joins it. A stream that falls more than ``buffer`` events behind
(a slow client) is detached, logged and counted, and catches up again with reads of its own
from the last event it delivered: it misses nothing and sees nothing twice. When the listener
connection breaks (a database outage), it is logged at ERROR, counted and opened again; the
reader then reads from where it was, so nothing is missed either.

Watch streams are bounded per process and per caller identity (RESOURCE_EXHAUSTED naming the
setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge
from sqlalchemy import text

from ..background import report as report_background_error
from ..domain import (
    AddressInfo,
    DatabaseUnavailable,
    InvalidArgument,
    PoolExhausted,
    PoolNotFound,
    ResumeTokenExpired,
    check_pool_name,
)
from ._base import (
    KEY_REFRESH_SECONDS,
    TOKEN_KEYS,
    StoredPool,
    bad_token,
    decode_token,
    encode_token,
    load_database_token_keys,
)
from .db import unavailable_on_disconnect

log = logging.getLogger("dsipam.store.watch")

CHANNEL = "dsipam_events"
EVENT_RETENTION_SECONDS = 3600.0
READ_LIMIT = 500  # events per read of the outbox
_MAX_XID = 2**64 - 1
_MAX_ID = 2**63 - 1
_MAX_POOL_ID = 2**31 - 1
_CLOCK_SKEW = 300.0  # a resume token's time may be this far ahead of ours (another replica's clock)

# Process-wide metrics; the server registers them in its registry (app.py).
WATCH_STREAMS = Gauge("dsipam_watch_streams", "Open WatchAllocations streams.", registry=None)
WATCH_REFUSED = Counter("dsipam_watch_refused", "Watch streams refused by a bound, by setting.", ["bound"],
                        registry=None)
WATCH_OVERFLOWS = Counter("dsipam_watch_overflows", "Watch streams that fell behind and caught up on their own.",
                          registry=None)
WATCH_LISTENER_FAILURES = Counter("dsipam_watch_listener_failures",
                                  "Times the watch listener connection failed and was opened again.", registry=None)
WATCH_READS = Counter("dsipam_watch_reads", "Reads of the event outbox, by reader (shared, stream).", ["reader"],
                      registry=None)
TOKEN_KEY_FAILURES = Counter("dsipam_token_key_refresh_failures",
                             "Failed reloads of the token keys from the database.", registry=None)
METRICS = (WATCH_STREAMS, WATCH_REFUSED, WATCH_OVERFLOWS, WATCH_LISTENER_FAILURES, WATCH_READS, TOKEN_KEY_FAILURES)


class TooManyWatchStreams(PoolExhausted):
    """A watch-stream bound is reached (RESOURCE_EXHAUSTED)."""

    reason = "TOO_MANY_WATCH_STREAMS"


Position = tuple[int, int]  # (xid, id): everything at or before it has been delivered


@dataclass(frozen=True)
class Event:
    type: int  # 1 allocated, 2 released
    owner: str
    addresses: tuple[AddressInfo, ...]
    time: dt.datetime
    token: str
    position: Position = (0, 0)
    # Whatever the RPC layer derives once per event (its protobuf message), shared by all streams.
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    stamp: float = field(default=0.0, compare=False, repr=False)  # the database's time of the read (its token's)


@dataclass(frozen=True)
class Bookmark:
    token: str
    position: Position = (0, 0)
    # As Event.cache: the idle bookmark of a pool is one object for all its streams.
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    stamp: float = field(default=0.0, compare=False, repr=False)  # as Event.stamp


# -- resume tokens ------------------------------------------------------------------------


def encode_position(pool_id: int, pos: Position, stamp: float, skip: Skip | None = None) -> str:
    """A resume token; ``skip``, the events of a new watch's start that it must not send, goes in it
    while the position is below the last of them (and they are few enough: see Skip)."""
    value: dict[str, Any] = {"k": "watch", "p": pool_id, "x": str(pos[0]), "i": pos[1], "t": stamp}
    if skip is not None and pos[0] < skip.xmax:
        running = sorted(x for x in skip.running if x >= pos[0])  # below the position they no longer matter
        xmax = skip.xmax
        if len(running) > MAX_TOKEN_SKIP:
            # Too many to carry: the skip is cut short at the first one left out. Below it, every xid
            # not named was still not running at the start: it skips less, never what it must send.
            xmax, running = running[MAX_TOKEN_SKIP], running[:MAX_TOKEN_SKIP]
        value["s"] = [str(xmax), *(str(x) for x in running)]
    return encode_token(value)


def decode_position(token: str) -> tuple[int, Position, float, Skip | None]:
    """(pool id, position, time, skip) of an authentic resume token, every field range-checked."""
    value = decode_token(token, "resume_token", "watch")
    assert value is not None
    p, x, i, t, sk = value.get("p"), value.get("x"), value.get("i"), value.get("t"), value.get("s")
    if type(p) is not int or not 0 < p <= _MAX_POOL_ID:
        raise bad_token("resume_token", "pool out of range")
    if not isinstance(x, str) or not x.isdigit() or len(x) > 20 or int(x) > _MAX_XID:
        raise bad_token("resume_token", "position out of range")
    if type(i) is not int or not 0 <= i <= _MAX_ID:
        raise bad_token("resume_token", "position out of range")
    if type(t) not in (int, float) or not math.isfinite(t) or not 0 < t <= time.time() + _CLOCK_SKEW:
        raise bad_token("resume_token", "time out of range")
    skip = None
    if sk is not None:
        if (type(sk) is not list or not 0 < len(sk) <= MAX_TOKEN_SKIP + 1
                or not all(isinstance(v, str) and v.isdigit() and len(v) <= 20 and int(v) <= _MAX_XID for v in sk)):
            raise bad_token("resume_token", "skip out of range")
        skip = Skip(int(sk[0]), frozenset(int(v) for v in sk[1:]))
    return p, (int(x), i), float(t), skip


# -- reads of the outbox --------------------------------------------------------------------

_SQL_POOL_EVENTS = text(
    """
    SELECT e.id, e.xid::text AS xid, e.type, e.owner, host(e.ipv4) AS ipv4,
           host(e.ipv6) AS ipv6, e.time, h.horizon::text AS horizon, h.now
      FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon, now() AS now) h
      LEFT JOIN ipam_events e
        ON e.pool_id = :pool
       AND (e.xid, e.id) > (CAST(CAST(:xid AS text) AS xid8), :id)
       AND e.xid < h.horizon
     ORDER BY e.xid, e.id
     LIMIT :limit
    """
)

# The shared read: all watched pools at once; also which of them still exist, and whether
# events wait above the horizon (then the next read comes soon, not at the fallback).
_SQL_SHARED_EVENTS = """
    WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon, now() AS now)
    SELECT e.id, e.pool_id, e.xid::text AS xid, e.type, e.owner, host(e.ipv4) AS ipv4, host(e.ipv6) AS ipv6, e.time,
           h.horizon::text AS horizon, h.now,
           ARRAY(SELECT id FROM ipam_pools WHERE id = ANY($1::int[])) AS alive,
           EXISTS(SELECT 1 FROM ipam_events w WHERE w.pool_id = ANY($1::int[]) AND w.xid >= h.horizon) AS pending
      FROM h
      LEFT JOIN ipam_events e
        ON e.pool_id = ANY($1::int[])
       AND (e.xid, e.id) > ($2::text::xid8, $3::bigint)
       AND e.xid < h.horizon
     ORDER BY e.xid, e.id
     LIMIT $4
"""
# A new watch's start: its snapshot (``xmin:xmax:xip``), taken by this one statement.
_SQL_START = text("SELECT pg_current_snapshot()::text AS snapshot, pg_is_in_recovery() AS recovery, now() AS now")
MAX_TOKEN_SKIP = 24  # running xids a resume token carries (more: its skip is cut short, and a resume may resend)


@dataclass(frozen=True)
class Skip:
    """What a new watch must not send although it is after its position. A new watch starts at the
    oldest transaction then running (its snapshot's xmin), so that none that commits later is
    missed; the transactions between xmin and xmax that were not running had already committed, and
    their events are from before the watch. Kept as xmax and the running xids: bounded by the
    connections, not by how much committed. Dropped once the position reaches xmax; resume tokens
    taken before that carry it."""

    xmax: int
    running: frozenset[int]

    def skips(self, xid: int) -> bool:
        """True for an event (at or above the start) of a transaction committed before the start."""
        return xid < self.xmax and xid not in self.running


def _with_skip(pool_id: int, item: Event | Bookmark, skip: Skip, stamp: float) -> Event | Bookmark:
    """``item`` with a resume token that carries ``skip`` (the shared item's token does not), of the
    item's own time (``stamp`` for an item made without one)."""
    when = item.stamp or stamp
    return replace(item, token=encode_position(pool_id, item.position, when, skip), cache={}, stamp=when)


def _event(pool: StoredPool, row: Any, stamp: float) -> Event:
    pos = (int(row["xid"]), int(row["id"]))
    addrs = tuple(pool.address_info(ipaddress.ip_address(row[c])) for c in ("ipv4", "ipv6") if row[c])
    return Event(row["type"], row["owner"], addrs, row["time"], encode_position(pool.id, pos, stamp), pos,
                 stamp=stamp)


async def new_watch_start(store: Any, name: str) -> tuple[StoredPool, Position, float, Skip | None]:
    """A new watch: the pool, the position it starts at, the database's time, and what after that
    position had committed before it (Skip; None when nothing had)."""
    with unavailable_on_disconnect():
        async with store.engine.connect() as conn:
            pool = await store._load_pool(conn, name)
            row = (await conn.execute(_SQL_START)).mappings().one()
    xmin, xmax, xip = row["snapshot"].split(":")
    skip = None
    if row["recovery"]:
        # A standby's snapshot lists no running xids (they are in its subxip): skipping by it could
        # drop events of transactions that commit later. Nothing is skipped there: earlier events
        # may be sent, none is lost.
        log.warning("a new watch of pool %s started on a server in recovery: events that committed just before "
                    "it may be sent to it", name)
    elif int(xmax) > int(xmin):
        skip = Skip(int(xmax), frozenset(int(x) for x in xip.split(",") if x))
    return pool, (int(xmin), 0), row["now"].timestamp(), skip


async def read_pool_events(store: Any, name: str, pos: Position,
                           limit: int = READ_LIMIT) -> tuple[StoredPool, list[Event], Position, float]:
    """One read of its own: the pool, its events after ``pos``, the position reached and the
    database's time (a new watch starts with new_watch_start instead)."""
    with unavailable_on_disconnect():
        async with store.engine.connect() as conn:
            pool = await store._load_pool(conn, name)
            rows = (
                await conn.execute(
                    _SQL_POOL_EVENTS, {"pool": pool.id, "xid": str(pos[0]), "id": pos[1], "limit": limit},
                )
            ).mappings().all()
    WATCH_READS.labels("stream").inc()
    stamp = rows[0]["now"].timestamp()
    events = [_event(pool, r, stamp) for r in rows if r["id"] is not None]
    if len(events) < limit:  # everything below the horizon is delivered: move up to it
        reached: Position = (int(rows[0]["horizon"]), 0)
    else:
        reached = events[-1].position
    return pool, events, max(reached, pos), stamp


async def read_events(store: Any, name: str, token: str, limit: int = READ_LIMIT) -> tuple[list[Event], str]:
    """Events of pool ``name`` after ``token`` (a new watch: none, and the current position)."""
    check_pool_name(name, "pool")
    start = check_resume(name, token)
    if start is None:
        pool, reached, stamp, skip = await new_watch_start(store, name)
        return [], encode_position(pool.id, reached, stamp, skip)
    pool, events, reached, stamp = await read_pool_events(store, name, start[1], limit)
    check_resume_pool(start, pool)
    skip = start[3]
    if skip is not None:
        events = [e for e in events if not skip.skips(e.position[0])]
        events = [e if e.position[0] >= skip.xmax else _with_skip(pool.id, e, skip, stamp) for e in events]
    return events, encode_position(pool.id, reached, stamp, skip)


def check_resume(name: str, token: str) -> tuple[int, Position, float, Skip | None] | None:
    if not token:
        return None
    pool_id, pos, stamp, skip = decode_position(token)
    if time.time() - stamp > EVENT_RETENTION_SECONDS:
        raise ResumeTokenExpired(
            f"resume_token: older than the {EVENT_RETENTION_SECONDS:.0f}s event retention; "
            "list allocations and watch again without a token",
            field="resume_token",
        )
    return pool_id, pos, stamp, skip


def check_resume_pool(start: tuple[int, Position, float, Skip | None], pool: StoredPool) -> None:
    if start[0] != pool.id:
        raise InvalidArgument("resume_token: belongs to another pool", field="resume_token")


# -- the hub ----------------------------------------------------------------------------------


class _Subscriber:
    __slots__ = ("bookmark", "deleted", "items", "joined", "last_sent", "live", "overflowed", "pool_id", "wake")

    def __init__(self, pool_id: int, joined: Position) -> None:
        self.pool_id = pool_id
        self.joined = joined  # the shared reader's position when this stream joined it
        self.items: deque[Event] = deque()
        self.overflowed = False
        self.deleted = False
        self.wake = asyncio.Event()
        self.live = False  # taking events from the shared reader (not catching up on its own)
        self.last_sent = time.monotonic()
        self.bookmark: Bookmark | None = None  # due: set by the bookmark ticker


class WatchHub:
    def __init__(self, store: Any, url: str, *, pgbouncer: bool = False, max_streams: int = 1000,
                 max_per_identity: int = 200, buffer: int = 1000, fallback: float = 5.0,
                 bookmark_every: float = 30.0) -> None:
        self.store = store
        self.url = url
        self.pgbouncer = pgbouncer
        self.max_streams = max_streams
        self.max_per_identity = max_per_identity
        self.buffer = buffer
        self.fallback = fallback
        self.bookmark_every = bookmark_every
        self.streams = 0
        self._per_identity: dict[str, int] = {}
        self._subs: dict[int, set[_Subscriber]] = {}
        self._position: Position | None = None  # the shared reader's; None while nobody watches
        self._stamp = 0.0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # a shared read (fetch and push) or a subscription, not both
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.reads = 0  # shared reads of the outbox
        self.listener_failures = 0
        self.overflows = 0

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dsipam-watch")
        self._ticker = asyncio.create_task(self._tick_bookmarks(), name="dsipam-watch-bookmarks")

    async def stop(self) -> None:
        if self._ticker is not None:
            await cancel_and_wait(self._ticker)
            self._ticker = None
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._close("shutdown")

    async def _close(self, task: str = "watch") -> None:
        """Closes the listener connection. One the server or the network already broke is only
        dropped (its close may fail as an outage does); any other failure to close it is reported
        (background.report, under ``task``) and the connection is terminated."""
        from ._fast import is_outage

        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2.0)
        except Exception as exc:
            if not is_outage(exc):
                report_background_error(log, task, "closing the watch listener connection failed")
            else:
                log.debug("watch listener connection closed with an outage (%s: %s)", type(exc).__name__, exc)
            conn.terminate()

    # -- bounds -----------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, identity: str) -> Iterator[None]:
        """Counts one stream of ``identity`` while it is open; RESOURCE_EXHAUSTED past a bound."""
        if self.streams >= self.max_streams:
            WATCH_REFUSED.labels("DSIPAM_MAX_WATCH_STREAMS").inc()
            raise TooManyWatchStreams(
                f"pool: this server already serves {self.streams} watch streams, its bound "
                f"(DSIPAM_MAX_WATCH_STREAMS {self.max_streams}); retry later or on another replica",
                field="pool", bound="DSIPAM_MAX_WATCH_STREAMS", limit=str(self.max_streams),
            )
        mine = self._per_identity.get(identity, 0)
        if mine >= self.max_per_identity:
            WATCH_REFUSED.labels("DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY").inc()
            raise TooManyWatchStreams(
                f"pool: {identity or 'this caller'} already has {mine} watch streams open on this server, the "
                f"bound per caller (DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY {self.max_per_identity}); close one first",
                field="pool", bound="DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY", limit=str(self.max_per_identity),
            )
        self.streams += 1
        self._per_identity[identity] = mine + 1
        WATCH_STREAMS.inc()
        try:
            yield
        finally:
            self.streams -= 1
            left = self._per_identity[identity] - 1
            if left:
                self._per_identity[identity] = left
            else:
                del self._per_identity[identity]
            WATCH_STREAMS.dec()

    # -- streams ----------------------------------------------------------------------

    async def watch(self, name: str, token: str) -> AsyncIterator[Event | Bookmark]:
        """The stream of one watch: a bookmark of where it starts, then events (and a bookmark
        after ``bookmark_every`` seconds without one)."""
        check_pool_name(name, "pool")
        start = check_resume(name, token)
        skip: Skip | None
        if start is None:
            pool, pos, stamp, skip = await new_watch_start(self.store, name)
            events: list[Event] = []
        else:
            pool, events, pos, stamp = await read_pool_events(self.store, name, start[1])
            check_resume_pool(start, pool)
            skip = start[3]
        yield Bookmark(token or encode_position(pool.id, pos, stamp, skip))
        sub: _Subscriber | None = None
        try:
            while True:
                # Catch up with reads of our own until at (or past) the shared reader's position.
                while True:
                    for e in events:
                        if skip is None or e.position[0] >= skip.xmax:
                            yield e
                        elif not skip.skips(e.position[0]):
                            yield _with_skip(pool.id, e, skip, stamp)
                    if skip is not None and pos[0] >= skip.xmax:
                        skip = None
                    caught_up = len(events) < READ_LIMIT
                    if caught_up and sub is None:
                        sub = await self._subscribe(pool.id, pos, stamp)
                    if caught_up and sub is not None and pos >= sub.joined:
                        break
                    pool, events, pos, stamp = await read_pool_events(self.store, name, pos)
                # Live: events from the shared reader.
                assert sub is not None
                async for item in self._live(sub, pool, pos):
                    if isinstance(item, Event):
                        pos = item.position
                        if skip is not None and skip.skips(pos[0]):
                            continue
                    if skip is not None:
                        if item.position[0] >= skip.xmax:
                            skip = None
                        else:
                            item = _with_skip(pool.id, item, skip, self._stamp or stamp)
                    yield item
                # Fell behind: detached; catch up on our own from the last event delivered.
                self.overflows += 1
                WATCH_OVERFLOWS.inc()
                log.warning("a watch stream of pool %s fell behind by more than %d events; it catches up from "
                            "its last event with reads of its own", name, self.buffer)
                sub = None
                pool, events, pos, stamp = await read_pool_events(self.store, name, pos)
        finally:
            if sub is not None:
                self._unsubscribe(sub)

    async def _live(self, sub: _Subscriber, pool: StoredPool, pos: Position) -> AsyncIterator[Event | Bookmark]:
        """Events (after ``pos``) and bookmarks until the subscriber overflows. No timer per
        stream: the hub's ticker hands idle streams their bookmark."""
        sub.live, sub.last_sent = True, time.monotonic()
        try:
            while True:
                while sub.items:
                    e = sub.items.popleft()
                    if e.position > pos:
                        pos = e.position
                        sub.last_sent = time.monotonic()
                        yield e
                if sub.deleted:
                    raise PoolNotFound(f"pool: pool {pool.name!r} not found (deleted while watched)", field="pool",
                                       pool=pool.name)
                if sub.overflowed:
                    return
                mark, sub.bookmark = sub.bookmark, None
                if mark is not None:
                    # Everything pushed before the tick has been sent (the ticker only marks
                    # streams with nothing queued), so the shared position holds for this one.
                    if mark.position < pos:
                        now = self._stamp or time.time()
                        mark = Bookmark(encode_position(pool.id, pos, now), pos, stamp=now)
                    sub.last_sent = time.monotonic()
                    yield mark
                    continue
                sub.wake.clear()
                await sub.wake.wait()
        finally:
            sub.live = False

    async def _tick_bookmarks(self) -> None:
        """Once a second: streams that sent nothing for ``bookmark_every`` seconds get a bookmark
        (one token per pool and tick)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            due = now - self.bookmark_every
            for pool_id, subs in list(self._subs.items()):
                mark = None
                for sub in subs:
                    if sub.live and sub.last_sent <= due and sub.bookmark is None and not sub.items:
                        if mark is None:
                            assert self._position is not None
                            mark = Bookmark(encode_position(pool_id, self._position, self._stamp), self._position,
                                            stamp=self._stamp)
                        sub.bookmark = mark
                        sub.wake.set()

    async def _subscribe(self, pool_id: int, pos: Position, stamp: float) -> _Subscriber:
        """Joins the shared reader. Under the read lock: a read in flight has pushed all it
        fetched, so every event after ``joined`` reaches this subscriber."""
        async with self._lock:
            if not self._subs:  # nobody watched: the shared reader goes on from here, never back
                self._position = pos if self._position is None else max(self._position, pos)
                self._stamp = stamp
            assert self._position is not None
            sub = _Subscriber(pool_id, self._position)
            first = pool_id not in self._subs
            self._subs.setdefault(pool_id, set()).add(sub)
        if first:
            self._wake.set()  # a wake-up for this pool may have come before it was watched
        return sub

    def _unsubscribe(self, sub: _Subscriber) -> None:
        subs = self._subs.get(sub.pool_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.pool_id]

    # -- the shared reader ------------------------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            pool_id = int(payload)
        except ValueError:
            return
        if pool_id in self._subs:
            self._wake.set()

    def _on_lost(self, conn: Any) -> None:
        self._wake.set()  # the loop notices the closed connection at once

    async def _connect(self) -> asyncpg.Connection:
        from ._fast import asyncpg_dsn, session_args

        conn = await asyncpg.connect(
            asyncpg_dsn(self.url), statement_cache_size=0 if self.pgbouncer else 20,
            **session_args(self.url, "dsipam-watch", 10),
        )
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_lost)
        return conn

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                    if backoff > 0.2:
                        log.warning("watch listener connected again; streams catch up from where they were")
                    self._wake.set()  # wake-ups may have been lost meanwhile
                backoff = 0.2
                await self._serve(self._conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - counted, logged, the listener is opened again
                self.listener_failures += 1
                WATCH_LISTENER_FAILURES.inc()
                # ERROR once per outage (the first failure), then DEBUG while it lasts.
                log.log(logging.ERROR if backoff == 0.2 else logging.DEBUG,
                        "watch listener failed (%s: %s); opening it again in %.1fs", type(exc).__name__, exc, backoff)
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _serve(self, conn: asyncpg.Connection) -> None:
        soon = 0.0  # a quicker next read while events wait above the horizon
        while True:
            timeout = soon or self.fallback
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if conn.is_closed():
                raise ConnectionError("the listener connection was closed")
            self._wake.clear()
            if not self._subs or self._position is None:
                soon = 0.0
                continue
            async with self._lock:
                pending = await self._read(conn)
            soon = min(max(soon * 2, 0.02), 1.0) if pending else 0.0
            await asyncio.sleep(0.005)  # wake-ups arriving meanwhile are served by one read

    async def _read(self, conn: asyncpg.Connection) -> bool:
        """Reads the new events of every watched pool once and pushes them to the streams
        (under the read lock). True when events wait above the horizon."""
        while True:
            assert self._position is not None
            pools = list(self._subs)
            if not pools:
                return False
            pos = self._position
            rows = await conn.fetch(_SQL_SHARED_EVENTS, pools, str(pos[0]), pos[1], READ_LIMIT)
            self.reads += 1
            WATCH_READS.labels("shared").inc()
            head = rows[0]
            stamp = head["now"].timestamp()
            got = [r for r in rows if r["id"] is not None]
            layouts: dict[int, StoredPool | None] = {}
            for r in got:
                if r["pool_id"] not in layouts:
                    layouts[r["pool_id"]] = await self._layout(r["pool_id"])
            # From here on nothing awaits: the pushes and the new position are one step.
            alive = set(head["alive"])
            for pool_id in pools:
                if pool_id not in alive:
                    self._end_pool(pool_id)
            for r in got:
                subs = self._subs.get(r["pool_id"])
                pool = layouts[r["pool_id"]]
                if subs and pool is not None:
                    self._push(subs, _event(pool, r, stamp))
            full = len(got) == READ_LIMIT
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shared read: %d pools, %d events, horizon %s, pending %s", len(pools), len(got),
                          head["horizon"], head["pending"])
            reached = (int(got[-1]["xid"]), int(got[-1]["id"])) if full else (int(head["horizon"]), 0)
            self._position, self._stamp = max(reached, pos), stamp
            if not full:
                return bool(head["pending"])

    async def _layout(self, pool_id: int) -> StoredPool | None:
        with unavailable_on_disconnect():
            async with self.store.engine.connect() as conn:
                return await self.store._load_pool_by_id(conn, pool_id)  # type: ignore[no-any-return]

    def _push(self, subs: set[_Subscriber], event: Event) -> None:
        behind = []
        for sub in subs:
            if len(sub.items) >= self.buffer:
                sub.overflowed = True
                sub.items.clear()
                behind.append(sub)
            else:
                sub.items.append(event)
            sub.wake.set()
        for sub in behind:  # detached: it catches up on its own and joins again
            self._unsubscribe(sub)

    def _end_pool(self, pool_id: int) -> None:
        for sub in self._subs.pop(pool_id, set()):
            sub.deleted = True
            sub.wake.set()


async def refresh_token_keys(engine: Any, interval: float = KEY_REFRESH_SECONDS, *, failed: int = 0) -> None:
    """Reloads the database's token keys every ``interval`` seconds (a rotation reaches every
    replica), every second while they could not be read at all. Every failed attempt is counted
    (dsipam_token_key_refresh_failures); an outage is logged once at ERROR (its first failure;
    ``failed`` attempts had failed before this loop started) and its end once at INFO."""
    while True:
        await asyncio.sleep(1.0 if TOKEN_KEYS.waiting else interval)
        try:
            await load_database_token_keys(engine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted and logged; the keys loaded before stay in use
            TOKEN_KEY_FAILURES.inc()
            log.log(logging.DEBUG if failed else logging.ERROR, "token keys not %s from the database (%s: %s)%s",
                    "read" if TOKEN_KEYS.waiting else "reloaded", type(exc).__name__, exc,
                    "; reading them again every second" if TOKEN_KEYS.waiting else "; the loaded keys stay in use")
            failed += 1
        else:
            if failed:
                log.info("token keys read from the database again (after %d failed attempt%s)", failed,
                         "" if failed == 1 else "s")
            failed = 0


@dataclass
class WatchService:
    """What app.py starts and stops: the token keys and the watch hub."""

    hub: WatchHub
    tasks: list[asyncio.Task[None]]

    async def stop(self) -> None:
        for task in self.tasks:
            await cancel_and_wait(task)
        await self.hub.stop()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancels one of our background tasks and waits for its end. Its CancelledError is the
    expected end (re-raised only when the caller itself is being cancelled); a task that had
    ended with any other exception is reported (background.report, "shutdown")."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # noqa: BLE001 - the task had died before: stopping anyway, but not silently
        report_background_error(log, "shutdown", "background task %s had failed", task.get_name())


def configured_token_keys(settings: Any) -> list[bytes]:
    """The keys of DSIPAM_TOKEN_KEY_FILE or DSIPAM_TOKEN_KEY (none: the database's are used)."""
    from ..settings import SettingError
    from ._base import parse_token_keys

    where, value = "DSIPAM_TOKEN_KEY", settings.token_key
    if settings.token_key_file:
        where = f"DSIPAM_TOKEN_KEY_FILE {settings.token_key_file}"
        try:
            with open(settings.token_key_file, encoding="utf-8") as f:
                value = f.read()
        except OSError as exc:
            raise SettingError(f"{where}: {exc.strerror}") from None
    if not value:
        return []
    try:
        return parse_token_keys(value, where)
    except ValueError as exc:
        raise SettingError(str(exc)) from None


async def start_watch(store: Any, settings: Any) -> WatchService:
    """Loads the token keys (configured, else the database's) and starts the watch hub."""
    tasks: list[asyncio.Task[None]] = []
    keys = configured_token_keys(settings)
    if keys:
        TOKEN_KEYS.use(keys)
    else:
        failed = 0
        try:
            await load_database_token_keys(store.engine)
        except DatabaseUnavailable as exc:  # the server starts anyway; calls that need a token wait
            TOKEN_KEY_FAILURES.inc()
            log.error("token keys not read from the database (%s); reading them again every second", exc)
            TOKEN_KEYS.waiting = True
            failed = 1
        tasks.append(asyncio.create_task(refresh_token_keys(store.engine, failed=failed)))
    hub = WatchHub(store, settings.database_url, pgbouncer=settings.db_pgbouncer,
                   max_streams=settings.max_watch_streams, max_per_identity=settings.max_watch_streams_per_identity,
                   buffer=settings.watch_buffer, fallback=settings.watch_fallback_seconds)
    store.watch = hub
    await hub.start()
    return WatchService(hub, tasks)
