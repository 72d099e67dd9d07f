"""Every SQL statement of the service. Transactions and row locks live here.

Allocation takes row locks on block rows (``FOR UPDATE SKIP LOCKED`` first, so
that concurrent callers spread over blocks; then a waiting ``FOR UPDATE`` so that
nobody reports exhaustion while addresses remain). A pair is taken in one
transaction: when the second family fails, the rollback returns the first.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..domain import (
    AddressInfo,
    AddressInUse,
    AllocationInfo,
    Conflict,
    Family,
    FamilyUsage,
    InvalidArgument,
    OwnerHoldsOtherAddress,
    Policy,
    PoolAlreadyExists,
    PoolExhausted,
    PoolHasAllocations,
    PoolInfo,
    PoolNotFound,
    PoolSpec,
    RangeSpec,
    build_range,
    check_map,
    check_owner,
    check_pool_name,
    plan_allocation,
)
from ..domain._ranges import IPAddress
from .db import FOREIGN_KEY_VIOLATION, RETRYABLE_SQLSTATES, UNIQUE_VIOLATION, sqlstate, unavailable_on_disconnect

MAX_ATTEMPTS = 8
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class _Retry(Exception):
    """Internal: the transaction lost a race; run it again."""


@dataclass(frozen=True)
class StoredRange:
    id: int
    spec: RangeSpec


@dataclass(frozen=True)
class StoredPool:
    id: int
    name: str
    labels: dict[str, str]
    create_time: dt.datetime
    ranges: tuple[StoredRange, ...]

    @property
    def spec(self) -> PoolSpec:
        return PoolSpec(name=self.name, ranges=tuple(r.spec for r in self.ranges), labels=self.labels)

    @property
    def families(self) -> tuple[Family, ...]:
        return self.spec.families

    def ranges_of(self, family: Family) -> list[StoredRange]:
        return [r for r in self.ranges if r.spec.family is family]

    def range_holding(self, value: IPAddress) -> StoredRange | None:
        fam = Family(value.version)
        for r in self.ranges_of(fam):
            if value in r.spec.network:
                return r
        return None

    def address_info(self, value: IPAddress) -> AddressInfo:
        r = self.range_holding(value)
        fam = Family(value.version)
        if r is None:  # a range was removed under a live allocation; report what is known
            return AddressInfo(fam, str(value), fam.bits, "")
        gw = r.spec.gateway
        return AddressInfo(fam, str(value), r.spec.prefix_length, str(gw) if gw else "")


def encode_page_token(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"a": after}).encode()).decode()


def decode_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))["a"]
        if isinstance(value, str):
            return value
    except (ValueError, KeyError, TypeError):
        pass
    raise InvalidArgument("page_token: not a token returned by this service", field="page_token")


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size: {value} is negative", field="page_size")
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size: {value} is more than {MAX_PAGE_SIZE}", field="page_size")
    return value or DEFAULT_PAGE_SIZE


_FAMILY_COLUMN = {Family.IPV4: "ipv4", Family.IPV6: "ipv6"}

_SQL_POOL = text(
    """
    SELECT p.id, p.name, p.labels, p.create_time,
           r.id AS range_id, r.position, host(r.cidr) || '/' || masklen(r.cidr) AS cidr,
           host(r.first_ip) AS first_ip, host(r.last_ip) AS last_ip, host(r.gateway) AS gateway,
           r.exclude::text[] AS exclude, r.block_prefix
      FROM ipam_pools p LEFT JOIN ipam_ranges r ON r.pool_id = p.id
     WHERE p.name = :name
     ORDER BY r.position
    """
)

# Take the first free bit of an existing block that nobody else holds.
_SQL_TAKE_SKIP = text(
    """
    WITH b AS (
        SELECT id, position(B'0' IN bitmap) - 1 AS bit
          FROM ipam_blocks
         WHERE pool_id = :pool AND family = :family AND free_count > 0
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

_SQL_LOCK_RANGE_SKIP = text(
    """
    SELECT id, host(next_block) AS next_block
      FROM ipam_ranges
     WHERE pool_id = :pool AND family = :family AND next_block IS NOT NULL
     ORDER BY position
     LIMIT 1
       FOR UPDATE SKIP LOCKED
    """
)
_SQL_LOCK_RANGE_WAIT = text(str(_SQL_LOCK_RANGE_SKIP).replace("FOR UPDATE SKIP LOCKED", "FOR UPDATE"))

_SQL_INSERT_BLOCK = text(
    """
    INSERT INTO ipam_blocks (pool_id, range_id, family, base, bitmap, free_count, avail_count)
    VALUES (:pool, :range, :family, CAST(:base AS cidr), CAST(CAST(:bitmap AS text) AS varbit), :free, :avail)
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

_SQL_RETURN_BIT = text(
    """
    UPDATE ipam_blocks b
       SET bitmap = set_bit(b.bitmap, CAST(CAST(:ip AS inet) - b.base AS integer), 0), free_count = b.free_count + 1
      FROM ipam_ranges r
     WHERE r.pool_id = :pool AND r.cidr >>= CAST(:ip AS inet)
       AND b.range_id = r.id AND b.base = network(set_masklen(CAST(:ip AS inet), r.block_prefix))
       AND get_bit(b.bitmap, CAST(CAST(:ip AS inet) - b.base AS integer)) = 1
    RETURNING b.id
    """
)

_SQL_OWNER_FOR_UPDATE = text(
    """
    SELECT host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time
      FROM ipam_allocations
     WHERE pool_id = :pool AND owner = :owner
       FOR UPDATE
    """
)

_SQL_HOLDER = text(
    """
    SELECT owner FROM ipam_allocations
     WHERE pool_id = :pool AND (ipv4 = CAST(:ip AS inet) OR ipv6 = CAST(:ip AS inet))
    """
)

_SQL_USAGE = text(
    """
    SELECT r.pool_id, r.family, sum(r.size) AS size, coalesce(sum(u.used), 0) AS used
      FROM ipam_ranges r
      LEFT JOIN (SELECT range_id, sum(avail_count - free_count) AS used
                   FROM ipam_blocks WHERE pool_id = ANY(:pools) GROUP BY range_id) u ON u.range_id = r.id
     WHERE r.pool_id = ANY(:pools)
     GROUP BY r.pool_id, r.family
    """
)


def _to_int(text_ip: str) -> int:
    return int(ipaddress.ip_address(text_ip))


class Store:
    """The datastore. Every method runs its own transaction(s)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

    # -- transactions -----------------------------------------------------------------

    async def _transaction(self, fn, *args):  # type: ignore[no-untyped-def]
        """Runs ``fn(conn, *args)`` in a transaction, again on serialization failures and deadlocks."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                with unavailable_on_disconnect():
                    async with self.engine.begin() as conn:
                        return await fn(conn, *args)
            except _Retry:
                pass
            except sqlalchemy.exc.DBAPIError as exc:
                if sqlstate(exc) not in RETRYABLE_SQLSTATES:
                    raise
            await asyncio.sleep(random.uniform(0, 0.002 * (2**attempt)))
        raise Conflict("the operation lost a race with concurrent writers too many times; retry it")

    # -- pools ------------------------------------------------------------------------

    async def _load_pool(self, conn: AsyncConnection, name: str, where: str = "pool") -> StoredPool:
        rows = (await conn.execute(_SQL_POOL, {"name": name})).mappings().all()
        if not rows:
            raise PoolNotFound(f"{where}: pool {name!r} not found", field=where, pool=name)
        head = rows[0]
        ranges = []
        for row in rows:
            if row["range_id"] is None:
                continue
            spec = build_range(
                cidr=row["cidr"],
                first=row["first_ip"] or "",
                last=row["last_ip"] or "",
                gateway=row["gateway"] or "",
                exclude=row["exclude"] or (),
                block_size=0,
            )
            spec = _with_block_prefix(spec, row["block_prefix"])
            ranges.append(StoredRange(row["range_id"], spec))
        return StoredPool(head["id"], head["name"], dict(head["labels"]), head["create_time"], tuple(ranges))

    async def _usage(self, conn: AsyncConnection, pools: Sequence[StoredPool]) -> dict[int, tuple[FamilyUsage, ...]]:
        ids = [p.id for p in pools]
        rows = (await conn.execute(_SQL_USAGE, {"pools": ids})).mappings().all()
        by_pool: dict[int, dict[Family, FamilyUsage]] = {i: {} for i in ids}
        for row in rows:
            fam = Family(row["family"])
            by_pool[row["pool_id"]][fam] = FamilyUsage(fam, int(row["size"]), int(row["used"]))
        out = {}
        for p in pools:
            out[p.id] = tuple(by_pool[p.id][f] for f in p.families if f in by_pool[p.id])
        return out

    async def _pool_info(self, conn: AsyncConnection, pool: StoredPool) -> PoolInfo:
        usage = await self._usage(conn, [pool])
        return PoolInfo(pool.spec, usage[pool.id], pool.create_time)

    async def create_pool(self, spec: PoolSpec) -> PoolInfo:
        async def run(conn: AsyncConnection) -> PoolInfo:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO ipam_pools (name, labels) VALUES (:name, CAST(:labels AS jsonb)) "
                        "ON CONFLICT (name) DO NOTHING RETURNING id"
                    ),
                    {"name": spec.name, "labels": json.dumps(dict(spec.labels))},
                )
            ).first()
            if row is None:
                raise PoolAlreadyExists(f"pool.name: pool {spec.name!r} already exists", field="pool.name")
            for position, r in enumerate(spec.ranges):
                first_block = r.first_block()
                await conn.execute(
                    text(
                        """
                        INSERT INTO ipam_ranges (pool_id, position, family, cidr, first_ip, last_ip, gateway,
                                                 exclude, block_prefix, size, next_block)
                        VALUES (:pool, :position, :family, CAST(:cidr AS cidr), CAST(:first AS inet),
                                CAST(:last AS inet), CAST(:gateway AS inet), CAST(:exclude AS cidr[]),
                                :block_prefix, :size, CAST(:next AS inet))
                        """
                    ),
                    {
                        "pool": row.id,
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
                    },
                )
            return await self._pool_info(conn, await self._load_pool(conn, spec.name))

        return await self._transaction(run)

    async def get_pool(self, name: str) -> PoolInfo:
        check_pool_name(name, "name")
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                return await self._pool_info(conn, await self._load_pool(conn, name, "name"))

    async def list_pools(self, size: int, token: str) -> tuple[list[PoolInfo], str]:
        limit = page_size(size)
        after = decode_page_token(token)
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
                more = len(names) > limit
                pools = []
                for name in names[:limit]:
                    try:
                        pools.append(await self._load_pool(conn, name))
                    except PoolNotFound:  # deleted between the two reads
                        continue
                usage = await self._usage(conn, pools) if pools else {}
        infos = [PoolInfo(p.spec, usage[p.id], p.create_time) for p in pools]
        return infos, (encode_page_token(names[limit - 1]) if more else "")

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
                    field="name",
                    pool=name,
                )
            await conn.execute(text("DELETE FROM ipam_blocks WHERE pool_id = :p"), {"p": row.id})
            await conn.execute(text("DELETE FROM ipam_pools WHERE id = :p"), {"p": row.id})

        await self._transaction(run)

    # -- allocation -------------------------------------------------------------------

    async def allocate(
        self,
        *,
        pool: str,
        owner: str,
        policy: Policy,
        families: Sequence[Family],
        addresses: Sequence[str],
        attributes: dict[str, str],
    ) -> tuple[AllocationInfo, bool]:
        check_pool_name(pool, "pool")
        check_owner(owner)
        check_map(attributes, "attributes")

        async def run(conn: AsyncConnection) -> tuple[AllocationInfo, bool]:
            stored = await self._load_pool(conn, pool)
            plan = plan_allocation(
                pool_families=stored.families, policy=policy, families=families, addresses=addresses
            )
            row = (await conn.execute(_SQL_OWNER_FOR_UPDATE, {"pool": stored.id, "owner": owner})).mappings().first()
            held: dict[Family, IPAddress] = {}
            if row is not None:
                for fam, col in _FAMILY_COLUMN.items():
                    if row[col]:
                        held[fam] = ipaddress.ip_address(row[col])
            for fam, addr in plan.addresses.items():
                if fam in held and held[fam] != addr:
                    raise OwnerHoldsOtherAddress(
                        f"addresses: owner {owner!r} already holds {held[fam]} for {fam.label}, not {addr}",
                        field="addresses",
                    )
            missing = sorted(f for f in plan.wanted if f not in held)  # IPv4 first: one lock order
            taken: dict[Family, IPAddress] = {}
            for fam in missing:
                if fam in plan.addresses:
                    addr = plan.addresses[fam]
                    where = f"addresses[{[str(x) for x in plan.addresses.values()].index(str(addr))}]"
                    await self._take_specific(conn, stored, addr, where)
                    taken[fam] = addr
                    continue
                got = await self._take_any(conn, stored, fam)
                if got is not None:
                    taken[fam] = got
                elif fam in plan.required:
                    raise PoolExhausted(
                        f"pool: {pool!r} has no free {fam.label} address", field="pool", pool=pool, family=fam.label
                    )
            if not taken and not held:
                labels = "/".join(f.label for f in missing)
                raise PoolExhausted(f"pool: {pool!r} has no free {labels} address", field="pool", pool=pool)
            if row is None:
                created = (
                    await conn.execute(
                        text(
                            """
                            INSERT INTO ipam_allocations (pool_id, owner, ipv4, ipv6, attributes)
                            VALUES (:pool, :owner, CAST(:ipv4 AS inet), CAST(:ipv6 AS inet), CAST(:attrs AS jsonb))
                            ON CONFLICT (pool_id, owner) DO NOTHING
                            RETURNING attributes, create_time
                            """
                        ),
                        {
                            "pool": stored.id,
                            "owner": owner,
                            "ipv4": str(taken[Family.IPV4]) if Family.IPV4 in taken else None,
                            "ipv6": str(taken[Family.IPV6]) if Family.IPV6 in taken else None,
                            "attrs": json.dumps(attributes),
                        },
                    )
                ).mappings().first()
                if created is None:  # a concurrent Allocate for the same owner won: read its result
                    raise _Retry()
                attrs, create_time = created["attributes"], created["create_time"]
            else:
                attrs, create_time = row["attributes"], row["create_time"]
                if taken:
                    sets = ", ".join(f"{_FAMILY_COLUMN[f]} = CAST(:{_FAMILY_COLUMN[f]} AS inet)" for f in taken)
                    await conn.execute(
                        text(f"UPDATE ipam_allocations SET {sets} WHERE pool_id = :pool AND owner = :owner"),
                        {"pool": stored.id, "owner": owner, **{_FAMILY_COLUMN[f]: str(a) for f, a in taken.items()}},
                    )
            held.update(taken)
            info = _allocation_info(stored, owner, held, plan.order, attrs, create_time)
            return info, bool(taken)

        try:
            return await self._transaction(run)
        except sqlalchemy.exc.IntegrityError as exc:
            code = sqlstate(exc)
            if code == FOREIGN_KEY_VIOLATION:  # the pool was deleted under us
                raise PoolNotFound(f"pool: pool {pool!r} not found", field="pool", pool=pool) from None
            if code == UNIQUE_VIOLATION:  # the engine's own bookkeeping disagrees with the constraint
                raise AddressInUse("addresses: an address was taken concurrently; retry", field="addresses") from None
            raise

    async def _take_any(self, conn: AsyncConnection, pool: StoredPool, fam: Family) -> IPAddress | None:
        params = {"pool": pool.id, "family": int(fam)}
        ip = (await conn.execute(_SQL_TAKE_SKIP, params)).scalar()
        if ip is not None:
            return ipaddress.ip_address(ip)
        for lock_sql in (_SQL_LOCK_RANGE_SKIP, _SQL_LOCK_RANGE_WAIT):
            rng = (await conn.execute(lock_sql, params)).first()
            if rng is not None:
                got = await self._new_block(conn, pool, rng.id, rng.next_block)
                if got is not None:
                    return got
                return await self._take_any(conn, pool, fam)  # that range is used up; look again
        ip = (await conn.execute(_SQL_TAKE_WAIT, params)).scalar()
        return ipaddress.ip_address(ip) if ip is not None else None

    async def _new_block(self, conn: AsyncConnection, pool: StoredPool, range_id: int, next_block: str) -> IPAddress | None:
        """Creates the next block of a locked range and takes its first free address."""
        spec = next(r.spec for r in pool.ranges if r.id == range_id)
        base: int | None = spec.next_block_from(_to_int(next_block))
        while base is not None:
            following = spec.following_block(base)
            bitmap, free = spec.block_mask(base)
            if free:
                bit = bitmap.index("0")
                bitmap = bitmap[:bit] + "1" + bitmap[bit + 1 :]
                created = (
                    await conn.execute(
                        _SQL_INSERT_BLOCK,
                        {
                            "pool": pool.id,
                            "range": range_id,
                            "family": int(spec.family),
                            "base": spec.block_cidr(base),
                            "bitmap": bitmap,
                            "free": free - 1,
                            "avail": free,
                        },
                    )
                ).first()
                if created is not None:
                    nxt = str(spec.address(following)) if following is not None else None
                    await conn.execute(_SQL_SET_NEXT_BLOCK, {"range": range_id, "next": nxt})
                    return spec.address(base + bit)
            base = following
        await conn.execute(_SQL_SET_NEXT_BLOCK, {"range": range_id, "next": None})
        return None

    async def _take_specific(self, conn: AsyncConnection, pool: StoredPool, addr: IPAddress, where: str) -> None:
        rng = pool.range_holding(addr)
        value = int(addr)
        if rng is None:
            raise InvalidArgument(f"{where}: {addr} is outside the pool's ranges", field=where)
        spec = rng.spec
        if not spec.is_available(value):
            raise InvalidArgument(f"{where}: {addr} {spec.why_unavailable(value)} of {spec.cidr}", field=where)
        base = spec.block_base(value)
        bitmap, free = spec.block_mask(base)
        await conn.execute(
            _SQL_INSERT_BLOCK,
            {
                "pool": pool.id,
                "range": rng.id,
                "family": int(spec.family),
                "base": spec.block_cidr(base),
                "bitmap": bitmap,
                "free": free,
                "avail": free,
            },
        )
        row = (
            await conn.execute(
                _SQL_TAKE_SPECIFIC, {"range": rng.id, "base": spec.block_cidr(base), "bit": value - base}
            )
        ).first()
        if row is None:
            holder = (await conn.execute(_SQL_HOLDER, {"pool": pool.id, "ip": str(addr)})).scalar()
            who = f"owner {holder!r}" if holder else "another owner"
            raise AddressInUse(f"{where}: {addr} is held by {who}", field=where, address=str(addr))

    async def release(self, *, pool: str, owner: str, families: Sequence[Family]) -> list[AddressInfo]:
        check_pool_name(pool, "pool")
        check_owner(owner)

        async def run(conn: AsyncConnection) -> list[AddressInfo]:
            stored = await self._load_pool(conn, pool)
            row = (await conn.execute(_SQL_OWNER_FOR_UPDATE, {"pool": stored.id, "owner": owner})).mappings().first()
            if row is None:
                return []
            held = {f: row[c] for f, c in _FAMILY_COLUMN.items() if row[c]}
            drop = [f for f in sorted(set(families) if families else set(held)) if f in held]
            released = []
            for fam in drop:
                await conn.execute(_SQL_RETURN_BIT, {"pool": stored.id, "ip": held[fam]})
                released.append(stored.address_info(ipaddress.ip_address(held[fam])))
            if not drop:
                return []
            if len(drop) == len(held):
                await conn.execute(
                    text("DELETE FROM ipam_allocations WHERE pool_id = :pool AND owner = :owner"),
                    {"pool": stored.id, "owner": owner},
                )
            else:
                sets = ", ".join(f"{_FAMILY_COLUMN[f]} = NULL" for f in drop)
                await conn.execute(
                    text(f"UPDATE ipam_allocations SET {sets} WHERE pool_id = :pool AND owner = :owner"),
                    {"pool": stored.id, "owner": owner},
                )
            return released

        return await self._transaction(run)

    async def get_allocation(self, *, pool: str, owner: str) -> AllocationInfo | None:
        check_pool_name(pool, "pool")
        check_owner(owner)
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                stored = await self._load_pool(conn, pool)
                row = (
                    await conn.execute(
                        text(
                            "SELECT host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time "
                            "FROM ipam_allocations WHERE pool_id = :pool AND owner = :owner"
                        ),
                        {"pool": stored.id, "owner": owner},
                    )
                ).mappings().first()
        if row is None:
            return None
        return _row_allocation(stored, owner, row)

    async def list_allocations(self, *, pool: str, size: int, token: str) -> tuple[list[AllocationInfo], str]:
        check_pool_name(pool, "pool")
        limit = page_size(size)
        after = decode_page_token(token)
        with unavailable_on_disconnect():
            async with self.engine.connect() as conn:
                stored = await self._load_pool(conn, pool)
                rows = (
                    await conn.execute(
                        text(
                            "SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time "
                            "FROM ipam_allocations WHERE pool_id = :pool "
                            "AND (CAST(:after AS text) IS NULL OR owner > :after) ORDER BY owner LIMIT :limit"
                        ),
                        {"pool": stored.id, "after": after, "limit": limit + 1},
                    )
                ).mappings().all()
        out = [_row_allocation(stored, r["owner"], r) for r in rows[:limit]]
        return out, (encode_page_token(rows[limit - 1]["owner"]) if len(rows) > limit else "")

    async def garbage_collect(
        self, *, pool: str, valid_owners: Sequence[str], grace_seconds: float
    ) -> list[AllocationInfo]:
        """Releases the pool's allocations whose owner is not valid and which are older than the grace."""
        check_pool_name(pool, "pool")
        if grace_seconds < 0:
            raise InvalidArgument(f"grace: {grace_seconds}s is negative", field="grace")
        for i, owner in enumerate(valid_owners):
            check_owner(owner, f"valid_owners[{i}]")

        async def run(conn: AsyncConnection) -> list[AllocationInfo]:
            stored = await self._load_pool(conn, pool)
            rows = (
                await conn.execute(
                    text(
                        """
                        SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes, create_time
                          FROM ipam_allocations
                         WHERE pool_id = :pool AND NOT (owner = ANY(:valid))
                           AND create_time < now() - make_interval(secs => :grace)
                         ORDER BY owner
                           FOR UPDATE
                        """
                    ),
                    {"pool": stored.id, "valid": list(valid_owners), "grace": float(grace_seconds)},
                )
            ).mappings().all()
            released = []
            for row in rows:
                for col in ("ipv4", "ipv6"):
                    if row[col]:
                        await conn.execute(_SQL_RETURN_BIT, {"pool": stored.id, "ip": row[col]})
                released.append(_row_allocation(stored, row["owner"], row))
            if rows:
                await conn.execute(
                    text("DELETE FROM ipam_allocations WHERE pool_id = :pool AND owner = ANY(:owners)"),
                    {"pool": stored.id, "owners": [r["owner"] for r in rows]},
                )
            return released

        return await self._transaction(run)

    # -- consistency ------------------------------------------------------------------

    async def fsck(self, pool: str) -> list[str]:
        """Checks that block bitmaps agree exactly with the allocations. Returns the problems found."""
        check_pool_name(pool, "pool")
        with unavailable_on_disconnect():
            async with self.engine.begin() as conn:
                await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                stored = await self._load_pool(conn, pool)
                blocks = (
                    await conn.execute(
                        text(
                            "SELECT id, range_id, host(base) AS base, bitmap::text AS bitmap, free_count, avail_count "
                            "FROM ipam_blocks WHERE pool_id = :p"
                        ),
                        {"p": stored.id},
                    )
                ).mappings().all()
                allocs = (
                    await conn.execute(
                        text("SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6 FROM ipam_allocations WHERE pool_id = :p"),
                        {"p": stored.id},
                    )
                ).mappings().all()
        from ..domain._fsck import check_consistency

        return check_consistency(stored.ranges, blocks, allocs)


def _with_block_prefix(spec: RangeSpec, block_prefix: int) -> RangeSpec:
    from dataclasses import replace

    return replace(spec, block_prefix=block_prefix)


def _allocation_info(
    pool: StoredPool,
    owner: str,
    held: dict[Family, IPAddress],
    order: Sequence[Family],
    attributes: dict[str, str],
    create_time: dt.datetime,
) -> AllocationInfo:
    fams = [f for f in order if f in held] + [f for f in held if f not in order]
    return AllocationInfo(
        pool=pool.name,
        owner=owner,
        addresses=tuple(pool.address_info(held[f]) for f in fams),
        attributes=dict(attributes),
        create_time=create_time,
    )


def _row_allocation(pool: StoredPool, owner: str, row) -> AllocationInfo:  # type: ignore[no-untyped-def]
    held = {f: ipaddress.ip_address(row[c]) for f, c in _FAMILY_COLUMN.items() if row[c]}
    return _allocation_info(pool, owner, held, pool.families, row["attributes"], row["create_time"])
