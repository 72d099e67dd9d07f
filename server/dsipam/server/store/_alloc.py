"""Allocation, release, cooldown reclaim and garbage collection: the engine's SQL.

Allocation takes row locks on block rows: ``FOR UPDATE SKIP LOCKED`` first, so that
concurrent callers spread over blocks; then a waiting ``FOR UPDATE``, so that nobody
reports exhaustion while addresses remain. A pair is taken in one transaction: when
the second family fails, the rollback gives the first back. Families are always taken
IPv4 first, which gives every transaction the same lock order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..background import report as report_background_error
from ..domain import (
    AddressInCooldown,
    AddressInfo,
    AddressInUse,
    AllocationInfo,
    DatabaseUnavailable,
    Family,
    InvalidArgument,
    OwnerHoldsOtherAddress,
    PermissionDenied,
    Policy,
    PoolExhausted,
    PoolNotFound,
    check_map,
    check_node,
    check_owner,
    check_pool_name,
    plan_allocation,
)
from ..domain._fsck import check_consistency
from ..domain._ranges import IPAddress
from ._base import (
    FAMILY_COLUMN,
    SQL_READ_ALLOCATION,
    SQL_READ_ALLOCATIONS_OF,
    Reclaim,
    Retry,
    StoreBase,
    StoredPool,
    StoredRange,
    allocation_info,
    decode_page_token,
    encode_page_token,
    page_scope,
    page_size,
    read_allocation,
    row_allocation,
    sql_read_allocations,
)
from .db import FOREIGN_KEY_VIOLATION, UNIQUE_VIOLATION, sqlstate, unavailable_on_disconnect

log = logging.getLogger("dsipam.store")
_TOP_UP_TASKS: set[asyncio.Task[None]] = set()  # spare-block top-ups running in the background

MAX_GC_GRACE_SECONDS = 100 * 365 * 86400  # beyond it, now() - grace leaves PostgreSQL's timestamp range
EVENT_ALLOCATED = 1
EVENT_RELEASED = 2

# Take the first free bit of an existing block that nobody else holds.
_SQL_TAKE_SKIP = text(
    """
    WITH b AS (
        SELECT id, position(B'0' IN bitmap) - 1 AS bit
          FROM ipam_blocks
         WHERE pool_id = :pool AND family = :family AND has_free AND node IS NULL
         ORDER BY id
         LIMIT 1
           FOR UPDATE SKIP LOCKED)
    UPDATE ipam_blocks k
       SET bitmap = set_bit(k.bitmap, b.bit, 1), free_count = k.free_count - 1
      FROM b
     WHERE k.id = b.id
    RETURNING host(k.base + b.bit) AS ip
    """
)
# The same, waiting for locked blocks (only reached when no unlocked block had room).
_SQL_TAKE_WAIT = text(str(_SQL_TAKE_SKIP).replace("FOR UPDATE SKIP LOCKED", "FOR UPDATE"))
# Last resort without a node: any block with room, node-affine ones included.
_SQL_TAKE_ANY_WAIT = text(str(_SQL_TAKE_WAIT).replace(" AND node IS NULL", ""))
# A node's own blocks.
_SQL_TAKE_NODE_SKIP = text(str(_SQL_TAKE_SKIP).replace("AND node IS NULL", "AND node = :node"))
_SQL_TAKE_NODE_WAIT = text(str(_SQL_TAKE_WAIT).replace("AND node IS NULL", "AND node = :node"))
# Claim an existing, completely empty block that no node holds.
_SQL_CLAIM_EMPTY = text(
    """
    WITH b AS (
        SELECT id, position(B'0' IN bitmap) - 1 AS bit
          FROM ipam_blocks
         WHERE pool_id = :pool AND family = :family AND node IS NULL
           AND has_free AND free_count = avail_count AND cooling = 0
         ORDER BY id
         LIMIT 1
           FOR UPDATE SKIP LOCKED)
    UPDATE ipam_blocks k
       SET node = :node, bitmap = set_bit(k.bitmap, b.bit, 1), free_count = k.free_count - 1
      FROM b
     WHERE k.id = b.id
    RETURNING host(k.base + b.bit) AS ip
    """
)
_SQL_CLAIM_EMPTY_WAIT = text(str(_SQL_CLAIM_EMPTY).replace("FOR UPDATE SKIP LOCKED", "FOR UPDATE"))
_SQL_NODE_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")

_SQL_LOCK_RANGE_SKIP = text(
    """
    SELECT r.id, host(r.next_block) AS next_block
      FROM ipam_ranges r
     WHERE r.pool_id = :pool AND r.family = :family AND r.next_block IS NOT NULL
     ORDER BY r.position
     LIMIT 1
       FOR UPDATE OF r SKIP LOCKED
    """
)
_SQL_LOCK_RANGE_WAIT = text(str(_SQL_LOCK_RANGE_SKIP).replace("FOR UPDATE OF r SKIP LOCKED", "FOR UPDATE OF r"))

_SQL_INSERT_BLOCK = text(
    """
    INSERT INTO ipam_blocks (pool_id, range_id, family, base, bitmap, free_count, avail_count, node)
    VALUES (:pool, :range, :family, CAST(:base AS cidr), CAST(CAST(:bitmap AS text) AS varbit), :free, :avail,
            :node)
    ON CONFLICT (range_id, base) DO NOTHING
    RETURNING id
    """
)
# The top-up's blocks, many in one statement (one INSERT per block cost ~1 ms of the server's CPU
# through SQLAlchemy: 13% of an Allocate's samples, docs/performance.md).
_SQL_INSERT_EMPTY_BLOCKS = text(
    """
    INSERT INTO ipam_blocks (pool_id, range_id, family, base, bitmap, free_count, avail_count, node)
    SELECT :pool, :range, :family, b.base, CAST(b.bitmap AS varbit), b.free, b.free, NULL
      FROM unnest(CAST(:bases AS cidr[]), CAST(:bitmaps AS text[]), CAST(:frees AS int[])) AS b(base, bitmap, free)
    ON CONFLICT (range_id, base) DO NOTHING
    RETURNING id
    """
)
_SQL_SET_NEXT_BLOCK = text("UPDATE ipam_ranges SET next_block = CAST(:next AS inet) WHERE id = :range")

_SQL_TAKE_SPECIFIC = text(
    """
    UPDATE ipam_blocks
       SET bitmap = set_bit(bitmap, :bit, 1), free_count = free_count - 1
     WHERE range_id = :range AND base = CAST(:base AS cidr) AND get_bit(bitmap, :bit) = 0
    RETURNING id
    """
)

_SQL_FREE_BIT = text(
    """
    UPDATE ipam_blocks
       SET bitmap = set_bit(bitmap, :bit, 0), free_count = free_count + 1
     WHERE range_id = :range AND base = CAST(:base AS cidr) AND get_bit(bitmap, :bit) = 1
    """
)
# The block of an address given back, locked; then its pool's version, by a statement of its own
# (see _give_back: a row joined to the locked one would be the one of the snapshot before the wait).
_SQL_LOCK_BLOCK = text("SELECT 1 FROM ipam_blocks WHERE range_id = :range AND base = CAST(:base AS cidr) FOR UPDATE")
_SQL_POOL_VERSION = text("SELECT version FROM ipam_pools WHERE id = :pool")
# A released address that is now reserved: its bit stays set and it stops counting as usable.
_SQL_RETIRE_BIT = text(
    "UPDATE ipam_blocks SET avail_count = avail_count - 1 WHERE range_id = :range AND base = CAST(:base AS cidr)"
)
_SQL_COOL_BIT = text(
    """
    WITH b AS (
        UPDATE ipam_blocks SET cooling = cooling + 1
         WHERE range_id = :range AND base = CAST(:base AS cidr)
        RETURNING id)
    INSERT INTO ipam_cooldowns (pool_id, address, family, block_id, owner, until)
    SELECT :pool, CAST(:ip AS inet), :family, b.id, :owner, now() + make_interval(secs => :seconds)
      FROM b
    """
)

_SQL_OWNER_FOR_UPDATE = text(
    """
    SELECT host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time, node, borrowed
      FROM ipam_allocations
     WHERE pool_id = :pool AND owner = :owner
       FOR UPDATE
    """
)

_SQL_INSERT_ALLOCATION = text(
    """
    WITH a AS (
        INSERT INTO ipam_allocations (pool_id, owner, ipv4, ipv6, attributes, node, borrowed)
        VALUES (:pool, :owner, CAST(:ipv4 AS inet), CAST(:ipv6 AS inet), CAST(:attrs AS jsonb), :node, :borrowed)
        ON CONFLICT (pool_id, owner) DO NOTHING
        RETURNING attributes, create_time, node, borrowed),
    e AS (
        INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6)
        SELECT :pool, 1, :owner, CAST(:ipv4 AS inet), CAST(:ipv6 AS inet) FROM a)
    SELECT attributes, create_time, node, borrowed FROM a
    """
)

_SQL_EVENT = text(
    """
    INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6)
    VALUES (:pool, :type, :owner, CAST(:ipv4 AS inet), CAST(:ipv6 AS inet))
    """
)

_SQL_HOLDER = text(
    """
    SELECT owner FROM ipam_allocations
     WHERE pool_id = :pool AND (ipv4 = CAST(:ip AS inet) OR ipv6 = CAST(:ip AS inet))
    """
)
_SQL_COOLDOWN_OF = text(
    """
    SELECT owner, block_id, extract(epoch FROM until - now()) AS remaining
      FROM ipam_cooldowns WHERE pool_id = :pool AND address = CAST(:ip AS inet)
       FOR UPDATE
    """
)
_SQL_EXPIRED_EXISTS = text(
    "SELECT 1 FROM ipam_cooldowns WHERE pool_id = :pool AND family = :family AND until <= now() LIMIT 1"
)
_SQL_POOL_STILL_THERE = text("SELECT version FROM ipam_pools WHERE id = :pool FOR KEY SHARE")


def _not_of_node(pool: str, owner: str, node: str) -> PermissionDenied:
    """A node-scoped caller (a shim) and an owner that is not its node's. Names neither the
    holder nor its node: only what the caller gave and its own node."""
    return PermissionDenied(
        f"owner: {owner!r} is not an allocation of node {node!r} in pool {pool!r}; "
        "a shim acts only on its own node's allocations",
        field="owner",
    )


_READ_ALLOCATIONS = {f: sql_read_allocations(f) for f in ("", " AND a.ipv4 IS NOT NULL", " AND a.ipv6 IS NOT NULL")}

class AllocationStore(StoreBase):
    """Allocate, Release, GarbageCollect, cooldown reclaim, reads and fsck.

    ``node_scope`` (Allocate, Release, GetAllocation, GarbageCollect) is the node of a shim
    caller, None for cluster-wide callers. A scoped call acts only on allocations whose stored
    node is that node, checked on the owner's row while it is locked in the transaction that
    changes it (so an owner re-allocated to another node meanwhile is never touched); a scoped
    Release therefore skips the batched fast path, whose SQL function has no node guard. Its
    errors never name another owner.
    """

    async def allocate(
        self,
        *,
        pool: str,
        owner: str,
        policy: Policy,
        families: Sequence[Family],
        addresses: Sequence[str],
        attributes: dict[str, str],
        node: str = "",
        node_scope: str | None = None,
    ) -> tuple[AllocationInfo, bool]:
        check_pool_name(pool, "pool")
        check_owner(owner)
        check_map(attributes, "attributes")
        check_node(node)
        if node_scope is not None and node != node_scope:
            raise PermissionDenied(f"node: {node!r} is not the caller's node {node_scope!r}", field="node")

        if self.fast is not None and not addresses:
            done = await self._allocate_fast(pool, owner, policy, families, attributes, node)
            if done is not None:
                # "exists" answers change nothing: another node's owner is refused unseen.
                if node_scope is not None and done[0].node != node_scope:
                    raise _not_of_node(pool, owner, node_scope)
                return done

        async def run(conn: AsyncConnection) -> tuple[AllocationInfo, bool]:
            stored = await self._load_pool(conn, pool)
            return await self._allocate_in(conn, stored, owner, policy, families, addresses, attributes, node,
                                           node_scope)

        try:
            return await self._transaction(run)
        except sqlalchemy.exc.IntegrityError as exc:
            code = sqlstate(exc)
            if code == FOREIGN_KEY_VIOLATION:  # the pool was deleted under us
                raise PoolNotFound(f"pool: pool {pool!r} not found", field="pool", pool=pool) from None
            if code == UNIQUE_VIOLATION:  # the engine's bookkeeping disagrees with the constraint
                raise AddressInUse("addresses: an address was taken concurrently; retry", field="addresses") from None
            raise

    async def _allocate_fast(
        self, pool: str, owner: str, policy: Policy, families: Sequence[Family], attributes: dict[str, str], node: str
    ) -> tuple[AllocationInfo, bool] | None:
        """One batched round trip for the common case; None when the full path must run."""
        stored = self._by_name.get(pool)
        if stored is None or self.fast is None:
            return None
        plan = plan_allocation(pool_families=stored.families, policy=policy, families=families, addresses=())
        want4, want6, attrs_json = Family.IPV4 in plan.wanted, Family.IPV6 in plan.wanted, json.dumps(attributes)
        row = await self.fast.allocate(pool, stored.version, owner, want4, want6, attrs_json, node)
        if row is not None and row["status"] == "slow":
            # Mostly: no unlocked block had room (a new pool, or batches outran the spares). The
            # top-up that creates blocks ahead of need is waited for and the fast path tried once
            # more, instead of the full path creating blocks call by call under the range lock.
            # What the function hands over for other reasons (an upgrade, the same owner twice in
            # a batch, an exhausted family) is handed over again, and the full path decides.
            await asyncio.shield(self._schedule_top_up(stored, plan.wanted))
            row = await self.fast.allocate(pool, stored.version, owner, want4, want6, attrs_json, node)
        if row is None or row["status"] not in ("created", "exists"):
            if row is not None and row["status"] == "stale":
                self.forget_stale(stored)
            return None
        if row["status"] == "created":
            n = self._fast_created.get(stored.id, 0) + 1
            self._fast_created[stored.id] = n
            if n % 512 == 0:  # every eight blocks' worth: spares (16 per family) keep ahead of the batches
                self._schedule_top_up(stored, plan.wanted)
        held = {f: row[c] for f, c in FAMILY_COLUMN.items() if row[c]}
        attrs = row["attributes"]
        if isinstance(attrs, str):
            attrs = {} if attrs == "{}" else json.loads(attrs)
        info = allocation_info(stored, owner, held, plan.order, attrs,
                               row["create_time"], row["node"], bool(row["borrowed"]))
        return info, row["status"] == "created"

    SPARE_BLOCKS = 16  # unlocked blocks with free addresses the fast path should find, per family

    def _schedule_top_up(self, stored: StoredPool, families: Sequence[Family]) -> asyncio.Task[None]:
        """Creates blocks ahead of need (in the background, one top-up per pool at a time), so
        that concurrent batches find unlocked blocks with room instead of falling back. Returns
        the pool's running top-up (callers may wait for it; it never raises)."""
        running = self._topping_up.get(stored.id)
        if running is not None and not running.done():
            return running

        async def run() -> None:
            try:
                for fam in families:
                    await self.top_up_blocks(stored.name, fam, self.SPARE_BLOCKS)
            except (DatabaseUnavailable, PoolNotFound):
                pass  # an outage (the calls report it) or a pool deleted meanwhile: nothing to top up
            except Exception:  # noqa: BLE001 - an optimisation the calls do not wait for: logged, counted
                report_background_error(log, "block-top-up", "block top-up of pool %r failed", stored.name)

        task = asyncio.get_running_loop().create_task(run(), name=f"dsipam-top-up-{stored.name}")
        self._topping_up[stored.id] = task
        _TOP_UP_TASKS.add(task)  # a reference until it is done (the loop keeps only weak ones)

        def done(t: asyncio.Task[None]) -> None:
            _TOP_UP_TASKS.discard(t)
            if self._topping_up.get(stored.id) is t:
                del self._topping_up[stored.id]

        task.add_done_callback(done)
        return task

    async def top_up_blocks(self, pool: str, family: Family, spare: int) -> int:
        """Creates empty blocks (no node) until the family has ``spare`` blocks with free
        addresses, or its ranges are used up. Returns how many it created."""

        async def run(conn: AsyncConnection) -> int:
            stored = await self._load_pool(conn, pool)
            have = (
                await conn.execute(
                    text("SELECT count(*) FROM (SELECT 1 FROM ipam_blocks WHERE pool_id = :pool AND family = :family "
                         "AND has_free AND node IS NULL LIMIT :spare) b"),
                    {"pool": stored.id, "family": int(family), "spare": spare},
                )
            ).scalar_one()
            created = 0
            while have + created < spare:
                rng = (await conn.execute(_SQL_LOCK_RANGE_SKIP, {"pool": stored.id, "family": int(family)})).first()
                if rng is None or not await self._layout_current(conn, stored):
                    break
                created += await self._new_empty_blocks(conn, stored, rng.id, rng.next_block, spare - have - created)
            return created

        return await self._transaction(run)

    async def _allocate_in(
        self,
        conn: AsyncConnection,
        stored: StoredPool,
        owner: str,
        policy: Policy,
        families: Sequence[Family],
        addresses: Sequence[str],
        attributes: dict[str, str],
        node: str = "",
        node_scope: str | None = None,
    ) -> tuple[AllocationInfo, bool]:
        plan = plan_allocation(pool_families=stored.families, policy=policy, families=families, addresses=addresses)
        row = (await conn.execute(_SQL_OWNER_FOR_UPDATE, {"pool": stored.id, "owner": owner})).mappings().first()
        if row is not None and node_scope is not None and row["node"] != node_scope:
            raise _not_of_node(stored.name, owner, node_scope)
        held: dict[Family, IPAddress] = {}
        if row is not None:
            for fam, col in FAMILY_COLUMN.items():
                if row[col]:
                    held[fam] = ipaddress.ip_address(row[col])
        wheres = {fam: f"addresses[{i}]" for i, fam in enumerate(plan.addresses)}
        for fam, addr in plan.addresses.items():
            if fam in held and held[fam] != addr:
                raise OwnerHoldsOtherAddress(
                    f"{wheres[fam]}: owner {owner!r} already holds {held[fam]} for {fam.label}, not {addr}",
                    field=wheres[fam],
                )
        missing = sorted(f for f in plan.wanted if f not in held)  # IPv4 first: one lock order
        taken: dict[Family, IPAddress] = {}
        borrowed = False
        for fam in missing:
            if fam in plan.addresses:
                addr = plan.addresses[fam]
                await self._take_specific(conn, stored, owner, addr, wheres[fam], reveal_holder=node_scope is None)
                taken[fam] = addr
                continue
            if node:
                got, lent = await self._take_for_node(conn, stored, fam, node)
                borrowed = borrowed or lent
            else:
                got = await self._take_any(conn, stored, fam)
            if got is not None:
                taken[fam] = got
                continue
            if (await conn.execute(_SQL_EXPIRED_EXISTS, {"pool": stored.id, "family": int(fam)})).first():
                raise Reclaim(stored.id, fam)
            if fam in plan.required or (node and stored.strict_affinity):
                await self._pool_still_there(conn, stored)
                if node and stored.strict_affinity:
                    raise PoolExhausted(
                        f"pool: {stored.name!r} has no free {fam.label} block for node {node!r} "
                        "(strict node affinity)",
                        field="node", pool=stored.name, family=fam.label, node=node,
                    )
                raise PoolExhausted(
                    f"pool: {stored.name!r} has no free {fam.label} address",
                    field="pool", pool=stored.name, family=fam.label,
                )
        if not taken and not held:
            await self._pool_still_there(conn, stored)
            labels = "/".join(f.label for f in missing)
            raise PoolExhausted(f"pool: {stored.name!r} has no free {labels} address", field="pool", pool=stored.name)
        ipv4 = str(taken[Family.IPV4]) if Family.IPV4 in taken else None
        ipv6 = str(taken[Family.IPV6]) if Family.IPV6 in taken else None
        if row is None:
            created = (
                await conn.execute(
                    _SQL_INSERT_ALLOCATION,
                    {"pool": stored.id, "owner": owner, "ipv4": ipv4, "ipv6": ipv6, "attrs": json.dumps(attributes),
                     "node": node or None, "borrowed": borrowed},
                )
            ).mappings().first()
            if created is None:  # a concurrent Allocate for the same owner won: read its result
                raise Retry()
            result = created
        else:
            result = dict(row)
            if taken:
                result["borrowed"] = bool(row["borrowed"]) or borrowed
                result["node"] = row["node"] or node or None
                sets = ", ".join(f"{FAMILY_COLUMN[f]} = CAST(:{FAMILY_COLUMN[f]} AS inet)" for f in taken)
                await conn.execute(
                    text(f"UPDATE ipam_allocations SET {sets}, node = :node, borrowed = :borrowed "
                         "WHERE pool_id = :pool AND owner = :owner"),
                    {"pool": stored.id, "owner": owner, "node": result["node"], "borrowed": result["borrowed"],
                     **{FAMILY_COLUMN[f]: str(a) for f, a in taken.items()}},
                )
                await conn.execute(
                    _SQL_EVENT,
                    {"pool": stored.id, "type": EVENT_ALLOCATED, "owner": owner, "ipv4": ipv4, "ipv6": ipv6},
                )
        held.update(taken)
        info = allocation_info(stored, owner, held, plan.order, result["attributes"], result["create_time"],
                               result["node"], bool(result["borrowed"]))
        return info, bool(taken)

    async def _pool_still_there(self, conn: AsyncConnection, stored: StoredPool) -> None:
        """Before reporting exhaustion: a pool deleted meanwhile (DeletePool takes the blocks away
        under our feet) is NOT_FOUND, and a changed layout (a range added) is another try. KEY SHARE
        waits for a DeletePool or layout change in progress, which holds the pool row."""
        version = (await conn.execute(_SQL_POOL_STILL_THERE, {"pool": stored.id})).scalar()
        if version is None:
            raise PoolNotFound(f"pool: pool {stored.name!r} not found", field="pool", pool=stored.name)
        if version != stored.version:
            raise Retry()

    @staticmethod
    async def _layout_current(conn: AsyncConnection, pool: StoredPool) -> bool:
        """After a range row is locked: is ``pool``'s layout still the pool's? Read by a statement of
        its own, so that it sees what committed while the lock was waited for: the lock statement's
        join of the pool row is from its snapshot, taken before the wait, so a ReserveAddresses (or a
        range change) that held the range and committed meanwhile would go unseen, and a new block
        would be made from the old layout, with a just-reserved address free in it."""
        return (await conn.execute(_SQL_POOL_VERSION, {"pool": pool.id})).scalar() == pool.version

    async def _take_any(self, conn: AsyncConnection, pool: StoredPool, fam: Family) -> IPAddress | None:
        params = {"pool": pool.id, "family": int(fam)}
        ip = (await conn.execute(_SQL_TAKE_SKIP, params)).scalar()
        if ip is not None:
            return ipaddress.ip_address(ip)
        for lock_sql in (_SQL_LOCK_RANGE_SKIP, _SQL_LOCK_RANGE_WAIT):
            rng = (await conn.execute(lock_sql, params)).first()
            if rng is not None:
                if not await self._layout_current(conn, pool):
                    raise Retry()
                got = await self._new_block(conn, pool, rng.id, rng.next_block)
                if got is not None:
                    return got
                return await self._take_any(conn, pool, fam)  # that range is used up; look again
        ip = (await conn.execute(_SQL_TAKE_WAIT, params)).scalar()
        if ip is None:
            ip = (await conn.execute(_SQL_TAKE_ANY_WAIT, params)).scalar()
        return ipaddress.ip_address(ip) if ip is not None else None

    async def _take_for_node(
        self, conn: AsyncConnection, pool: StoredPool, fam: Family, node: str
    ) -> tuple[IPAddress | None, bool]:
        """An address from a block affine to ``node``; claims a block when the node's are full.
        Returns (address, borrowed)."""
        params = {"pool": pool.id, "family": int(fam), "node": node}
        ip = (await conn.execute(_SQL_TAKE_NODE_SKIP, params)).scalar()
        if ip is not None:
            return ipaddress.ip_address(ip), False
        # One claimer per (pool, node, family) at a time, so a node never holds more blocks than it
        # needs; other nodes and allocations without a node are not blocked by it.
        await conn.execute(_SQL_NODE_LOCK, {"key": f"dsipam:{pool.id}:{int(fam)}:{node}"})
        ip = (await conn.execute(_SQL_TAKE_NODE_WAIT, params)).scalar()
        if ip is None:
            ip = (await conn.execute(_SQL_CLAIM_EMPTY, params)).scalar()
        if ip is not None:
            return ipaddress.ip_address(ip), False
        for lock_sql in (_SQL_LOCK_RANGE_SKIP, _SQL_LOCK_RANGE_WAIT):
            while True:
                rng = (await conn.execute(lock_sql, params)).first()
                if rng is None:
                    break
                if not await self._layout_current(conn, pool):
                    raise Retry()
                got = await self._new_block(conn, pool, rng.id, rng.next_block, node)
                if got is not None:
                    return got, False
        # No range has blocks left to create (or another transaction just created them): claim an
        # empty block of no node, waiting for ones that are locked, before lending from others.
        ip = (await conn.execute(_SQL_CLAIM_EMPTY_WAIT, params)).scalar()
        if ip is not None:
            return ipaddress.ip_address(ip), False
        if pool.strict_affinity:
            return None, False
        got = await self._take_any(conn, pool, fam)
        return got, got is not None

    async def _new_block(
        self, conn: AsyncConnection, pool: StoredPool, range_id: int, next_block: str, node: str | None = None,
    ) -> IPAddress | None:
        """Creates the next block of a locked range and takes its first free address (the top-up's
        empty blocks: _new_empty_blocks)."""
        rng = pool.range_by_id(range_id)
        if rng is None:
            raise Retry()
        spec = rng.spec
        base: int | None = spec.next_block_from(int(ipaddress.ip_address(next_block)))
        while base is not None:
            following = spec.following_block(base)
            bitmap, free = spec.block_mask(base)
            if free:
                bit = bitmap.index("0")
                bitmap = bitmap[:bit] + "1" + bitmap[bit + 1 :]
                created = (
                    await conn.execute(
                        _SQL_INSERT_BLOCK,
                        {"pool": pool.id, "range": range_id, "family": int(spec.family), "base": spec.block_cidr(base),
                         "bitmap": bitmap, "free": free - 1, "avail": free, "node": node},
                    )
                ).first()
                if created is not None:
                    nxt = str(spec.address(following)) if following is not None else None
                    await conn.execute(_SQL_SET_NEXT_BLOCK, {"range": range_id, "next": nxt})
                    return spec.address(base + bit)
            base = following
        await conn.execute(_SQL_SET_NEXT_BLOCK, {"range": range_id, "next": None})
        return None

    async def _new_empty_blocks(
        self, conn: AsyncConnection, pool: StoredPool, range_id: int, next_block: str, count: int
    ) -> int:
        """Creates up to ``count`` empty blocks (no node) of a locked range from its next block on,
        in one INSERT, and moves the range's next block past them. Returns how many it created:
        fewer when the range runs out, or when some already exist (made for a specific address),
        which are skipped; the caller asks again. Each call moves next_block on or clears it."""
        rng = pool.range_by_id(range_id)
        if rng is None:
            raise Retry()
        spec = rng.spec
        bases: list[str] = []
        bitmaps: list[str] = []
        frees: list[int] = []
        base: int | None = spec.next_block_from(int(ipaddress.ip_address(next_block)))
        while base is not None and len(bases) < count:
            bitmap, free = spec.block_mask(base)
            if free:
                bases.append(spec.block_cidr(base))
                bitmaps.append(bitmap)
                frees.append(free)
            base = spec.following_block(base)
        created = 0
        if bases:
            created = len((await conn.execute(
                _SQL_INSERT_EMPTY_BLOCKS,
                {"pool": pool.id, "range": range_id, "family": int(spec.family), "bases": bases, "bitmaps": bitmaps,
                 "frees": frees},
            )).all())
        await conn.execute(_SQL_SET_NEXT_BLOCK, {"range": range_id, "next": None if base is None else str(spec.address(base))})
        return created

    async def _ensure_block(self, conn: AsyncConnection, pool: StoredPool, rng: StoredRange, base: int) -> None:
        """Creates the block at ``base`` if it does not exist yet (for a specific address)."""
        # Share-lock the range row: a concurrent ReserveAddresses (which updates it) is then
        # either fully before us, and our layout version is stale, or fully after.
        await conn.execute(text("SELECT 1 FROM ipam_ranges WHERE id = :range FOR SHARE"), {"range": rng.id})
        if not await self._layout_current(conn, pool):
            raise Retry()
        bitmap, free = rng.spec.block_mask(base)
        await conn.execute(
            _SQL_INSERT_BLOCK,
            {"pool": pool.id, "range": rng.id, "family": int(rng.spec.family), "base": rng.spec.block_cidr(base),
             "bitmap": bitmap, "free": free, "avail": free, "node": None},
        )

    async def _take_specific(
        self, conn: AsyncConnection, pool: StoredPool, owner: str, addr: IPAddress, where: str,
        reveal_holder: bool = True,
    ) -> None:
        rng = pool.range_holding(addr)
        value = int(addr)
        if rng is None:
            raise InvalidArgument(f"{where}: {addr} is outside the pool's ranges", field=where)
        spec = rng.spec
        if not spec.is_available(value):
            raise InvalidArgument(f"{where}: {addr} {spec.why_unavailable(value)} in {spec.cidr}", field=where)
        base = spec.block_base(value)
        await self._ensure_block(conn, pool, rng, base)
        params = {"range": rng.id, "base": spec.block_cidr(base), "bit": value - base}
        if (await conn.execute(_SQL_TAKE_SPECIFIC, params)).first() is not None:
            return
        cooling = (await conn.execute(_SQL_COOLDOWN_OF, {"pool": pool.id, "ip": str(addr)})).mappings().first()
        if cooling is not None:
            if cooling["owner"] == owner:  # its last holder takes it back: no reuse by anyone else happened
                await conn.execute(
                    text("DELETE FROM ipam_cooldowns WHERE pool_id = :pool AND address = CAST(:ip AS inet)"),
                    {"pool": pool.id, "ip": str(addr)},
                )
                await conn.execute(text("UPDATE ipam_blocks SET cooling = cooling - 1 WHERE id = :b"),
                                   {"b": cooling["block_id"]})
                return
            raise AddressInCooldown(
                f"{where}: {addr} was released and is in cooldown for {max(float(cooling['remaining']), 0):.0f}s more",
                field=where, address=str(addr),
            )
        holder = (await conn.execute(_SQL_HOLDER, {"pool": pool.id, "ip": str(addr)})).scalar()
        if holder == owner:
            # An identical Allocate of this (then new) owner committed after we read the owner's row:
            # run again, which finds the row holding the address and answers as a repeat.
            raise Retry()
        if not reveal_holder:  # a shim learns that the address is taken, not by whom
            raise AddressInUse(f"{where}: {addr} is in use", field=where, address=str(addr))
        who = f"owner {holder!r}" if holder else "another owner"
        raise AddressInUse(f"{where}: {addr} is held by {who}", field=where, address=str(addr))

    async def _give_back(self, conn: AsyncConnection, pool: StoredPool, owner: str, ip: str) -> None:
        """Returns one address to its block: into cooldown, or free at once with no cooldown."""
        addr = ipaddress.ip_address(ip)
        rng = pool.range_holding(addr)
        if rng is None:  # its range is gone (removed with force): nothing to give back
            return
        value = int(addr)
        base = rng.spec.block_base(value)
        params: dict[str, Any] = {"range": rng.id, "base": rng.spec.block_cidr(base)}
        if pool.cooldown_ms > 0:
            await conn.execute(
                _SQL_COOL_BIT,
                {**params, "pool": pool.id, "ip": ip, "family": int(rng.spec.family), "owner": owner,
                 "seconds": pool.cooldown_ms / 1000},
            )
            return
        # Freed or retired: decided under the block's lock from the layout of the pool's version
        # then. A reservation locks the block before it reads what is held: one that committed since
        # ``pool`` was read (it saw this allocation and left the bit alone) is in the newer layout.
        await conn.execute(_SQL_LOCK_BLOCK, params)
        version = (await conn.execute(_SQL_POOL_VERSION, {"pool": pool.id})).scalar()
        if version is not None and version != pool.version:
            pool = await self._load_pool(conn, pool.name)
            rng = pool.range_holding(addr)
            if rng is None:
                return
            base = rng.spec.block_base(value)
            params = {"range": rng.id, "base": rng.spec.block_cidr(base)}
        if rng.spec.is_available(value):
            await conn.execute(_SQL_FREE_BIT, {**params, "bit": value - base})
        else:  # reserved with force while allocated: never handed out again
            await conn.execute(_SQL_RETIRE_BIT, params)

    async def release(
        self, *, pool: str, owner: str, families: Sequence[Family], node_scope: str | None = None
    ) -> list[AddressInfo]:
        check_pool_name(pool, "pool")
        check_owner(owner)
        stored = self._by_name.get(pool)
        if self.fast is not None and stored is not None and node_scope is None:
            drop = set(families) if families else {Family.IPV4, Family.IPV6}
            row = await self.fast.release(pool, stored.version, owner, Family.IPV4 in drop, Family.IPV6 in drop)
            if row is not None and row["status"] != "stale":
                return [stored.address_info(ipaddress.ip_address(row[c])) for c in ("ipv4", "ipv6") if row[c]]
            if row is not None:
                self.forget_stale(stored)

        async def run(conn: AsyncConnection) -> list[AddressInfo]:
            stored = await self._load_pool(conn, pool)
            row = (await conn.execute(_SQL_OWNER_FOR_UPDATE, {"pool": stored.id, "owner": owner})).mappings().first()
            if row is None:
                return []
            if node_scope is not None and row["node"] != node_scope:  # checked under the row lock
                raise _not_of_node(stored.name, owner, node_scope)
            held = {f: row[c] for f, c in FAMILY_COLUMN.items() if row[c]}
            drop = [f for f in sorted(set(families) if families else set(held)) if f in held]
            if not drop:
                return []
            for fam in drop:
                await self._give_back(conn, stored, owner, held[fam])
            if len(drop) == len(held):
                await conn.execute(
                    text("DELETE FROM ipam_allocations WHERE pool_id = :pool AND owner = :owner"),
                    {"pool": stored.id, "owner": owner},
                )
            else:
                sets = ", ".join(f"{FAMILY_COLUMN[f]} = NULL" for f in drop)
                await conn.execute(
                    text(f"UPDATE ipam_allocations SET {sets} WHERE pool_id = :pool AND owner = :owner"),
                    {"pool": stored.id, "owner": owner},
                )
            await conn.execute(
                _SQL_EVENT,
                {"pool": stored.id, "type": EVENT_RELEASED, "owner": owner,
                 "ipv4": held[Family.IPV4] if Family.IPV4 in drop else None,
                 "ipv6": held[Family.IPV6] if Family.IPV6 in drop else None},
            )
            return [stored.address_info(ipaddress.ip_address(held[f])) for f in drop]

        return await self._transaction(run)

    async def reclaim_cooldowns(self, *, pool_id: int | None = None, family: Family | None = None,
                                limit: int = 500) -> int:
        """Frees addresses whose cooldown has passed. Safe to run from every server at once."""

        async def run(conn: AsyncConnection) -> int:
            rows = (
                await conn.execute(
                    text(
                        """
                        DELETE FROM ipam_cooldowns c
                         USING (SELECT pool_id, address FROM ipam_cooldowns
                                 WHERE until <= now()
                                   AND (CAST(:pool AS integer) IS NULL OR pool_id = :pool)
                                   AND (CAST(:family AS smallint) IS NULL OR family = :family)
                                 ORDER BY until LIMIT :limit
                                   FOR UPDATE SKIP LOCKED) x
                         WHERE c.pool_id = x.pool_id AND c.address = x.address
                        RETURNING c.pool_id, host(c.address) AS ip, c.block_id
                        """
                    ),
                    {"pool": pool_id, "family": int(family) if family else None, "limit": limit},
                )
            ).mappings().all()
            # The blocks are locked before the layouts are read: a reservation of one of these addresses
            # locks them before it reads what is held, so it either commits first (and the layout read
            # next has it: the address is retired) or runs after this commits (and finds it free). Read
            # before the lock, a layout could miss a reservation that saw the cooldown (deleted here,
            # not yet committed) and left the bit alone: the reserved address was then freed.
            if rows:
                await conn.execute(text("SELECT 1 FROM ipam_blocks WHERE id = ANY(CAST(:ids AS bigint[])) "
                                        "ORDER BY id FOR UPDATE"),
                                   {"ids": sorted({r["block_id"] for r in rows})})
            pools: dict[int, StoredPool | None] = {}
            for row in sorted(rows, key=lambda r: r["block_id"]):  # one lock order over blocks
                if row["pool_id"] not in pools:
                    pools[row["pool_id"]] = await self._load_pool_by_id(conn, row["pool_id"])
                stored = pools[row["pool_id"]]
                addr = ipaddress.ip_address(row["ip"])
                rng = stored.range_holding(addr) if stored else None
                if rng is not None and rng.spec.is_available(int(addr)):
                    await conn.execute(
                        text(
                            "UPDATE ipam_blocks SET bitmap = set_bit(bitmap, CAST(CAST(:ip AS inet) - base AS integer), 0),"
                            " free_count = free_count + 1, cooling = cooling - 1 WHERE id = :b"
                        ),
                        {"ip": row["ip"], "b": row["block_id"]},
                    )
                else:  # reserved meanwhile: keep the bit, stop counting it as usable
                    await conn.execute(
                        text("UPDATE ipam_blocks SET cooling = cooling - 1, avail_count = avail_count - 1 WHERE id = :b"),
                        {"b": row["block_id"]},
                    )
            return len(rows)

        return await self._transaction(run)

    async def garbage_collect(
        self, *, pool: str, valid_owners: Sequence[str], grace_seconds: float, node_scope: str | None = None,
        node: str = "", selector: dict[str, str] | None = None,
    ) -> list[AllocationInfo]:
        """Releases the pool's allocations whose owner is not valid and which are older than the grace.

        Only allocations of ``node`` (when not empty) whose attributes contain ``selector`` are
        considered; with ``node_scope`` (a shim's), only those whose node is that node, whatever
        ``node`` says (the servicer refuses another node before this)."""
        check_pool_name(pool, "pool")
        check_node(node)
        selector = check_map(selector or {}, "attribute_selector")
        if grace_seconds < 0:
            raise InvalidArgument(f"grace: {grace_seconds}s is negative", field="grace")
        if grace_seconds > MAX_GC_GRACE_SECONDS:
            raise InvalidArgument(
                f"grace: {grace_seconds:.0f}s is more than {MAX_GC_GRACE_SECONDS}s (100 years)", field="grace"
            )
        for i, owner in enumerate(valid_owners):
            check_owner(owner, f"valid_owners[{i}]")

        async def run(conn: AsyncConnection) -> list[AllocationInfo]:
            stored = await self._load_pool(conn, pool)
            rows = (
                await conn.execute(
                    text(
                        """
                        SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time, node, borrowed
                          FROM ipam_allocations
                         WHERE pool_id = :pool AND NOT (owner = ANY(:valid))
                           AND create_time < now() - make_interval(secs => :grace)
                           AND (CAST(:scope AS text) IS NULL OR node = :scope)
                           AND (CAST(:node AS text) = '' OR node = :node)
                           AND attributes @> CAST(:selector AS jsonb)
                         ORDER BY owner
                           FOR UPDATE
                        """
                    ),
                    {"pool": stored.id, "valid": list(valid_owners), "grace": float(grace_seconds),
                     "scope": node_scope, "node": node, "selector": json.dumps(selector)},
                )
            ).mappings().all()
            released = []
            for row in rows:
                for col in ("ipv4", "ipv6"):
                    if row[col]:
                        await self._give_back(conn, stored, row["owner"], row[col])
                await conn.execute(
                    _SQL_EVENT,
                    {"pool": stored.id, "type": EVENT_RELEASED, "owner": row["owner"], "ipv4": row["ipv4"],
                     "ipv6": row["ipv6"]},
                )
                released.append(row_allocation(stored, row["owner"], row))
            if rows:
                await conn.execute(
                    text("DELETE FROM ipam_allocations WHERE pool_id = :pool AND owner = ANY(:owners)"),
                    {"pool": stored.id, "owners": [r["owner"] for r in rows]},
                )
                # Node blocks left without any address in use are free for any node again.
                await conn.execute(
                    text("UPDATE ipam_blocks SET node = NULL WHERE pool_id = :pool AND node IS NOT NULL "
                         "AND free_count = avail_count AND cooling = 0"),
                    {"pool": stored.id},
                )
            return released

        return await self._transaction(run)

    async def get_allocation(self, *, pool: str, owner: str, node_scope: str | None = None) -> AllocationInfo | None:
        check_pool_name(pool, "pool")
        check_owner(owner)
        stored, rows = await self._read_shared(SQL_READ_ALLOCATION, pool, "pool", SQL_READ_ALLOCATIONS_OF, owner)
        row = next((r for r in rows if r["owner"] == owner), None)  # a shared read: the rows of every caller
        if row is None:
            return None
        if node_scope is not None and row["allocation_node"] != node_scope:
            raise _not_of_node(pool, owner, node_scope)
        return read_allocation(stored, row)

    async def list_allocations(
        self, *, pool: str, size: int, token: str, selector: dict[str, str] | None = None,
        family: Family | None = None,
    ) -> tuple[list[AllocationInfo], str]:
        check_pool_name(pool, "pool")
        limit = page_size(size)
        selector = check_map(selector or {}, "attribute_selector")
        scope = page_scope(pool, selector=selector, family=family.name if family is not None else "")
        after = decode_page_token(token, "allocations", scope)
        family_filter = "" if family is None else f" AND a.{FAMILY_COLUMN[family]} IS NOT NULL"
        stored, rows = await self._read(_READ_ALLOCATIONS[family_filter], pool, "pool", after, json.dumps(selector),
                                        limit + 1)
        rows = [r for r in rows if r["owner"] is not None]
        out = [read_allocation(stored, r) for r in rows[:limit]]
        return out, (encode_page_token(rows[limit - 1]["owner"], "allocations", scope) if len(rows) > limit else "")

    async def fsck(self, pool: str) -> list[str]:
        """Checks that block bitmaps and counters agree exactly with allocations and cooldowns."""
        check_pool_name(pool, "pool")
        with unavailable_on_disconnect():
            async with self.engine.begin() as conn:
                await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                self._layouts.clear()
                stored = await self._load_pool(conn, pool)
                blocks = (
                    await conn.execute(
                        text(
                            "SELECT id, range_id, host(base) AS base, bitmap::text AS bitmap, free_count, avail_count, "
                            "cooling FROM ipam_blocks WHERE pool_id = :p"
                        ),
                        {"p": stored.id},
                    )
                ).mappings().all()
                allocs = (
                    await conn.execute(
                        text("SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6 FROM ipam_allocations "
                             "WHERE pool_id = :p"),
                        {"p": stored.id},
                    )
                ).mappings().all()
                cooling = (
                    await conn.execute(
                        text("SELECT owner, host(address) AS ip, block_id FROM ipam_cooldowns WHERE pool_id = :p"),
                        {"p": stored.id},
                    )
                ).mappings().all()
        return check_consistency(stored.ranges, blocks, allocs, cooling)
