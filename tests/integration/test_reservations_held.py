"""Reservations of held addresses (allocated or in cooldown) and their lifting, in every order with
release and cooldown reclaim, keep `dsipam fsck` clean on both engines, and a reserved address is
never handed out (review of a417e1b, which fixed unreserving an allocated reserved address)."""

import asyncio
import ipaddress

import pytest

from dsipam.server.domain import Policy, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine
from dsipam.server.store._fast import FastPath

COOLDOWN_MS = 150


@pytest.fixture
def own_db():
    """A database of each test's own: the session's shared server reclaims the cooldowns of the
    shared database every 2 s (its maintenance loop), which would change these scenarios' steps
    (an address reclaimed before it is reserved "while cooling"), their reclaim counts, and the
    races that wait for this store's reclaim to find an expired cooldown (a CI run timed out so)."""
    from support import scratch_database

    with scratch_database("dsipam_test_held") as url:
        yield url


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_held_reservation_orders_keep_fsck_clean(own_db, fast):
    async def main():
        store = Store(create_engine(own_db, pool_size=2, max_overflow=2))
        if fast:
            store.fast = FastPath(own_db, pool_size=2)
        try:
            await store.create_pool(build_pool_spec("held", [RangeInput("198.18.3.0/28")], {}, COOLDOWN_MS))
            ip = {}
            for owner in "abcdef":
                info, _ = await store.allocate(pool="held", owner=owner, policy=Policy.SINGLE_STACK, families=(),
                                               addresses=(), attributes={})
                ip[owner] = info.addresses[0].ip

            async def clean(step):
                assert await store.fsck("held") == [], step

            async def cool_off():
                await _cooldowns_over(store)
                assert await store.reclaim_cooldowns() == 4  # a, b, c and d

            # a: reserved with force while allocated, released (cooling), unreserved while cooling, reclaimed.
            await store.reserve_addresses("held", [ip["a"]], True)
            await clean("a reserved with force")
            await store.release(pool="held", owner="a", families=())
            await clean("a released into cooldown while reserved")
            await store.unreserve_addresses("held", [ip["a"]])
            await clean("a unreserved while cooling")
            # b: released (cooling), reserved while cooling, reclaimed (retired), unreserved.
            await store.release(pool="held", owner="b", families=())
            await store.reserve_addresses("held", [ip["b"]], False)
            await clean("b reserved while cooling")
            # c: reserved with force twice over (its /32 and the /30 around it), the /32 lifted, released.
            net = ipaddress.ip_network(f"{ip['c']}/30", strict=False)
            await store.reserve_addresses("held", [ip["c"], str(net)], True)
            await clean("c reserved with force by two overlapping CIDRs")
            await store.unreserve_addresses("held", [ip["c"]])
            await clean("c's /32 lifted, its /30 kept")
            await store.release(pool="held", owner="c", families=())
            # d: released, reserved and unreserved while cooling.
            await store.release(pool="held", owner="d", families=())
            await store.reserve_addresses("held", [ip["d"]], False)
            await store.unreserve_addresses("held", [ip["d"]])
            await clean("d reserved and unreserved while cooling")
            await cool_off()
            await clean("cooldowns reclaimed")
            await store.unreserve_addresses("held", [ip["b"]])
            await clean("b unreserved after its reclaim")
            # e: reserved with force, released with no cooldown (retired), unreserved.
            await store.update_pool("held", labels=None, cooldown_ms=0)
            await store.reserve_addresses("held", [ip["e"]], True)
            await store.release(pool="held", owner="e", families=())
            await clean("e released while reserved, no cooldown")
            await store.unreserve_addresses("held", [ip["e"]])
            await clean("e unreserved after its release")
            # f: reserved with force, unreserved while still allocated, then released.
            await store.reserve_addresses("held", [ip["f"]], True)
            await store.unreserve_addresses("held", [ip["f"]])
            await clean("f unreserved while allocated")
            await store.release(pool="held", owner="f", families=())
            await clean("f released")
            # Every address that is not reserved is handed out again, and only those.
            reserved = {str(a) for a in net.hosts()} | {str(net.network_address), str(net.broadcast_address)}
            handed = set()
            for i in range(20):
                try:
                    info, _ = await store.allocate(pool="held", owner=f"z{i}", policy=Policy.SINGLE_STACK,
                                                   families=(), addresses=(), attributes={})
                except Exception as exc:  # noqa: BLE001 - exhausted: checked below
                    assert type(exc).__name__ == "PoolExhausted", exc
                    break
                handed.add(info.addresses[0].ip)
            assert not handed & reserved, handed & reserved
            assert {ip["a"], ip["b"], ip["d"], ip["e"], ip["f"]} - reserved <= handed
            await clean("pool filled")
            usage = (await store.get_pool("held")).usage[0]
            assert usage.allocated == len(handed) and usage.cooldown == 0 and usage.free == 0
        finally:
            await store.close()

    asyncio.run(main())



async def _handed_out(store, pool: str) -> list[str]:
    """Allocates single addresses of pool until it is exhausted (at most 10): what it hands out."""
    handed = []
    for i in range(10):
        try:
            info, _ = await store.allocate(pool=pool, owner=f"y{i}", policy=Policy.SINGLE_STACK,
                                           families=(), addresses=(), attributes={})
        except Exception as exc:  # noqa: BLE001 - exhausted: checked here
            assert type(exc).__name__ == "PoolExhausted", exc
            break
        handed.append(info.addresses[0].ip)
    return handed


async def _until_paused(store, task: asyncio.Task) -> None:
    """Waits (at most 30 s) until ``task`` pauses in the store's hook; fails, with what the task
    did, when it ends without reaching the hook."""
    paused = asyncio.create_task(store.paused.wait())
    await asyncio.wait([task, paused], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert paused.done(), f"the call ended without reaching the pause: {task}"


async def _kept_reserved(store, pool: str, ip: str) -> None:
    """fsck is clean, and the pool hands out every address it has but ``ip``."""
    assert await store.fsck(pool) == []
    assert ip not in await _handed_out(store, pool)
    assert await store.fsck(pool) == []


async def _cooldowns_over(store) -> None:
    """Waits until every cooldown has passed by the database's clock (the one the reclaim reads;
    a step of the machine's clock can put it behind a sleep of the test), at most 10 s."""
    from sqlalchemy import text

    for _ in range(200):
        async with store.engine.connect() as conn:
            if not (await conn.execute(text("SELECT 1 FROM ipam_cooldowns WHERE until > now()"))).first():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("a cooldown of at most 150 ms was not over after 10 s")


class _PausingStore(Store):
    """Store whose cooldown reclaim pauses right after it read a pool's layout (``hold`` set): the
    window in which a concurrent ReserveAddresses commits."""

    hold: asyncio.Event | None = None
    paused: asyncio.Event | None = None

    async def _load_pool_by_id(self, conn, pool_id):
        pool = await super()._load_pool_by_id(conn, pool_id)
        if self.hold is not None:
            self.paused.set()
            await self.hold.wait()
        return pool


def test_an_address_reserved_while_its_cooldown_is_reclaimed_stays_reserved(own_db):
    """Found by review: the reclaim read the pool's layout before it locked the block, so a
    reservation of the cooling address that committed in between (it saw the cooldown, which the
    reclaim had deleted but not committed, and left the bit alone) was undone: the reclaim freed the
    bit of a reserved address (fsck: held but not marked taken; the address handed out again)."""
    async def main():
        store = _PausingStore(create_engine(own_db, pool_size=3, max_overflow=2))
        try:
            await store.create_pool(build_pool_spec("race", [RangeInput("198.18.4.0/29")], {}, 50))
            info, _ = await store.allocate(pool="race", owner="x", policy=Policy.SINGLE_STACK, families=(),
                                           addresses=(), attributes={})
            x = info.addresses[0].ip
            await store.release(pool="race", owner="x", families=())
            await _cooldowns_over(store)
            store.hold, store.paused = asyncio.Event(), asyncio.Event()
            reclaim = asyncio.create_task(store.reclaim_cooldowns())
            await _until_paused(store, reclaim)
            reserve = asyncio.create_task(store.reserve_addresses("race", [x], False))
            await asyncio.wait([reserve], timeout=1.0)  # commits here unless the reclaim holds the block
            store.hold.set()
            assert await reclaim == 1
            await reserve
            store.hold = None
            await _kept_reserved(store, "race", x)
        finally:
            await store.close()

    asyncio.run(main())


class _PausingRelease(Store):
    """Store whose full-path release pauses before it gives an address back (``hold`` set): the
    window in which a concurrent ReserveAddresses with force commits."""

    hold: asyncio.Event | None = None
    paused: asyncio.Event | None = None

    async def _give_back(self, conn, pool, owner, ip):
        if self.hold is not None:
            self.paused.set()
            await self.hold.wait()
        return await super()._give_back(conn, pool, owner, ip)


def test_an_address_reserved_with_force_while_its_release_runs_stays_reserved(own_db):
    """Found by review: the full path's release decided from the layout it read when it started
    (free the bit, or retire a reserved address), so a reservation with force that committed in
    between (it saw the allocation, not yet deleted, and left the bit alone) was undone: the
    reserved address was freed (fsck: held but not marked taken) and handed out again."""
    async def main():
        store = _PausingRelease(create_engine(own_db, pool_size=3, max_overflow=2))
        try:
            await store.create_pool(build_pool_spec("race2", [RangeInput("198.18.5.0/29")], {}, 0))
            info, _ = await store.allocate(pool="race2", owner="x", policy=Policy.SINGLE_STACK, families=(),
                                           addresses=(), attributes={})
            x = info.addresses[0].ip
            store.hold, store.paused = asyncio.Event(), asyncio.Event()
            release = asyncio.create_task(store.release(pool="race2", owner="x", families=()))
            await _until_paused(store, release)
            reserve = asyncio.create_task(store.reserve_addresses("race2", [x], True))
            await asyncio.wait([reserve], timeout=1.0)  # commits here unless the release holds the block
            store.hold.set()
            assert [a.ip for a in await release] == [x]
            await reserve
            store.hold = None
            await _kept_reserved(store, "race2", x)
        finally:
            await store.close()

    asyncio.run(main())


class _PausingReservation(Store):
    """Store whose ReserveAddresses pauses once it holds the blocks' locks (``hold`` set)."""

    hold: asyncio.Event | None = None
    paused: asyncio.Event | None = None

    async def _held_in_all(self, conn, pool_id, nets):
        if self.hold is not None:
            self.paused.set()
            await self.hold.wait()
        return await super()._held_in_all(conn, pool_id, nets)


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
def test_a_release_that_waits_for_a_reservation_with_force_retires_the_address(own_db, fast):
    """The other order: the release reaches the block while the reservation holds it; when it gets
    the lock, it must see the reservation's new pool version (read by a statement of its own: a
    row joined to the locked block is the one of the statement's snapshot, from before the wait)."""
    async def main():
        store = _PausingReservation(create_engine(own_db, pool_size=3, max_overflow=2))
        if fast:
            store.fast = FastPath(own_db, pool_size=2)
        try:
            await store.create_pool(build_pool_spec("race3", [RangeInput("198.18.6.0/29")], {}, 0))
            info, _ = await store.allocate(pool="race3", owner="x", policy=Policy.SINGLE_STACK, families=(),
                                           addresses=(), attributes={})
            x = info.addresses[0].ip
            await store.get_pool("race3")  # the layout of this version is cached
            store.hold, store.paused = asyncio.Event(), asyncio.Event()
            reserve = asyncio.create_task(store.reserve_addresses("race3", [x], True))
            await _until_paused(store, reserve)
            release = asyncio.create_task(store.release(pool="race3", owner="x", families=()))
            await asyncio.wait([release], timeout=1.0)  # waits for the block
            store.hold.set()
            await reserve
            assert [a.ip for a in await release] == [x]
            store.hold = None
            await _kept_reserved(store, "race3", x)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("node", ["", "node-a"])
@pytest.mark.parametrize("default_isolation", ["", "repeatable read"])
def test_an_allocate_that_waits_for_a_reservations_range_lock_never_hands_out_the_reserved_address(
        own_db, node, default_isolation):
    """A ReserveAddresses holds the range's lock while it runs; an Allocate that must make a new block
    waits for that lock. When it gets it, the reservation has committed: the block must be made from
    the new layout, without the reserved address (the lock statement's own view of the pool row is
    from before its wait). Also when the database's default isolation is REPEATABLE READ, under
    which a statement would not see what committed during an earlier one's wait: the store's
    transactions and the fast path's sessions are READ COMMITTED whatever the default."""
    import asyncpg

    from dsipam.server.store._fast import asyncpg_dsn

    async def main():
        blocker = await asyncpg.connect(asyncpg_dsn(own_db))
        database = await blocker.fetchval("SELECT current_database()")
        if default_isolation:
            await blocker.execute(f"ALTER DATABASE {database} SET default_transaction_isolation = '{default_isolation}'")
        store = Store(create_engine(own_db, pool_size=4, max_overflow=4))
        store.fast = FastPath(own_db, pool_size=1)
        try:
            async with store.engine.connect() as conn:
                assert (await conn.exec_driver_sql("SHOW transaction_isolation")).scalar() == "read committed"
            assert [tuple(r) for r in await store.fast.fetch("SHOW transaction_isolation")] == [("read committed",)]
            if default_isolation:  # the setting took: a connection of the database's defaults has it
                other = await asyncpg.connect(asyncpg_dsn(own_db))
                assert await other.fetchval("SHOW transaction_isolation") == default_isolation
                await other.close()
            await store.create_pool(build_pool_spec("wait", [RangeInput("198.18.4.0/24")], {}, 0))
            pool_id = await blocker.fetchval("SELECT id FROM ipam_pools WHERE name = 'wait'")
            # The reservation is made to stall, holding its locks, on a row that another transaction
            # has inserted and not committed; the Allocate then queues on the range lock behind it.
            stall = blocker.transaction()
            await stall.start()
            await blocker.execute("INSERT INTO ipam_reservations (pool_id, cidr) VALUES ($1, '198.18.4.1/32')",
                                  pool_id)
            reserve = asyncio.create_task(store.reserve_addresses("wait", ["198.18.4.1"], False))
            await _waiting_for_a_lock(blocker, 1)
            alloc = asyncio.create_task(store.allocate(pool="wait", owner="a", policy=Policy.SINGLE_STACK,
                                                       families=(), addresses=(), attributes={}, node=node))
            await _waiting_for_a_lock(blocker, 2)
            await stall.rollback()
            info = await reserve
            got, created = await alloc
            assert info.reservations == ("198.18.4.1/32",)
            assert created and got.addresses[0].ip != "198.18.4.1"
            assert await store.fsck("wait") == []
        finally:
            if default_isolation:
                await blocker.execute(f"ALTER DATABASE {database} RESET default_transaction_isolation")
            await blocker.close()
            await store.close()

    asyncio.run(main())


async def _waiting_for_a_lock(conn, count: int) -> None:
    """Until ``count`` other backends of this database wait for a lock."""
    for _ in range(500):
        await conn.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first snapshot
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} backends came to wait for a lock")
