"""Shared parts of the store: stored pool layouts, page tokens, transactions."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..domain import (
    AddressInfo,
    AllocationInfo,
    Conflict,
    DatabaseUnavailable,
    Family,
    FamilyUsage,
    InvalidArgument,
    PoolInfo,
    PoolNotFound,
    PoolSpec,
    RangeSpec,
    build_range,
)
from ..domain._model import PoolLimits, set_pool_limits
from ..domain._ranges import Cidr, IPAddress, ReservationIndex
from .db import (
    READ_ONLY_MESSAGE,
    RECONNECTS,
    RETRYABLE_SQLSTATES,
    LogEvery,
    is_ended_while_idle,
    is_read_only,
    sqlstate,
    unavailable_on_disconnect,
)

log = logging.getLogger("dsipam.store")

T = TypeVar("T")
MAX_ATTEMPTS = 10
RECONNECT_ATTEMPTS = 3
"""Times a transaction runs again on a new connection after one that could not have written anything
(see :meth:`StoreBase._transaction`; once for a read-only server); beyond that the caller gets UNAVAILABLE."""
_RECONNECT_LOG = LogEvery(1.0)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
FAMILY_COLUMN = {Family.IPV4: "ipv4", Family.IPV6: "ipv6"}


class Retry(Exception):
    """Internal: the transaction lost a race; run it again."""


class Reclaim(Exception):
    """Internal: a family ran out but holds addresses whose cooldown has passed."""

    def __init__(self, pool_id: int, family: Family) -> None:
        self.pool_id, self.family = pool_id, family


@dataclass(frozen=True)
class StoredRange:
    id: int
    spec: RangeSpec
    static_size: int  # size without reservations


@dataclass(frozen=True)
class StoredPool:
    id: int
    name: str
    labels: dict[str, str]
    create_time: dt.datetime
    cooldown_ms: int
    version: int
    ranges: tuple[StoredRange, ...]
    reservations: tuple[Cidr, ...]  # sorted (family, address, prefix length)
    strict_affinity: bool = False
    network: str = ""  # changes only with the version (migration 0012), so a cached layout keeps it

    @cached_property
    def spec(self) -> PoolSpec:
        """One PoolSpec per cached layout (the conversion to protobuf keeps its ranges' part by it)."""
        return PoolSpec(
            name=self.name,
            ranges=tuple(r.spec for r in self.ranges),
            labels=self.labels,
            cooldown_ms=self.cooldown_ms,
            strict_affinity=self.strict_affinity,
            network=self.network,
        )

    @cached_property
    def families(self) -> tuple[Family, ...]:
        """The pool's families in range order (computed once per cached layout)."""
        return tuple(dict.fromkeys(r.spec.family for r in self.ranges))

    def ranges_of(self, family: Family) -> list[StoredRange]:
        return [r for r in self.ranges if r.spec.family is family]

    @cached_property
    def sizes(self) -> dict[Family, int]:
        """The addresses the ranges of each family can hand out (excludes and reservations taken out)."""
        return {f: sum(r.spec.size for r in self.ranges_of(f)) for f in self.families}

    @cached_property
    def reservation_texts(self) -> tuple[str, ...]:
        return tuple(str(r) for r in self.reservations)

    def range_by_id(self, range_id: int) -> StoredRange | None:
        return next((r for r in self.ranges if r.id == range_id), None)

    @cached_property
    def _bounds(self) -> dict[Family, tuple[tuple[int, int, StoredRange, int, str], ...]]:
        """Each family's ranges as integer bounds (containment without building addresses), with
        the prefix length and gateway text every address of the range is reported with."""
        out: dict[Family, list[tuple[int, int, StoredRange, int, str]]] = {Family.IPV4: [], Family.IPV6: []}
        for r in self.ranges:
            net, gw = r.spec.network, r.spec.gateway
            out[r.spec.family].append(
                (int(net.network_address), int(net.broadcast_address), r, r.spec.prefix_length, str(gw) if gw else "")
            )
        return {f: tuple(v) for f, v in out.items()}

    def _bound_of(self, fam: Family, n: int) -> tuple[int, int, StoredRange, int, str] | None:
        for bound in self._bounds[fam]:
            if bound[0] <= n <= bound[1]:
                return bound
        return None

    def range_holding(self, value: IPAddress) -> StoredRange | None:
        bound = self._bound_of(Family(value.version), int(value))
        return None if bound is None else bound[2]

    def address_info(self, value: IPAddress | str) -> AddressInfo:
        """What a caller is told of an address: from an address object, or from PostgreSQL's
        text of one (parsed by the C library, not by ``ipaddress``: this runs on every answer)."""
        if isinstance(value, str):  # the bound search inlined: ~0.3 µs of ~0.8 per address
            if ":" in value:
                fam, n = _IPV6, _from_bytes(_inet_pton(_AF_INET6, value))
            else:
                fam, n = _IPV4, _from_bytes(_inet_pton(_AF_INET, value))
            for bound in self._bounds[fam]:
                if bound[0] <= n <= bound[1]:
                    return AddressInfo(fam, value, bound[3], bound[4])
            return AddressInfo(fam, value, fam.bits, "")  # a range was removed under a live allocation
        fam, ip, n = Family(value.version), str(value), int(value)
        found = self._bound_of(fam, n)
        if found is None:  # a range was removed under a live allocation; report what is known
            return AddressInfo(fam, ip, fam.bits, "")
        return AddressInfo(fam, ip, found[3], found[4])


_IPV4, _IPV6 = Family.IPV4, Family.IPV6
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton = socket.inet_pton
_from_bytes = int.from_bytes


# -- tokens -------------------------------------------------------------------------------
#
# Page and resume tokens are opaque to callers and cannot be forged: each is
#   base64url( version (1) | key id (4) | payload JSON | HMAC-SHA256(key, version | key id | payload)[:16] )
# The payload names the kind of token ("k") and is only parsed once the MAC is right; callers
# then range-check every field (defense in depth). Keys: docs/security.md, "Page and resume tokens".

TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 1024  # every token this service makes is far shorter
MIN_KEY_BYTES = 32
_MAC_BYTES = 16
_KID_BYTES = 4
_MAX_PAGE_AFTER = 253  # the longest owner (MAX_OWNER); pool names are shorter


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"dsipam-token-key-id\x00" + key).digest()[:_KID_BYTES]


class TokenKeys:
    """The keys that sign (one) and verify (it and the others) tokens, process-wide.

    Until a server loads the deployment's keys (``settings`` or the database), a random key
    of this process signs: tokens still cannot be forged, but only this process accepts them."""

    def __init__(self) -> None:
        self.source = "process"
        self.waiting = False  # the database's keys are to be used but could not be read yet
        self._set([os.urandom(MIN_KEY_BYTES)], 0)

    def _set(self, keys: Sequence[bytes], signing: int) -> None:
        self._verify = {key_id(k): k for k in keys}
        self._signing = (key_id(keys[signing]), keys[signing])

    def use(self, keys: Sequence[bytes], signing: int = 0, source: str = "settings") -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        self._set(keys, signing)
        self.source = source
        self.waiting = False

    def check_ready(self) -> None:
        if self.waiting:
            raise DatabaseUnavailable("database: the token keys are not loaded yet (the database was unreachable "
                                      "at start-up); retry")

    @property
    def signing_id(self) -> bytes:
        return self._signing[0]

    def accepted_ids(self) -> set[bytes]:
        return set(self._verify)

    def sign(self, payload: bytes) -> bytes:
        kid, key = self._signing
        head = bytes([TOKEN_VERSION]) + kid
        mac = hmac.new(key, head + payload, hashlib.sha256).digest()[:_MAC_BYTES]
        return head + payload + mac

    def verify(self, raw: bytes) -> bytes | None:
        """The payload of an authentic token, else None."""
        if len(raw) < 1 + _KID_BYTES + _MAC_BYTES or raw[0] != TOKEN_VERSION:
            return None
        key = self._verify.get(raw[1:1 + _KID_BYTES])
        if key is None:
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES], mac):
            return None
        return body[1 + _KID_BYTES:]


TOKEN_KEYS = TokenKeys()


def parse_token_keys(value: str, where: str) -> list[bytes]:
    """Keys from a setting: separated by commas or new lines, the first signs; each at least 32 bytes."""
    keys = [k.strip().encode() for k in value.replace("\n", ",").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"{where}: no key")
    for i, k in enumerate(keys):
        if len(k) < MIN_KEY_BYTES:
            raise ValueError(f"{where}: key {i + 1} has {len(k)} bytes; at least {MIN_KEY_BYTES} are needed")
    return keys


def encode_token(payload: dict[str, Any]) -> str:
    """A signed token for ``payload``, which names its kind in ``k``."""
    TOKEN_KEYS.check_ready()
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return base64.urlsafe_b64encode(TOKEN_KEYS.sign(body)).decode().rstrip("=")


def decode_token(token: str, where: str = "page_token", kind: str = "") -> dict[str, Any] | None:
    """The payload of a token this service made (of ``kind``), None for an empty token; anything
    else is INVALID_ARGUMENT naming ``where``. Forged, changed, foreign-key or other-kind tokens
    never reach a parser: the MAC is checked first."""
    if not token:
        return None
    TOKEN_KEYS.check_ready()
    value: Any = None
    if len(token) <= MAX_TOKEN_CHARS and token.isascii():
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raw = b""
        payload = TOKEN_KEYS.verify(raw) if raw else None
        if payload is not None:
            try:
                value = json.loads(payload, parse_constant=_no_constant)
            except (ValueError, TypeError, RecursionError):
                value = None
    if not isinstance(value, dict) or value.get("k") != kind:
        raise InvalidArgument(f"{where}: not a token returned by this call of this service", field=where)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def bad_token(where: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: not a valid token ({why})", field=where)


_PAGE_KINDS = ("allocations", "pools", "blocks")


def page_scope(pool: str = "", **filters: Any) -> dict[str, str]:
    """What binds a page token to its request: the pool, and a short digest of every filter
    (everything but ``page_token`` and ``page_size``) in a canonical form. The MAC covers both."""
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return {"p": pool, "f": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


def encode_page_token(after: str, kind: str = "allocations", scope: dict[str, str] | None = None) -> str:
    """The token of the page after ``after``. ``kind``: the listing (ListAllocations by default,
    "pools", "blocks"); ``scope``: its request (``page_scope``). A token is accepted only by the
    listing that made it, for the same pool and filters."""
    return encode_token({"k": kind, "a": after, **(scope or page_scope())})


def decode_page_token(token: str, kind: str = "allocations", scope: dict[str, str] | None = None) -> str | None:
    assert kind in _PAGE_KINDS
    value = decode_token(token, "page_token", kind)
    if value is None:
        return None
    if any(value.get(k) != v for k, v in (scope or page_scope()).items()):
        raise InvalidArgument("page_token: belongs to another request (pool or filters differ)", field="page_token")
    after = value.get("a")
    if not isinstance(after, str) or not 0 < len(after) <= _MAX_PAGE_AFTER or not (
        after.isascii() and after.isprintable() and " " not in after
    ):
        raise bad_token("page_token", "position out of range")
    if kind == "blocks" and not (after.isdigit() and len(after) <= 18):
        raise bad_token("page_token", "position out of range")
    return after


# Keys kept in the database (migration 0013): the newest three rows are accepted; the newest row
# that every replica has had time to load (older than KEY_ACTIVATION_SECONDS) signs, and is
# accepted too even when newer rows have pushed it out of the three (so rotating several times
# within the delay never breaks a page in flight). Only when no row is that old (a new
# deployment) does the oldest row sign.
KEY_REFRESH_SECONDS = 30.0
KEY_ACTIVATION_SECONDS = 3 * KEY_REFRESH_SECONDS
_KEY_COLUMNS = "SELECT id, key, extract(epoch FROM now() - create_time)::float8 AS age FROM ipam_token_keys "
_SQL_TOKEN_KEYS = text(_KEY_COLUMNS + "ORDER BY id DESC LIMIT 3")
_SQL_SIGNING_KEY = text(
    _KEY_COLUMNS + "WHERE create_time <= now() - make_interval(secs => :delay) ORDER BY create_time DESC, id DESC LIMIT 1"
)
_SQL_OLDEST_KEY = text(_KEY_COLUMNS + "ORDER BY create_time, id LIMIT 1")
_SQL_FIRST_TOKEN_KEY = text(
    "INSERT INTO ipam_token_keys (key) SELECT CAST(:key AS bytea) WHERE NOT EXISTS (SELECT 1 FROM ipam_token_keys)"
)


async def load_database_token_keys(engine: AsyncEngine) -> None:
    """Loads the deployment's token keys from the database (making the first one if there is none)."""
    with unavailable_on_disconnect():
        async with engine.begin() as conn:
            rows = (await conn.execute(_SQL_TOKEN_KEYS)).all()
            if not rows:
                await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('dsipam.token-keys', 0))"))
                await conn.execute(_SQL_FIRST_TOKEN_KEY, {"key": os.urandom(MIN_KEY_BYTES)})
                rows = (await conn.execute(_SQL_TOKEN_KEYS)).all()
            signer = (await conn.execute(_SQL_SIGNING_KEY, {"delay": KEY_ACTIVATION_SECONDS})).first()
            if signer is None:
                signer = (await conn.execute(_SQL_OLDEST_KEY)).first()
    keys = [bytes(r.key) for r in rows]
    if signer is not None and signer.id not in {r.id for r in rows}:
        keys.append(bytes(signer.key))
    signing = keys.index(bytes(signer.key)) if signer is not None else len(keys) - 1
    TOKEN_KEYS.use(keys, signing, "database")


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size: {value} is negative", field="page_size")
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size: {value} is more than {MAX_PAGE_SIZE}", field="page_size")
    return value or DEFAULT_PAGE_SIZE


_SQL_POOL_HEAD = text(
    "SELECT id, name, labels, create_time, cooldown_ms, version, node_affinity, network FROM ipam_pools WHERE name = :name"
)
_SQL_POOL_HEAD_BY_ID = text(
    "SELECT id, name, labels, create_time, cooldown_ms, version, node_affinity, network FROM ipam_pools WHERE id = :id"
)
# The pool's reservations come once, with its first range (not once per range: a pool of 64
# ranges and 50,000 reservations would read 3.2 million of them).
_SQL_POOL_LAYOUT = text(
    """
    SELECT r.id AS range_id, host(r.cidr) || '/' || masklen(r.cidr) AS cidr,
           host(r.first_ip) AS first_ip, host(r.last_ip) AS last_ip, host(r.gateway) AS gateway,
           r.exclude::text[] AS exclude, r.block_prefix, r.size,
           CASE WHEN row_number() OVER (ORDER BY r.position) = 1 THEN
                (SELECT array_agg(c.cidr::text) FROM ipam_reservations c WHERE c.pool_id = :pool) END AS reservations
      FROM ipam_ranges r
     WHERE r.pool_id = :pool
     ORDER BY r.position
    """
)

# Layout work (parsing and sorting excludes and reservations: about 2 µs each) past this many
# of them runs in a worker thread, so that the event loop (health checks, every other call)
# is never held for more than a few milliseconds by one pool.
LAYOUT_THREAD_THRESHOLD = 5_000


async def off_loop(weight: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: in a worker thread when ``weight`` (the excludes and reservations it
    handles) passes :data:`LAYOUT_THREAD_THRESHOLD`, else at once."""
    if weight > LAYOUT_THREAD_THRESHOLD:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def build_layout(head: Any, rows: Sequence[Any]) -> StoredPool:
    """A pool's layout from its head and layout rows (pure CPU: may run in a thread)."""
    texts = (rows[0]["reservations"] if rows else None) or ()
    reservations = ReservationIndex(parse_stored_cidrs(texts))
    ranges = []
    for row in rows:
        spec = build_range(
            cidr=row["cidr"],
            first=row["first_ip"] or "",
            last=row["last_ip"] or "",
            gateway=row["gateway"] or "",
            exclude=row["exclude"] or (),
            policy=False,  # stored ranges may predate the range policy: they keep working
        )
        spec = replace(spec, block_prefix=row["block_prefix"]).with_reserved(reservations)
        warm(spec)
        ranges.append(StoredRange(row["range_id"], spec, int(row["size"])))
    return StoredPool(
        head["id"], head["name"], dict(head["labels"]), head["create_time"], head["cooldown_ms"],
        head["version"], tuple(ranges), reservations.all, head["node_affinity"] == 2, head["network"],
    )


def parse_stored_cidrs(texts: Sequence[str]) -> list[Cidr]:
    from ..domain._ranges import parse_cidrs

    return parse_cidrs(texts, lambda i: f"ipam_reservations.cidr[{i}]")


def warm(spec: RangeSpec) -> RangeSpec:
    """Computes a range's available intervals now (in the caller's thread), not at first use."""
    _ = spec.size, spec._starts  # noqa: SLF001 - the cached bisect keys
    return spec

_SQL_USAGE = text(
    """
    SELECT r.pool_id, r.family, sum(r.size) AS size,
           coalesce(sum(u.used), 0) AS used, coalesce(sum(u.cooling), 0) AS cooling
      FROM ipam_ranges r
      LEFT JOIN (SELECT range_id, sum(avail_count - free_count - cooling) AS used, sum(cooling) AS cooling
                   FROM ipam_blocks WHERE pool_id = ANY(:pools) GROUP BY range_id) u ON u.range_id = r.id
     WHERE r.pool_id = ANY(:pools)
     GROUP BY r.pool_id, r.family
    """
)


# The reads (GetPool, GetAllocation, ListAllocations, ListBlocks) are one statement each: the pool's
# head row (its id, version and the settings that change without a new version) and what was asked,
# from one snapshot. The layout (ranges, excludes, reservations) is the cached one of that version.
_HEAD = ("p.id, p.name, p.labels::text AS labels, p.create_time, p.cooldown_ms, p.version, p.node_affinity, "
         "p.network")
SQL_READ_POOL = f"""
    SELECT {_HEAD}, u.family, u.size, u.used, u.cooling
      FROM ipam_pools p
      LEFT JOIN LATERAL (
        SELECT r.family, sum(r.size) AS size, coalesce(sum(b.used), 0) AS used, coalesce(sum(b.cooling), 0) AS cooling
          FROM ipam_ranges r
          LEFT JOIN (SELECT range_id, sum(avail_count - free_count - cooling) AS used, sum(cooling) AS cooling
                       FROM ipam_blocks WHERE pool_id = p.id GROUP BY range_id) b ON b.range_id = r.id
         WHERE r.pool_id = p.id
         GROUP BY r.family) u ON true
     WHERE p.name = $1
"""
_ALLOCATION_COLUMNS = ("a.owner, host(a.ipv4) AS ipv4, host(a.ipv6) AS ipv6, a.attributes::text AS attributes, "
                       "a.create_time AS allocation_time, a.node AS allocation_node, a.borrowed")
SQL_READ_ALLOCATION = f"""
    SELECT {_HEAD}, {_ALLOCATION_COLUMNS}
      FROM ipam_pools p LEFT JOIN ipam_allocations a ON a.pool_id = p.id AND a.owner = $2
     WHERE p.name = $1
"""
# The same for the owners $2 of the GetAllocation callers that share one read (FastPath.fetch_shared):
# a row per owner found, or the head alone (owner NULL) when none is.
SQL_READ_ALLOCATIONS_OF = f"""
    SELECT {_HEAD}, {_ALLOCATION_COLUMNS}
      FROM ipam_pools p LEFT JOIN ipam_allocations a ON a.pool_id = p.id AND a.owner = ANY($2::text[])
     WHERE p.name = $1
"""


def _head_then_page(columns: str, names: tuple[str, ...], page: str, order: str) -> str:
    """A page read: the pool's head row first (the page's columns NULL), then the page's rows (the
    head's columns NULL), from one snapshot. The head's eight columns come once, not on each of a
    page's rows (whose decoding cost asyncpg ~70 µs a page of 100 allocations, 2026-12-06)."""
    heads = ", ".join(["NULL"] * len(_HEAD.split(", ")))
    nulls = ", ".join(f"NULL AS {name}" for name in names)
    return f"""
    SELECT 0 AS is_row, {_HEAD}, {nulls} FROM ipam_pools p WHERE p.name = $1
    UNION ALL
    SELECT 1, {heads}, {columns}
      FROM ipam_pools p CROSS JOIN LATERAL ({page}) a
     WHERE p.name = $1
     ORDER BY is_row, {order}
"""


_ALLOCATION_NAMES = ("owner", "ipv4", "ipv6", "attributes", "allocation_time", "allocation_node", "borrowed")


def sql_read_allocations(family_filter: str) -> str:
    """ListAllocations: the pool's head row, then a page of the pool's allocations after owner $2
    (NULL: the first page) whose attributes contain $3, at most $4 rows; ``family_filter`` is a fixed
    condition on a."""
    return _head_then_page(_ALLOCATION_COLUMNS, _ALLOCATION_NAMES, f"""
        SELECT * FROM ipam_allocations a
         WHERE a.pool_id = p.id AND ($2::text IS NULL OR a.owner > $2) AND a.attributes @> $3::jsonb{family_filter}
         ORDER BY a.owner LIMIT $4""", "owner")


# ListBlocks: the pool's head row, then a page of its blocks (of node $2, '' for all) after id $3.
SQL_READ_BLOCKS = _head_then_page(
    "a.id AS block_id, host(a.base) || '/' || masklen(a.base) AS cidr, a.family, a.node AS block_node, "
    "a.avail_count - a.free_count AS used, a.free_count AS free",
    ("block_id", "cidr", "family", "block_node", "used", "free"), """
        SELECT * FROM ipam_blocks b
         WHERE b.pool_id = p.id AND ($2 = '' OR b.node = $2) AND b.id > $3
         ORDER BY b.id LIMIT $4""", "block_id")


# True when the connection cannot write: a standby, or a session whose transactions are read-only
# (default_transaction_read_only, as a primary being demoted behind a pooler may be set).
_SQL_READ_ONLY = text("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'")


class StoreBase:
    """Transactions, pool layouts (cached by version) and usage."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._layouts: dict[int, StoredPool] = {}
        self._by_name: dict[str, StoredPool] = {}  # for the fast path, which checks the version itself
        self.fast: Any = None  # a _fast.FastPath when enabled
        self._topping_up: dict[int, asyncio.Task[None]] = {}  # pools whose spare blocks are being created
        self._fast_created: dict[int, int] = {}  # allocations made by the fast path, per pool
        self.retries = 0  # transactions run again after a lost race (deadlock, serialization, conflict)
        self._building: dict[tuple[int, int], asyncio.Future[StoredPool]] = {}  # layouts being built
        from ..settings import pool_limits_from_env

        excludes, reservations = pool_limits_from_env()
        set_pool_limits(PoolLimits(excludes, reservations))  # process-wide, as the settings are

    async def close(self) -> None:
        if self.fast is not None:
            await self.fast.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        """Health: the database answers and takes writes. A connection that reaches a read-only
        server (a standby, a demoted primary behind a pooler or a virtual IP) is dropped, so that
        the next ping connects anew, and the ping fails: no writable primary is no service."""
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                if (await conn.execute(_SQL_READ_ONLY)).scalar():
                    RECONNECTS.labels("health", "read-only").inc()
                    await conn.invalidate()
                    raise DatabaseUnavailable(READ_ONLY_MESSAGE)

    async def _transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Runs ``fn(conn, *args)`` in a transaction; again after lost races and cooldown reclaims,
        and on a new connection (up to :data:`RECONNECT_ATTEMPTS` times) after one that cannot have
        written anything: a read-only server (SQLSTATE 25006; the engine then drops every pooled
        connection, see db.drop_stale_connections) or a session PostgreSQL had ended before the
        statement was sent. Each of those is counted in ``dsipam_db_reconnects_total{path="full"}``
        and logged at WARNING (at most a line a second): expected after a failover, not an error."""
        reconnects, read_only = 0, False
        for attempt in range(MAX_ATTEMPTS):
            try:
                with unavailable_on_disconnect():
                    async with self.engine.begin() as conn:
                        return await fn(conn, *args)
            except DatabaseUnavailable as exc:
                reason = ("read-only" if is_read_only(exc) else
                          "ended-while-idle" if is_ended_while_idle(exc) else "")
                # Read-only: one new connection; when that one is read-only too, so is the server.
                if not reason or reconnects >= RECONNECT_ATTEMPTS or (reason == "read-only" and read_only):
                    raise
                reconnects += 1
                read_only = read_only or reason == "read-only"
                RECONNECTS.labels("full", reason).inc()
                if held := _RECONNECT_LOG.due():
                    log.warning("database: a transaction's connection could not write (%s: %s); it runs again on a "
                                "new connection (attempt %d; %d such retries since the last line)", reason,
                                str(exc.__cause__ or exc).splitlines()[0], reconnects + 1, held)
                continue
            except Retry:
                pass
            except Reclaim as need:
                await self.reclaim_cooldowns(pool_id=need.pool_id, family=need.family)
                continue
            except sqlalchemy.exc.DBAPIError as exc:
                if sqlstate(exc) not in RETRYABLE_SQLSTATES:
                    raise
            self.retries += 1
            await asyncio.sleep(random.uniform(0, 0.002 * (2**attempt)))
        raise Conflict("the operation lost a race with concurrent writers too many times; retry it")

    async def reclaim_cooldowns(self, *, pool_id: int | None = None, family: Family | None = None,
                                limit: int = 500) -> int:
        raise NotImplementedError

    # -- layouts ----------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """One read statement, in its own implicit transaction (one snapshot, no BEGIN/ROLLBACK round
        trips), straight on asyncpg as a cached prepared statement: on the fast path's pool when it is
        on, else on a raw connection of the engine's pool. The reads of GetPool, GetAllocation,
        ListAllocations and ListBlocks take this way (docs/performance.md, "Cost per call")."""
        if self.fast is not None:
            return await self.fast.fetch(sql, *args)
        from ._fast import is_outage

        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                try:
                    return await raw.fetch(sql, *args)
                except Exception as exc:
                    if is_outage(exc):
                        raise DatabaseUnavailable("database: unreachable, try again later") from exc
                    raise

    def _cached_layout(self, head: Any) -> StoredPool | None:
        """The cached layout of the pool whose head row (id, version, create_time, labels as JSON
        text, cooldown_ms, node_affinity) was just read, or None when it is not cached at that version."""
        cached = self._layouts.get(head["id"])
        if cached is None or cached.version != head["version"] or cached.create_time != head["create_time"]:
            return None
        labels = json.loads(head["labels"]) if head["labels"] else {}
        if (cached.labels, cached.cooldown_ms, cached.strict_affinity) != (
            labels, head["cooldown_ms"], head["node_affinity"] == 2
        ):
            cached = _replace_head(cached, {**dict(head), "labels": labels})
            self._layouts[head["id"]] = cached
        return cached

    async def _read_shared(self, sql: str, name: str, where: str, shared_sql: str | None = None,
                           item: Any = None) -> tuple[StoredPool, list[Any]]:
        """:meth:`_read` of a statement that concurrent callers can share (GetPool: ``sql`` with the
        pool's name alone; GetAllocation: ``shared_sql`` with the array of the callers' ``item``s as
        ``$2``, else ``sql`` with the item alone) through the fast path's shared reads when it is on:
        each caller's rows come from a statement started after it arrived (FastPath.fetch_shared)."""
        if self.fast is None:
            return await self._read(sql, name, where, *(() if shared_sql is None else (item,)))
        if shared_sql is None:
            return await self._read(sql, name, where, fetch=lambda: self.fast.fetch_shared(sql, name))
        return await self._read(shared_sql, name, where,
                                fetch=lambda: self.fast.fetch_shared(shared_sql, name, item, items=True,
                                                                     single_sql=sql))

    async def _read(self, sql: str, name: str, where: str, *args: Any,
                    fetch: Callable[[], Awaitable[list[Any]]] | None = None) -> tuple[StoredPool, list[Any]]:
        """Runs one of the read statements above (``$1`` the pool's name) and returns the pool's
        layout at the version the statement read, with the rows. A layout not cached at that version
        is loaded (and cached) and the statement runs again; if the pool changes under every try,
        the rows of the last one come with the newest layout. ``fetch``, when given, runs the
        statement instead (a shared read)."""
        for _ in range(3):
            rows = await (fetch() if fetch is not None else self._fetch(sql, name, *args))
            if not rows:
                self.forget(name)
                raise PoolNotFound(f"{where}: pool {name!r} not found", field=where, pool=name)
            pool = self._cached_layout(rows[0])
            if pool is not None:
                return pool, rows
            with unavailable_on_disconnect():
                async with self.engine.connect() as conn:
                    pool = await self._load_pool(conn, name, where)
        return pool, rows

    async def _load_pool(self, conn: AsyncConnection, name: str, where: str = "pool") -> StoredPool:
        head = (await conn.execute(_SQL_POOL_HEAD, {"name": name})).mappings().first()
        if head is None:
            self.forget(name)
            raise PoolNotFound(f"{where}: pool {name!r} not found", field=where, pool=name)
        return await self._layout(conn, head)

    async def _load_pool_by_id(self, conn: AsyncConnection, pool_id: int) -> StoredPool | None:
        head = (await conn.execute(_SQL_POOL_HEAD_BY_ID, {"id": pool_id})).mappings().first()
        return None if head is None else await self._layout(conn, head)

    async def _layout(self, conn: AsyncConnection, head: Any) -> StoredPool:
        cached = self._layouts.get(head["id"])
        if cached is not None and cached.version == head["version"] and cached.create_time == head["create_time"]:
            if (cached.labels, cached.cooldown_ms, cached.strict_affinity) != (
                head["labels"], head["cooldown_ms"], head["node_affinity"] == 2
            ):
                cached = _replace_head(cached, head)
                self._layouts[head["id"]] = cached
            self._by_name[cached.name] = cached
            return cached
        rows = (await conn.execute(_SQL_POOL_LAYOUT, {"pool": head["id"]})).mappings().all()
        weight = sum(len(r["exclude"] or ()) + len(r["reservations"] or ()) for r in rows)
        key = (head["id"], head["version"])
        building = self._building.get(key)
        if building is not None:  # another call builds this very layout (in a thread): share it
            pool = await asyncio.shield(building)
            if pool.create_time == head["create_time"]:
                return pool
        if weight <= LAYOUT_THREAD_THRESHOLD:
            pool = build_layout(head, rows)
        else:
            future: asyncio.Future[StoredPool] = asyncio.ensure_future(asyncio.to_thread(build_layout, head, rows))
            self._building[key] = future
            try:
                pool = await asyncio.shield(future)
            finally:
                if self._building.get(key) is future:
                    del self._building[key]
        self.remember(pool)
        return pool

    def remember(self, pool: StoredPool) -> None:
        """Caches a layout (by id, checked against version and create time on use)."""
        self._layouts[pool.id] = pool
        self._by_name[pool.name] = pool

    def forget_stale(self, stored: StoredPool) -> None:
        """Drops a layout the fast path found out of date (the pool changed, or is gone): by name, and
        by id while the cached one is still that version (a gone pool's would otherwise stay, as
        the full path's read then finds no name to forget)."""
        named = self._by_name.get(stored.name)
        if named is not None and named.id == stored.id and named.version == stored.version:
            del self._by_name[stored.name]
        cached = self._layouts.get(stored.id)
        if cached is not None and cached.version == stored.version:
            del self._layouts[stored.id]
            self._fast_created.pop(stored.id, None)

    def forget(self, name: str) -> None:
        """Drops the cached layout of a pool that is gone (deleted here, or found missing by a read):
        pool ids are never reused, so nothing else would ever free it."""
        pool = self._by_name.pop(name, None)
        if pool is not None:
            self._layouts.pop(pool.id, None)
            self._fast_created.pop(pool.id, None)

    async def _usage(self, conn: AsyncConnection, pools: Sequence[StoredPool]) -> dict[int, tuple[FamilyUsage, ...]]:
        ids = [p.id for p in pools]
        rows = (await conn.execute(_SQL_USAGE, {"pools": ids})).mappings().all()
        rows_of: dict[int, list[Any]] = {}
        for row in rows:  # grouped once: a page of 1000 pools is not 1000 x 2000 comparisons
            rows_of.setdefault(row["pool_id"], []).append(row)
        return {p.id: usage_of(p, rows_of.get(p.id, ())) for p in pools}

    async def _pool_info(self, conn: AsyncConnection, pool: StoredPool) -> PoolInfo:
        usage = await self._usage(conn, [pool])
        return pool_info(pool, usage[pool.id])


def _replace_head(pool: StoredPool, head: Any) -> StoredPool:
    return replace(pool, labels=dict(head["labels"]), cooldown_ms=head["cooldown_ms"],
                   strict_affinity=head["node_affinity"] == 2)


def usage_of(pool: StoredPool, rows: Sequence[Any]) -> tuple[FamilyUsage, ...]:
    """The pool's usage per family (in the pool's family order) from rows of family, size, used, cooling."""
    by_family: dict[Family, FamilyUsage] = {}
    for row in rows:
        if row["family"] is None:  # a pool without ranges (the LEFT JOIN of SQL_READ_POOL)
            continue
        fam = Family(row["family"])
        size = int(row["size"])
        by_family[fam] = FamilyUsage(fam, size, int(row["used"]), int(row["cooling"]), size - pool.sizes.get(fam, 0))
    return tuple(by_family[f] for f in pool.families if f in by_family)


def pool_info(pool: StoredPool, usage: tuple[FamilyUsage, ...]) -> PoolInfo:
    return PoolInfo(pool.spec, usage, pool.create_time, pool.cooldown_ms, pool.reservation_texts, pool.strict_affinity)


def allocation_info(
    pool: StoredPool,
    owner: str,
    held: dict[Family, IPAddress] | dict[Family, str],
    order: Sequence[Family],
    attributes: dict[str, str],
    create_time: dt.datetime,
    node: str | None = None,
    borrowed: bool = False,
) -> AllocationInfo:
    fams = [f for f in order if f in held] + [f for f in held if f not in order]
    return AllocationInfo(
        pool=pool.name,
        owner=owner,
        addresses=tuple(pool.address_info(held[f]) for f in fams),
        attributes=dict(attributes),
        create_time=create_time,
        node=node or "",
        borrowed=borrowed,
    )


def row_allocation(pool: StoredPool, owner: str, row: Any) -> AllocationInfo:
    held = {f: row[c] for f, c in FAMILY_COLUMN.items() if row[c]}
    return allocation_info(pool, owner, held, pool.families, row["attributes"], row["create_time"],
                           row.get("node"), bool(row.get("borrowed", False)))


def read_allocation(pool: StoredPool, row: Any) -> AllocationInfo:
    """An allocation from a row of SQL_READ_ALLOCATION or sql_read_allocations (attributes as JSON
    text). Runs for every row of a ListAllocations page, so it is allocation_info made direct."""
    v4, v6 = row["ipv4"], row["ipv6"]
    if v4 and v6:
        six_first = bool(pool.families) and pool.families[0] is Family.IPV6  # the pool's order, as allocation_info
        addresses: tuple[AddressInfo, ...] = (
            (pool.address_info(v6), pool.address_info(v4)) if six_first
            else (pool.address_info(v4), pool.address_info(v6)))
    else:
        addresses = (pool.address_info(v4 or v6),) if (v4 or v6) else ()
    attributes = row["attributes"]
    return AllocationInfo(
        pool=pool.name, owner=row["owner"], addresses=addresses,
        attributes={} if attributes == "{}" else json.loads(attributes),
        create_time=row["allocation_time"], node=row["allocation_node"] or "", borrowed=bool(row["borrowed"]),
    )
