"""Pool management: create, read, list, delete, update, reservations, ranges, migration, events."""

from __future__ import annotations

import bisect
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import (
    AddressAllocated,
    BlockInfo,
    FailedPrecondition,
    Family,
    InvalidArgument,
    IpamError,
    Policy,
    PoolAlreadyExists,
    PoolHasAllocations,
    PoolInfo,
    PoolNotFound,
    PoolSpec,
    RangeNotFound,
    build_range,
    check_cooldown,
    check_map,
    check_node,
    check_pool_name,
)
from ..domain._errors import PoolsOverlap
from ..domain._model import check_excludes_limit, check_reservations_limit
from ..domain._ranges import Cidr, IPNetwork, RangeSpec, ReservationIndex, merge_intervals, parse_cidrs, parse_network
from ._base import (
    SQL_READ_BLOCKS,
    SQL_READ_POOL,
    StoredPool,
    StoredRange,
    decode_page_token,
    encode_page_token,
    off_loop,
    page_scope,
    page_size,
    pool_info,
    usage_of,
    warm,
)
from ._watch import EVENT_RETENTION_SECONDS, Event, read_events
from .db import sqlstate, unavailable_on_disconnect

log = logging.getLogger("dsipam.store")

@dataclass(frozen=True)
class MigrationProgress:
    total: int
    processed: int
    upgraded: int
    failed: int
    errors: tuple[str, ...]


_SQL_INSERT_RANGE = text(
    """
    INSERT INTO ipam_ranges (pool_id, network, position, family, cidr, first_ip, last_ip, gateway,
                             exclude, block_prefix, size, next_block)
    VALUES (:pool, :network, :position, :family, CAST(:cidr AS cidr), CAST(:first AS inet),
            CAST(:last AS inet), CAST(:gateway AS inet), CAST(:exclude AS cidr[]),
            :block_prefix, :size, CAST(:next AS inet))
    RETURNING id
    """
)

# Pools of one network never overlap. Every writer of ranges takes this lock of the network
# first, so the check below sees every committed range of the network and no concurrent
# writer can add one until this transaction ends; the exclusion constraint
# ex_ipam_ranges_network_cidr backs it up (migration 0012).
_SQL_LOCK_NETWORK = text("SELECT pg_advisory_xact_lock(hashtextextended('dsipam.network/' || :network, 0))")
_SQL_OVERLAPPING = text(
    """
    SELECT p.name, host(r.cidr) || '/' || masklen(r.cidr) AS cidr
      FROM ipam_ranges r JOIN ipam_pools p ON p.id = r.pool_id
     WHERE r.network = :network AND r.cidr && CAST(:cidr AS cidr)
     ORDER BY p.name, r.position
     LIMIT 1
    """
)
EXCLUSION_VIOLATION = "23P01"


async def _lock_network(conn: AsyncConnection, network: str) -> None:
    await conn.execute(_SQL_LOCK_NETWORK, {"network": network})


def _network_text(network: str) -> str:
    return f"network {network!r}" if network else "the default network"


async def _refuse_overlap(conn: AsyncConnection, network: str, r: RangeSpec, where: str) -> None:
    """FAILED_PRECONDITION naming the pool whose range ``r`` overlaps (after _lock_network)."""
    other = (await conn.execute(_SQL_OVERLAPPING, {"network": network, "cidr": r.cidr})).first()
    if other is not None:
        raise PoolsOverlap(
            f"{where}: {r.cidr} overlaps {other.cidr} of pool {other.name!r} in {_network_text(network)}; pools "
            "of one network must not overlap (give this pool another range, or another network)",
            field=where, pool=other.name, cidr=other.cidr, network=network,
        )


async def _insert_range(conn: AsyncConnection, params: dict[str, Any], where: str) -> int:
    try:
        return int((await conn.execute(_SQL_INSERT_RANGE, params)).scalar_one())
    except sqlalchemy.exc.IntegrityError as exc:
        if sqlstate(exc) != EXCLUSION_VIOLATION:
            raise
        # Every writer locks the network and checks first, so only a writer that skipped the
        # lock gets here: a bug. Reported, never retried into success.
        log.error("range %s of network %r passed the overlap check but hit ex_ipam_ranges_network_cidr: %s",
                  params["cidr"], params["network"], exc)
        raise PoolsOverlap(
            f"{where}: {params['cidr']} overlaps a range of another pool in {_network_text(params['network'])}",
            field=where, network=params["network"],
        ) from None


def _range_params(pool_id: int, position: int, r: RangeSpec, network: str) -> dict[str, Any]:
    first_block = r.first_block()
    return {
        "pool": pool_id,
        "network": network,
        "position": position,
        "family": int(r.family),
        "cidr": r.cidr,
        "first": r.first_text() or None,
        "last": r.last_text() or None,
        "gateway": str(r.gateway) if r.gateway else None,
        "exclude": [str(x) for x in r.exclude],
        "block_prefix": r.block_prefix,
        "size": r.size,
        "next": str(r.address(first_block)) if first_block is not None else None,
    }


_SQL_BLOCKS_IN = text(
    """
    SELECT b.id, b.range_id, host(b.base) AS base, b.bitmap::text AS bitmap, b.free_count, b.avail_count
      FROM unnest(CAST(:ranges AS integer[]), CAST(:lo AS cidr[]), CAST(:hi AS cidr[])) AS t(range_id, lo, hi)
      JOIN ipam_blocks b ON b.range_id = t.range_id AND b.base BETWEEN t.lo AND t.hi
     ORDER BY b.id
       FOR UPDATE OF b
    """
)
_SQL_HELD_IN = text(
    """
    WITH t(lo, hi) AS (SELECT * FROM unnest(CAST(:lo AS inet[]), CAST(:hi AS inet[])))
    SELECT host(a.ipv4) AS ip, a.owner, false AS cooling
      FROM t JOIN ipam_allocations a ON a.pool_id = :p AND a.ipv4 BETWEEN t.lo AND t.hi
    UNION ALL
    SELECT host(a.ipv6), a.owner, false
      FROM t JOIN ipam_allocations a ON a.pool_id = :p AND a.ipv6 BETWEEN t.lo AND t.hi
    UNION ALL
    SELECT host(c.address), c.owner, true
      FROM t JOIN ipam_cooldowns c ON c.pool_id = :p AND c.address BETWEEN t.lo AND t.hi
    """
)
_SQL_INSERT_RESERVATIONS = text(
    "INSERT INTO ipam_reservations (pool_id, cidr) SELECT :p, c FROM unnest(CAST(:c AS cidr[])) AS c "
    "ON CONFLICT DO NOTHING"
)
_SQL_REWRITE_BLOCKS = text(
    """
    UPDATE ipam_blocks b SET bitmap = CAST(t.bm AS varbit), free_count = t.f, avail_count = t.a
      FROM unnest(CAST(:ids AS bigint[]), CAST(:bm AS text[]), CAST(:f AS integer[]), CAST(:a AS integer[]))
           AS t(id, bm, f, a)
     WHERE b.id = t.id
    """
)


def _plan_reservations(
    pool: StoredPool, updated: set[Cidr], blocks: Sequence[Any], held: set[tuple[int, int]]
) -> tuple[tuple[StoredRange, ...], list[tuple[int, str, int, int]]]:
    """The ranges with reservations ``updated`` (each range once, by a ReservationIndex) and the
    blocks to rewrite: (id, bitmap, free, avail). Pure CPU (may run in a thread).

    A bit newly never-available is set unless held (an allocation keeps it; its release retires
    it) and leaves the free and available counts; a bit available again is cleared unless held.
    A held address counts as available whether reserved or not (domain/_fsck.py: the release of a
    reserved one retires it), so lifting the reservation of a held address changes no count."""
    index = ReservationIndex(updated)
    after = tuple(StoredRange(r.id, warm(r.spec.with_reserved(index)), r.static_size) for r in pool.ranges)
    before_of = {r.id: r.spec for r in pool.ranges}
    after_of = {r.id: r.spec for r in after}
    held_of = {v: sorted(n for version, n in held if version == v) for v in (4, 6)}
    writes = []
    for b in blocks:
        before = before_of.get(b["range_id"])
        if before is None:
            continue
        now = after_of[b["range_id"]]
        base = int(ipaddress.ip_address(b["base"]))
        size = before.block_size
        never_before, never_now = int(before.block_mask(base)[0], 2), int(now.block_mask(base)[0], 2)
        if never_before == never_now:
            continue
        # Bit i of the bitmap text is bit (size - 1 - i) of these integers.
        in_block = held_of[before.network.version]
        h = 0
        for value in in_block[bisect.bisect_left(in_block, base):bisect.bisect_left(in_block, base + size)]:
            h |= 1 << (size - 1 - (value - base))
        bits, free, avail = int(b["bitmap"], 2), b["free_count"], b["avail_count"]
        take = never_now & ~never_before & ~h & ~bits
        n = take.bit_count()
        bits, free, avail = bits | take, free - n, avail - n
        lifted = never_before & ~never_now
        clear = lifted & ~h & bits
        n = clear.bit_count()
        bits, free, avail = bits & ~clear, free + n, avail + n
        bitmap = format(bits, f"0{size}b")
        if (bitmap, free, avail) != (b["bitmap"], b["free_count"], b["avail_count"]):
            writes.append((b["id"], bitmap, free, avail))
    return after, writes


class AdminStore:
    """Mixed into Store (with AllocationStore, which provides the base)."""

    # -- pools ------------------------------------------------------------------------

    async def create_pool(self, spec: PoolSpec) -> PoolInfo:
        weight = sum(len(r.exclude) for r in spec.ranges)
        check_excludes_limit(weight, "pool.ranges")
        # The excludes' text and the available intervals, before the transaction (in a thread
        # when there are many): the layout is then made from the spec, never parsed back.
        params = await off_loop(weight, lambda: [_range_params(0, i, warm(r), spec.network)
                                                 for i, r in enumerate(spec.ranges)])

        async def run(conn: AsyncConnection) -> PoolInfo:
            await _lock_network(conn, spec.network)
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO ipam_pools (name, labels, cooldown_ms, node_affinity, network, version) "
                        "VALUES (:name, CAST(:labels AS jsonb), :cooldown, :affinity, :network, "
                        "floor(random() * 9e18)::bigint) ON CONFLICT (name) DO NOTHING "
                        "RETURNING id, name, labels, create_time, cooldown_ms, version, node_affinity, network"
                    ),
                    {"name": spec.name, "labels": json.dumps(dict(spec.labels)), "cooldown": spec.cooldown_ms,
                     "affinity": 2 if spec.strict_affinity else 1, "network": spec.network},
                )
            ).first()
            if row is None:
                raise PoolAlreadyExists(f"pool.name: pool {spec.name!r} already exists", field="pool.name")
            # After the name: a pool that exists already is ALREADY_EXISTS, not an overlap with itself.
            for position, r in enumerate(spec.ranges):
                await _refuse_overlap(conn, spec.network, r, f"pool.ranges[{position}].cidr")
            ranges = []
            for position, r in enumerate(spec.ranges):
                range_id = await _insert_range(conn, {**params[position], "pool": row.id},
                                               f"pool.ranges[{position}].cidr")
                ranges.append(StoredRange(range_id, r, r.size))
            head = row._mapping
            pool = StoredPool(head["id"], head["name"], dict(head["labels"]), head["create_time"],
                              head["cooldown_ms"], head["version"], tuple(ranges), (), head["node_affinity"] == 2,
                              head["network"])
            self.remember(pool)
            return await self._pool_info(conn, pool)

        return await self._transaction(run)

    async def get_pool(self, name: str) -> PoolInfo:
        check_pool_name(name, "name")
        # One statement reads the head and the exact usage; the layout is the cached one of that
        # version (a pool's layout changes only with its version).
        pool, rows = await self._read_shared(SQL_READ_POOL, name, "name")
        return pool_info(pool, usage_of(pool, rows))

    async def list_pools(self, size: int, token: str) -> tuple[list[PoolInfo], str]:
        limit = page_size(size)
        after = decode_page_token(token, "pools")
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                names = (
                    await conn.execute(
                        text(
                            "SELECT name FROM ipam_pools WHERE (CAST(:after AS text) IS NULL OR name > :after) "
                            "ORDER BY name LIMIT :limit"
                        ),
                        {"after": after, "limit": limit + 1},
                    )
                ).scalars().all()
                pools: list[StoredPool] = []
                for name in names[:limit]:
                    try:
                        pools.append(await self._load_pool(conn, name))
                    except PoolNotFound:  # deleted between the two reads
                        continue
                usage = await self._usage(conn, pools) if pools else {}
        infos = [pool_info(p, usage[p.id]) for p in pools]
        return infos, (encode_page_token(names[limit - 1], "pools") if len(names) > limit else "")

    async def _lock_pool(self, conn: AsyncConnection, name: str, where: str = "pool") -> int:
        """Locks a pool row against other configuration changes (allocations are not blocked)."""
        pool_id = (
            await conn.execute(text("SELECT id FROM ipam_pools WHERE name = :name FOR NO KEY UPDATE"), {"name": name})
        ).scalar()
        if pool_id is None:
            raise PoolNotFound(f"{where}: pool {name!r} not found", field=where, pool=name)
        return int(pool_id)

    async def _bump(self, conn: AsyncConnection, pool_id: int) -> int:
        # A random version, not a counter: a restored backup or a re-created pool can never
        # present a (id, create_time, version) that a server cached for other contents.
        return int((await conn.execute(
            text("UPDATE ipam_pools SET version = floor(random() * 9e18)::bigint WHERE id = :p RETURNING version"),
            {"p": pool_id},
        )).scalar_one())

    async def delete_pool(self, name: str, force: bool) -> None:
        check_pool_name(name, "name")

        async def run(conn: AsyncConnection) -> None:
            row = (
                await conn.execute(text("SELECT id FROM ipam_pools WHERE name = :name FOR UPDATE"), {"name": name})
            ).first()
            if row is None:
                raise PoolNotFound(f"name: pool {name!r} not found", field="name", pool=name)
            # Lock the pool's blocks: waits for in-flight allocations to finish.
            await conn.execute(text("SELECT 1 FROM ipam_blocks WHERE pool_id = :p FOR UPDATE"), {"p": row.id})
            count = (
                await conn.execute(text("SELECT count(*) FROM ipam_allocations WHERE pool_id = :p"), {"p": row.id})
            ).scalar_one()
            if count and not force:
                raise PoolHasAllocations(
                    f"name: pool {name!r} still has {count} allocation(s); release them or delete with force",
                    field="name", pool=name,
                )
            await conn.execute(text("DELETE FROM ipam_cooldowns WHERE pool_id = :p"), {"p": row.id})
            await conn.execute(text("DELETE FROM ipam_blocks WHERE pool_id = :p"), {"p": row.id})
            await conn.execute(text("DELETE FROM ipam_pools WHERE id = :p"), {"p": row.id})

        await self._transaction(run)
        self.forget(name)

    async def update_pool(
        self, name: str, *, labels: dict[str, str] | None, cooldown_ms: int | None, strict_affinity: bool | None = None
    ) -> PoolInfo:
        check_pool_name(name, "pool.name")
        if labels is not None:
            labels = check_map(labels, "pool.labels")
        if cooldown_ms is not None:
            check_cooldown(cooldown_ms)

        async def run(conn: AsyncConnection) -> PoolInfo:
            pool_id = await self._lock_pool(conn, name, "pool.name")
            if labels is not None:
                await conn.execute(text("UPDATE ipam_pools SET labels = CAST(:l AS jsonb) WHERE id = :p"),
                                   {"l": json.dumps(labels), "p": pool_id})
            if cooldown_ms is not None:
                await conn.execute(text("UPDATE ipam_pools SET cooldown_ms = :c WHERE id = :p"),
                                   {"c": cooldown_ms, "p": pool_id})
            if strict_affinity is not None:
                await conn.execute(text("UPDATE ipam_pools SET node_affinity = :a WHERE id = :p"),
                                   {"a": 2 if strict_affinity else 1, "p": pool_id})
            return await self._pool_info(conn, await self._load_pool(conn, name))

        return await self._transaction(run)

    # -- reservations -----------------------------------------------------------------

    # Every step is set-based: one statement for the blocks, one for the held addresses, one
    # insert or delete and one update of the blocks, whatever the number of addresses; the
    # bitmaps are computed once per block from the ranges before and after (in a thread when
    # the pool has many reservations). Bounded by DSIPAM_MAX_RESERVATIONS_PER_POOL.

    def _parse_reservations(self, pool: StoredPool, addresses: Sequence[str]) -> list[tuple[StoredRange, Cidr]]:
        """Each address or CIDR with the range that holds it (INVALID_ARGUMENT naming the first
        that is in none). One bisect each: O(n log ranges)."""
        if not addresses:
            raise InvalidArgument("addresses: at least one address or CIDR is required", field="addresses")
        nets = parse_cidrs(addresses, lambda i: f"addresses[{i}]")
        bounds = sorted(((r.spec.network.version, int(r.spec.network.network_address)),
                         int(r.spec.network.broadcast_address), i) for i, r in enumerate(pool.ranges))
        keys = [b[0] for b in bounds]
        out = []
        for i, net in enumerate(nets):
            j = bisect.bisect_right(keys, (net.version, net.lo)) - 1
            if j < 0 or keys[j][0] != net.version or bounds[j][1] < net.hi:
                where = f"addresses[{i}]"
                raise InvalidArgument(f"{where}: {net} is not inside one of the pool's ranges", field=where)
            out.append((pool.ranges[bounds[j][2]], net))
        return out

    async def _blocks_touching(
        self, conn: AsyncConnection, pool: StoredPool, nets: Sequence[tuple[StoredRange, Cidr]]
    ) -> list[Any]:
        """Locks the pool's existing blocks that overlap ``nets`` (each with its range), in id order."""
        spans: dict[int, list[tuple[int, int]]] = {}
        specs: dict[int, RangeSpec] = {}
        for rng, net in nets:
            spec = specs.setdefault(rng.id, rng.spec)
            spans.setdefault(rng.id, []).append((spec.block_base(net.lo), spec.block_base(net.hi)))
        ids, los, his = [], [], []
        for range_id, of_range in spans.items():
            spec = specs[range_id]
            for lo, hi in merge_intervals(of_range):  # disjoint: no block comes twice
                ids.append(range_id)
                los.append(spec.block_cidr(lo))
                his.append(spec.block_cidr(hi))
        return list((await conn.execute(_SQL_BLOCKS_IN, {"ranges": ids, "lo": los, "hi": his})).mappings().all())

    async def _held_in_all(self, conn: AsyncConnection, pool_id: int, nets: Sequence[Cidr]) -> list[tuple[str, str]]:
        """(address, holder) of the allocations and cooldowns inside any of ``nets``."""
        los, his = [], []
        for version in (4, 6):
            for lo, hi in merge_intervals((n.lo, n.hi) for n in nets if n.version == version):
                los.append(str(Cidr(version, lo, 32 if version == 4 else 128).network_address))
                his.append(str(Cidr(version, hi, 32 if version == 4 else 128).network_address))
        rows = (await conn.execute(_SQL_HELD_IN, {"p": pool_id, "lo": los, "hi": his})).all()
        return [(r.ip, "cooldown" if r.cooling else f"owner {r.owner!r}") for r in rows]

    async def _held_in(self, conn: AsyncConnection, pool_id: int, net: IPNetwork) -> list[tuple[str, str]]:
        """(address, holder) of the allocations and cooldowns inside ``net``."""
        col = "ipv4" if net.version == 4 else "ipv6"
        params = {"p": pool_id, "lo": str(net.network_address), "hi": str(net.broadcast_address)}
        allocated = (
            await conn.execute(
                text(f"SELECT host({col}) AS ip, owner FROM ipam_allocations WHERE pool_id = :p "
                     f"AND {col} BETWEEN CAST(:lo AS inet) AND CAST(:hi AS inet)"),
                params,
            )
        ).all()
        cooling = (
            await conn.execute(
                text("SELECT host(address) AS ip, owner FROM ipam_cooldowns WHERE pool_id = :p "
                     "AND address BETWEEN CAST(:lo AS inet) AND CAST(:hi AS inet)"),
                params,
            )
        ).all()
        return [(r.ip, f"owner {r.owner!r}") for r in allocated] + [(r.ip, "cooldown") for r in cooling]

    async def _change_reservations(self, name: str, addresses: Sequence[str], force: bool, add: bool) -> PoolInfo:
        check_pool_name(name, "pool")
        if add:  # more than the bound in one call: refused before anything is parsed
            check_reservations_limit(len(set(addresses)), "addresses")

        async def run(conn: AsyncConnection) -> PoolInfo:
            pool_id = await self._lock_pool(conn, name)
            pool = await self._load_pool(conn, name)
            nets_in = await off_loop(len(addresses), self._parse_reservations, pool, addresses)
            nets = [n for _, n in nets_in]
            current = set(pool.reservations)
            if add:
                updated = current | set(nets)
                check_reservations_limit(len(updated), "addresses")  # before any write
            else:
                for i, net in enumerate(nets):
                    if net not in current:
                        raise InvalidArgument(f"addresses[{i}]: {net} is not reserved", field=f"addresses[{i}]")
                updated = current - set(nets)
            # Lock the ranges (block creation holds them) and then the blocks: after this, every
            # allocation in these blocks has committed and is visible to the next statements.
            await conn.execute(text("SELECT 1 FROM ipam_ranges WHERE pool_id = :p ORDER BY id FOR UPDATE"),
                               {"p": pool_id})
            blocks = await self._blocks_touching(conn, pool, nets_in)
            held_rows = await self._held_in_all(conn, pool_id, nets)
            if add:
                allocated = [f"{ip} ({who})" for ip, who in held_rows if who != "cooldown"]
                if allocated and not force:
                    shown = ", ".join(allocated[:5]) + (" …" if len(allocated) > 5 else "")
                    raise AddressAllocated(
                        f"addresses: {len(allocated)} address(es) are allocated: {shown}; reserve with force to "
                        "keep them from being handed out again after release",
                        field="addresses",
                    )
                new = sorted(set(nets) - current)
                if new:
                    await conn.execute(_SQL_INSERT_RESERVATIONS, {"p": pool_id, "c": [str(n) for n in new]})
            else:
                await conn.execute(
                    text("DELETE FROM ipam_reservations WHERE pool_id = :p AND cidr = ANY(CAST(:c AS cidr[]))"),
                    {"p": pool_id, "c": [str(n) for n in nets]},
                )
            held = {(a.version, int(a)) for a in (ipaddress.ip_address(ip) for ip, _ in held_rows)}
            after, writes = await off_loop(len(updated) + len(blocks), _plan_reservations, pool, updated, blocks,
                                           held)
            if writes:
                await conn.execute(_SQL_REWRITE_BLOCKS, {
                    "ids": [w[0] for w in writes], "bm": [w[1] for w in writes],
                    "f": [w[2] for w in writes], "a": [w[3] for w in writes],
                })
            version = await self._bump(conn, pool_id)
            # The new layout is the one just computed: cached as is, not read back and parsed again.
            new_pool = replace(pool, version=version, ranges=after, reservations=tuple(sorted(updated)))
            self.remember(new_pool)
            return await self._pool_info(conn, new_pool)

        return await self._transaction(run)

    async def reserve_addresses(self, name: str, addresses: Sequence[str], force: bool) -> PoolInfo:
        return await self._change_reservations(name, addresses, force, add=True)

    async def unreserve_addresses(self, name: str, addresses: Sequence[str]) -> PoolInfo:
        return await self._change_reservations(name, addresses, False, add=False)

    # -- ranges on a live pool --------------------------------------------------------

    async def add_pool_range(self, name: str, *, cidr: str, first: str = "", last: str = "", gateway: str = "",
                             exclude: Sequence[str] = (), block_size: int = 0) -> PoolInfo:
        check_pool_name(name, "pool")
        check_excludes_limit(len(exclude), "range.exclude")  # before parsing any
        spec = await off_loop(len(exclude), lambda: warm(build_range(
            cidr=cidr, first=first, last=last, gateway=gateway, exclude=exclude, block_size=block_size,
            where="range")))

        async def run(conn: AsyncConnection) -> PoolInfo:
            network = (
                await conn.execute(text("SELECT network FROM ipam_pools WHERE name = :name"), {"name": name})
            ).scalar()
            if network is None:
                raise PoolNotFound(f"pool: pool {name!r} not found", field="pool", pool=name)
            # The network's lock before the pool's row lock: the order CreatePool takes them in.
            await _lock_network(conn, network)
            pool_id = await self._lock_pool(conn, name)
            pool = await self._load_pool(conn, name)
            for other in pool.ranges:
                if other.spec.network.version == spec.network.version and other.spec.network.overlaps(spec.network):
                    raise InvalidArgument(f"range.cidr: {spec.cidr} overlaps the pool's range {other.spec.cidr}",
                                          field="range.cidr")
            await _refuse_overlap(conn, pool.network, spec, "range.cidr")
            check_excludes_limit(sum(len(r.spec.exclude) for r in pool.ranges) + len(spec.exclude), "range.exclude")
            position = (
                await conn.execute(text("SELECT coalesce(max(position), -1) + 1 FROM ipam_ranges WHERE pool_id = :p"),
                                   {"p": pool_id})
            ).scalar_one()
            with_reserved = spec.with_reserved(pool.reservations)
            params = _range_params(pool_id, position, spec, pool.network)
            first_block = with_reserved.first_block()
            params["next"] = str(spec.address(first_block)) if first_block is not None else None
            await _insert_range(conn, params, "range.cidr")
            await self._bump(conn, pool_id)
            return await self._pool_info(conn, await self._load_pool(conn, name))

        return await self._transaction(run)

    async def remove_pool_range(self, name: str, cidr: str) -> PoolInfo:
        check_pool_name(name, "pool")
        net = parse_network(cidr, "cidr")

        async def run(conn: AsyncConnection) -> PoolInfo:
            pool_id = await self._lock_pool(conn, name)
            pool = await self._load_pool(conn, name)
            rng = next((r for r in pool.ranges if r.spec.network == net), None)
            if rng is None:
                raise RangeNotFound(f"cidr: pool {name!r} has no range {net}", field="cidr")
            if len(pool.ranges) == 1:
                raise FailedPrecondition(f"cidr: {net} is the pool's last range; delete the pool instead",
                                         field="cidr")
            await conn.execute(text("SELECT 1 FROM ipam_ranges WHERE id = :r FOR UPDATE"), {"r": rng.id})
            await conn.execute(text("SELECT 1 FROM ipam_blocks WHERE range_id = :r ORDER BY id FOR UPDATE"),
                               {"r": rng.id})
            held = [x for x in await self._held_in(conn, pool_id, net) if x[1] != "cooldown"]
            if held:
                raise AddressAllocated(
                    f"cidr: {net} still holds {len(held)} allocation(s), such as {held[0][0]} ({held[0][1]}); "
                    "release them first",
                    field="cidr",
                )
            await conn.execute(
                text("DELETE FROM ipam_cooldowns WHERE pool_id = :p AND address <<= CAST(:c AS cidr)"),
                {"p": pool_id, "c": str(net)},
            )
            await conn.execute(text("DELETE FROM ipam_ranges WHERE id = :r"), {"r": rng.id})
            await self._bump(conn, pool_id)
            return await self._pool_info(conn, await self._load_pool(conn, name))

        return await self._transaction(run)

    # -- migration --------------------------------------------------------------------

    async def migrate_pool(self, name: str, policy: Policy, batch_size: int) -> AsyncIterator[MigrationProgress]:
        """Gives every owner what ``policy`` asks, in batches, yielding progress after each batch."""
        check_pool_name(name, "pool")
        if policy is Policy.SINGLE_STACK:
            raise InvalidArgument("ip_family_policy: must be PREFER_DUAL_STACK or REQUIRE_DUAL_STACK",
                                  field="ip_family_policy")
        if batch_size < 0 or batch_size > 1000:
            raise InvalidArgument(f"batch_size: {batch_size} must be between 0 and 1000", field="batch_size")
        batch = batch_size or 100
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                pool = await self._load_pool(conn, name)
                total = (await conn.execute(text("SELECT count(*) FROM ipam_allocations WHERE pool_id = :p"),
                                            {"p": pool.id})).scalar_one()
        processed = upgraded = failed = 0
        errors: list[str] = []
        after = ""
        while True:
            with unavailable_on_disconnect():
                async with self.engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            text("SELECT owner, node FROM ipam_allocations WHERE pool_id = :p AND owner > :after "
                                 "ORDER BY owner LIMIT :n"),
                            {"p": pool.id, "after": after, "n": batch},
                        )
                    ).all()
            if not rows:
                break
            owners = [r.owner for r in rows]
            for owner, node in rows:
                try:  # the owner's node is kept: a new family comes from that node's blocks
                    _, created = await self.allocate(  # type: ignore[attr-defined]
                        pool=name, owner=owner, policy=policy, families=(), addresses=(), attributes={},
                        node=node or "",
                    )
                    upgraded += int(created)
                except IpamError as exc:
                    failed += 1
                    if len(errors) < 20:
                        errors.append(f"{owner}: {exc.message}")
                processed += 1
            after = owners[-1]
            yield MigrationProgress(total, processed, upgraded, failed, tuple(errors))
        if processed == 0:  # an empty pool still gets one report
            yield MigrationProgress(total, processed, upgraded, failed, tuple(errors))

    # -- node affinity ----------------------------------------------------------------

    async def list_blocks(self, name: str, node: str, size: int, token: str) -> tuple[list[BlockInfo], str]:
        check_pool_name(name, "pool")
        check_node(node)
        limit = page_size(size)
        scope = page_scope(name, node=node)
        after = decode_page_token(token, "blocks", scope)
        _, rows = await self._read(SQL_READ_BLOCKS, name, "pool", node, int(after or 0), limit + 1)
        rows = [r for r in rows if r["block_id"] is not None]
        blocks = [BlockInfo(id=r["block_id"], cidr=r["cidr"], family=Family(r["family"]), node=r["block_node"] or "",
                            used=r["used"], free=r["free"]) for r in rows[:limit]]
        return blocks, (encode_page_token(str(rows[limit - 1]["block_id"]), "blocks", scope) if len(rows) > limit else "")

    async def release_node(self, name: str, node: str) -> tuple[list[BlockInfo], list[BlockInfo]]:
        """Frees the node's empty blocks; returns (released, kept)."""
        check_pool_name(name, "pool")
        if not check_node(node):
            raise InvalidArgument("node: required", field="node")

        async def run(conn: AsyncConnection) -> tuple[list[BlockInfo], list[BlockInfo]]:
            pool = await self._load_pool(conn, name)
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, host(base) || '/' || masklen(base) AS cidr, family, node, "
                        "avail_count - free_count AS used, free_count AS free, cooling FROM ipam_blocks "
                        "WHERE pool_id = :p AND node = :node ORDER BY id FOR UPDATE"
                    ),
                    {"p": pool.id, "node": node},
                )
            ).mappings().all()
            empty = [r["id"] for r in rows if r["used"] == 0]
            if empty:
                await conn.execute(text("UPDATE ipam_blocks SET node = NULL WHERE id = ANY(:ids)"), {"ids": empty})
            released = [_block({**r, "node": None}) for r in rows if r["id"] in set(empty)]
            kept = [_block(r) for r in rows if r["id"] not in set(empty)]
            return released, kept

        return await self._transaction(run)

    # -- events -----------------------------------------------------------------------

    async def read_events(self, name: str, token: str, limit: int = 500) -> tuple[list[Event], str]:
        """Events of pool ``name`` after ``token`` with a read of their own (store/_watch.py);
        watch streams are fed by the process's WatchHub."""
        return await read_events(self, name, token, limit)

    async def prune_events(self, retention_seconds: float = EVENT_RETENTION_SECONDS) -> int:
        async def run(conn: AsyncConnection) -> int:
            result = await conn.execute(
                text("DELETE FROM ipam_events WHERE id IN (SELECT id FROM ipam_events "
                     "WHERE time < now() - make_interval(secs => :r) LIMIT 10000)"),
                {"r": retention_seconds},
            )
            return int(result.rowcount or 0)

        return await self._transaction(run)  # type: ignore[attr-defined,no-any-return]



def _block(row: Any) -> BlockInfo:
    from ..domain import Family

    return BlockInfo(
        id=row["id"], cidr=row["cidr"], family=Family(row["family"]), node=row["node"] or "", used=int(row["used"]),
        free=int(row["free"]),
    )
