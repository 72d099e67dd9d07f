"""Pool management: create, read, list, delete, update, reservations, ranges, migration, events."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import (
    AddressAllocated,
    BlockInfo,
    FailedPrecondition,
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
from ..domain._ranges import IPNetwork, RangeSpec, parse_address_or_network, parse_network
from ._base import StoredPool, decode_page_token, encode_page_token, page_size, pool_info
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


async def _insert_range(conn: AsyncConnection, params: dict[str, Any], where: str) -> None:
    try:
        await conn.execute(_SQL_INSERT_RANGE, params)
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


class AdminStore:
    """Mixed into Store (with AllocationStore, which provides the base)."""

    # -- pools ------------------------------------------------------------------------

    async def create_pool(self, spec: PoolSpec) -> PoolInfo:
        async def run(conn: AsyncConnection) -> PoolInfo:
            await _lock_network(conn, spec.network)
            for position, r in enumerate(spec.ranges):
                await _refuse_overlap(conn, spec.network, r, f"pool.ranges[{position}].cidr")
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO ipam_pools (name, labels, cooldown_ms, node_affinity, network, version) "
                        "VALUES (:name, CAST(:labels AS jsonb), :cooldown, :affinity, :network, "
                        "floor(random() * 9e18)::bigint) ON CONFLICT (name) DO NOTHING RETURNING id"
                    ),
                    {"name": spec.name, "labels": json.dumps(dict(spec.labels)), "cooldown": spec.cooldown_ms,
                     "affinity": 2 if spec.strict_affinity else 1, "network": spec.network},
                )
            ).first()
            if row is None:
                raise PoolAlreadyExists(f"pool.name: pool {spec.name!r} already exists", field="pool.name")
            for position, r in enumerate(spec.ranges):
                await _insert_range(conn, _range_params(row.id, position, r, spec.network),
                                    f"pool.ranges[{position}].cidr")
            return await self._pool_info(conn, await self._load_pool(conn, spec.name))

        return await self._transaction(run)

    async def get_pool(self, name: str) -> PoolInfo:
        check_pool_name(name, "name")
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                return await self._pool_info(conn, await self._load_pool(conn, name, "name"))

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

    async def _bump(self, conn: AsyncConnection, pool_id: int) -> None:
        # A random version, not a counter: a restored backup or a re-created pool can never
        # present a (id, create_time, version) that a server cached for other contents.
        await conn.execute(
            text("UPDATE ipam_pools SET version = floor(random() * 9e18)::bigint WHERE id = :p"), {"p": pool_id}
        )

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

    def _parse_reservations(self, pool: StoredPool, addresses: Sequence[str]) -> list[IPNetwork]:
        if not addresses:
            raise InvalidArgument("addresses: at least one address or CIDR is required", field="addresses")
        nets = []
        for i, text_ in enumerate(addresses):
            where = f"addresses[{i}]"
            net = parse_address_or_network(text_, where)
            if not any(r.spec.network.version == net.version and net.subnet_of(r.spec.network)  # type: ignore[arg-type]
                       for r in pool.ranges):
                raise InvalidArgument(f"{where}: {net} is not inside one of the pool's ranges", field=where)
            nets.append(net)
        return nets

    async def _blocks_touching(self, conn: AsyncConnection, pool: StoredPool, nets: Sequence[IPNetwork]) -> list[Any]:
        """Locks the pool's existing blocks that overlap ``nets``, in id order."""
        out: dict[int, Any] = {}
        for net in nets:
            for rng in pool.ranges:
                spec = rng.spec
                if spec.network.version != net.version or not net.overlaps(spec.network):
                    continue
                lo = spec.block_cidr(spec.block_base(int(net.network_address)))
                hi = spec.block_cidr(spec.block_base(int(net.broadcast_address)))
                rows = (
                    await conn.execute(
                        text(
                            "SELECT id, range_id, host(base) AS base, bitmap::text AS bitmap, free_count, avail_count "
                            "FROM ipam_blocks WHERE range_id = :r AND base BETWEEN CAST(:lo AS cidr) AND CAST(:hi AS cidr) "
                            "ORDER BY id FOR UPDATE"
                        ),
                        {"r": rng.id, "lo": lo, "hi": hi},
                    )
                ).mappings().all()
                for row in rows:
                    out[row["id"]] = row
        return [out[k] for k in sorted(out)]

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

    async def _rewrite_blocks(
        self, conn: AsyncConnection, old: StoredPool, new_reservations: tuple[IPNetwork, ...], blocks: list[Any],
        held: set[int],
    ) -> None:
        """Applies a change of reservations to existing blocks."""
        for b in blocks:
            rng = old.range_by_id(b["range_id"])
            if rng is None:
                continue
            before = rng.spec
            after = before.with_reserved(new_reservations)
            base = int(ipaddress.ip_address(b["base"]))
            bits = bytearray(b["bitmap"].encode())
            free, avail = b["free_count"], b["avail_count"]
            for i in range(before.block_size):
                value = base + i
                was, now = before.is_available(value), after.is_available(value)
                if was == now:
                    continue
                if was and not now:  # newly reserved
                    if value not in held and bits[i] == ord("0"):
                        bits[i] = ord("1")
                        free -= 1
                        avail -= 1
                else:  # reservation lifted
                    if value in held:
                        avail += 1
                    elif bits[i] == ord("1"):
                        bits[i] = ord("0")
                        free += 1
                        avail += 1
            if (bits.decode(), free, avail) != (b["bitmap"], b["free_count"], b["avail_count"]):
                await conn.execute(
                    text("UPDATE ipam_blocks SET bitmap = CAST(CAST(:bm AS text) AS varbit), free_count = :f, "
                         "avail_count = :a WHERE id = :id"),
                    {"bm": bits.decode(), "f": free, "a": avail, "id": b["id"]},
                )

    async def _change_reservations(self, name: str, addresses: Sequence[str], force: bool, add: bool) -> PoolInfo:
        check_pool_name(name, "pool")

        async def run(conn: AsyncConnection) -> PoolInfo:
            pool_id = await self._lock_pool(conn, name)
            pool = await self._load_pool(conn, name)
            nets = self._parse_reservations(pool, addresses)
            # Lock the ranges (block creation holds them) and then the blocks: after this, every
            # allocation in these blocks has committed and is visible to the next statements.
            await conn.execute(text("SELECT 1 FROM ipam_ranges WHERE pool_id = :p ORDER BY id FOR UPDATE"),
                               {"p": pool_id})
            blocks = await self._blocks_touching(conn, pool, nets)
            held_rows: list[tuple[str, str]] = []
            for net in nets:
                held_rows += await self._held_in(conn, pool_id, net)
            current = set(pool.reservations)
            if add:
                allocated = [f"{ip} ({who})" for ip, who in held_rows if who != "cooldown"]
                if allocated and not force:
                    shown = ", ".join(allocated[:5]) + (" …" if len(allocated) > 5 else "")
                    raise AddressAllocated(
                        f"addresses: {len(allocated)} address(es) are allocated: {shown}; reserve with force to "
                        "keep them from being handed out again after release",
                        field="addresses",
                    )
                updated = tuple(sorted(current | set(nets), key=str))
                for net in nets:
                    await conn.execute(
                        text("INSERT INTO ipam_reservations (pool_id, cidr) VALUES (:p, CAST(:c AS cidr)) "
                             "ON CONFLICT DO NOTHING"),
                        {"p": pool_id, "c": str(net)},
                    )
            else:
                for i, net in enumerate(nets):
                    if net not in current:
                        raise InvalidArgument(f"addresses[{i}]: {net} is not reserved", field=f"addresses[{i}]")
                updated = tuple(sorted(current - set(nets), key=str))
                await conn.execute(
                    text("DELETE FROM ipam_reservations WHERE pool_id = :p AND cidr = ANY(CAST(:c AS cidr[]))"),
                    {"p": pool_id, "c": [str(n) for n in nets]},
                )
            held = {int(ipaddress.ip_address(ip)) for ip, _ in held_rows}
            await self._rewrite_blocks(conn, pool, updated, blocks, held)
            await self._bump(conn, pool_id)
            return await self._pool_info(conn, await self._load_pool(conn, name))

        return await self._transaction(run)

    async def reserve_addresses(self, name: str, addresses: Sequence[str], force: bool) -> PoolInfo:
        return await self._change_reservations(name, addresses, force, add=True)

    async def unreserve_addresses(self, name: str, addresses: Sequence[str]) -> PoolInfo:
        return await self._change_reservations(name, addresses, False, add=False)

    # -- ranges on a live pool --------------------------------------------------------

    async def add_pool_range(self, name: str, *, cidr: str, first: str = "", last: str = "", gateway: str = "",
                             exclude: Sequence[str] = (), block_size: int = 0) -> PoolInfo:
        check_pool_name(name, "pool")
        spec = build_range(cidr=cidr, first=first, last=last, gateway=gateway, exclude=exclude,
                           block_size=block_size, where="range")

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
        after = decode_page_token(token, "blocks")
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                pool = await self._load_pool(conn, name)
                rows = (
                    await conn.execute(
                        text(
                            "SELECT id, host(base) || '/' || masklen(base) AS cidr, family, node, "
                            "avail_count - free_count AS used, free_count AS free FROM ipam_blocks "
                            "WHERE pool_id = :p AND (CAST(:node AS text) = '' OR node = :node) "
                            "AND id > :after ORDER BY id LIMIT :limit"
                        ),
                        {"p": pool.id, "node": node, "after": int(after or 0), "limit": limit + 1},
                    )
                ).mappings().all()
        blocks = [_block(r) for r in rows[:limit]]
        return blocks, (encode_page_token(str(rows[limit - 1]["id"]), "blocks") if len(rows) > limit else "")

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
