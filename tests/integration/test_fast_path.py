"""The batched fast path: concurrent Allocates share round trips and stay exact."""

import asyncio

import pytest

from dsipam.server.domain import Family, Policy, PoolExhausted, PoolNotFound, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine
from dsipam.server.store._fast import FastPath


async def _store(db_url, fast=True):
    store = Store(create_engine(db_url, pool_size=4, max_overflow=4))
    if fast:
        store.fast = FastPath(db_url, pool_size=2)
    return store


def test_concurrent_allocates_are_coalesced_and_exact(clean_db):
    async def main():
        store = await _store(clean_db)
        try:
            spec = build_pool_spec("fast", [RangeInput("198.18.0.0/24"), RangeInput("fd00::/120")], {}, 0)
            await store.create_pool(spec)
            # Fill the first blocks through the full path so that the fast path has blocks to use.
            results = await asyncio.gather(*(
                store.allocate(pool="fast", owner=f"o{i}", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                               addresses=(), attributes={"i": str(i)})
                for i in range(300)), return_exceptions=True)
            ok = [r for r in results if not isinstance(r, Exception)]
            errors = [r for r in results if isinstance(r, Exception)]
            assert len(ok) == 254 and len(errors) == 46
            assert all(isinstance(e, PoolExhausted) for e in errors)
            ips = [a.ip for info, _ in ok for a in info.addresses]
            assert len(ips) == len(set(ips)) == 508
            assert store.fast.requests >= 100  # most went the fast path...
            assert store.fast.batches < store.fast.requests / 2  # ...several to a round trip
            again = await store.allocate(pool="fast", owner="o1", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                         addresses=(), attributes={})
            assert again[1] is False and again[0].attributes == {"i": "1"}
            assert [a.family for a in again[0].addresses] == [Family.IPV4, Family.IPV6]
            assert await store.fsck("fast") == []
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("node", ["", "node-a"])
def test_fast_path_falls_back_for_what_it_cannot_do(clean_db, node):
    async def main():
        store = await _store(clean_db)
        try:
            spec = build_pool_spec("fb", [RangeInput("198.18.0.0/24"), RangeInput("fd00::/120")], {}, 0)
            await store.create_pool(spec)
            # No blocks exist yet: the fast path must hand over to the full path, which creates them.
            info, created = await store.allocate(pool="fb", owner="a", policy=Policy.SINGLE_STACK,
                                                 families=[Family.IPV4], addresses=(), attributes={}, node=node)
            assert created and info.node == node
            # An upgrade to dual-stack is the full path's too.
            up, created = await store.allocate(pool="fb", owner="a", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                               addresses=(), attributes={}, node=node)
            assert created and len(up.addresses) == 2 and up.addresses[0].ip == info.addresses[0].ip
            assert await store.fsck("fb") == []
        finally:
            await store.close()

    asyncio.run(main())


_MANY = "SELECT * FROM dsipam_allocate_many($1, $2, $3, $4, $5, $6::jsonb[]) ORDER BY idx"


async def _version(conn, name):
    return await conn.fetchval("SELECT version FROM ipam_pools WHERE name = $1", name)


def test_set_based_batch_statuses(clean_db):
    """dsipam_allocate_many, called directly: a repeated owner, single-family owners, an owner that
    already holds its pair, and more owners than free bits, all in one batch."""
    import asyncpg

    from dsipam.server.store._fast import asyncpg_dsn

    async def main():
        store = await _store(clean_db, fast=False)
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            # Blocks of 16 addresses: two empty blocks per family.
            await store.create_pool(build_pool_spec(
                "many", [RangeInput("198.18.0.0/27", block_size=16), RangeInput("fd00::/123", block_size=16)], {}, 0))
            for fam in (Family.IPV4, Family.IPV6):
                assert await store.top_up_blocks("many", fam, 2) == 2
            version = await _version(conn, "many")
            free = dict(await conn.fetch("SELECT family, sum(free_count)::int FROM ipam_blocks GROUP BY family"))
            first = await conn.fetch(_MANY, "many", version, ["held"], [True], [True], ["{}"])
            assert [r["status"] for r in first] == ["created"]
            owners = ["a", "a", "only4", "only6", "held"] + [f"x{i}" for i in range(40)]
            want4 = [o != "only6" for o in owners]
            want6 = [o != "only4" for o in owners]
            rows = await conn.fetch(_MANY, "many", version, owners, want4, want6, ['{"k": "v"}'] * len(owners))
            status = {r["idx"]: r["status"] for r in rows}
            assert sorted(status) == list(range(len(owners)))  # every owner answered once
            assert status[0] == "created" and status[1] == "slow"  # a repeated owner: the second goes the full path
            assert status[2] == status[3] == "created"
            assert status[4] == "exists" and rows[4]["ipv4"] == first[0]["ipv4"]
            by_idx = {r["idx"]: r for r in rows}
            assert by_idx[2]["ipv6"] is None and by_idx[3]["ipv4"] is None
            created = [r for r in rows if r["status"] == "created"]
            # After "held", "a", "only4" and "only6", the x owners get whole pairs while both families last.
            pairs = min(free[4] - 3, free[6] - 3)
            assert 0 < pairs < 40
            assert [r["status"] for r in rows[5:]] == ["created"] * pairs + ["slow"] * (40 - pairs)
            assert len([r for r in created if r["ipv4"]]) == pairs + 2 and len([r for r in created if r["ipv6"]]) == pairs + 2
            ips = [r[c] for r in created for c in ("ipv4", "ipv6") if r[c]] + [first[0]["ipv4"], first[0]["ipv6"]]
            assert len(ips) == len(set(ips)) == 2 * pairs + 6
            assert all(r["attributes"] == '{"k": "v"}' for r in created)
            assert await conn.fetchval("SELECT count(*) FROM ipam_events WHERE type = 1") == 1 + len(created)
            assert await store.fsck("many") == []
            # The pool's layout changed: every owner of a batch with the old version is 'stale'.
            stale = await conn.fetch(_MANY, "many", version + 1, ["y"], [True], [True], ["{}"])
            assert [r["status"] for r in stale] == ["stale"]
        finally:
            await conn.close()
            await store.close()

    asyncio.run(main())


def test_set_based_batch_loses_a_race_cleanly(clean_db):
    """Another transaction inserts the same new owner first: the batch waits on the owner's key,
    then gives that owner's bits back and answers 'slow'; the rest of the batch is created."""
    import asyncpg

    from dsipam.server.store._fast import asyncpg_dsn

    async def main():
        store = await _store(clean_db, fast=False)
        a = await asyncpg.connect(asyncpg_dsn(clean_db))
        b = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            await store.create_pool(build_pool_spec("race", [RangeInput("198.18.0.0/24"), RangeInput("fd00::/120")],
                                                    {}, 0))
            for fam in (Family.IPV4, Family.IPV6):
                await store.top_up_blocks("race", fam, 4)
            version = await _version(a, "race")
            tx = a.transaction()
            await tx.start()
            won = await a.fetch(_MANY, "race", version, ["race"], [True], [True], ["{}"])
            assert won[0]["status"] == "created"
            pending = asyncio.ensure_future(
                b.fetch(_MANY, "race", version, ["before", "race", "after"], [True] * 3, [True] * 3, ["{}"] * 3))
            await asyncio.sleep(0.5)
            assert not pending.done()  # waiting on the owner's key, holding its own (other) blocks
            await tx.commit()
            rows = await asyncio.wait_for(pending, 10)
            assert [r["status"] for r in rows] == ["created", "slow", "created"]
            assert await store.fsck("race") == []  # the lost owner's bits went back
            held = await a.fetchval("SELECT count(*) FROM ipam_allocations")
            assert held == 3
        finally:
            await a.close()
            await b.close()
            await store.close()

    asyncio.run(main())


def test_shared_reads_are_exact_and_coalesced(clean_db):
    """GetAllocation and GetPool callers share reads under load (FastPath.fetch_shared), yet each gets
    its own answer, and one that arrives while a read is on its way never gets that read's (older)
    result: a GetPool after an Allocate always counts it."""
    async def main():
        store = await _store(clean_db)
        try:
            spec = build_pool_spec("reads", [RangeInput("198.18.1.0/24"), RangeInput("fd00::1:0/120")], {}, 0)
            await store.create_pool(spec)
            held = {}
            for i in range(40):
                info, _ = await store.allocate(pool="reads", owner=f"r{i}", policy=Policy.REQUIRE_DUAL_STACK,
                                               families=(), addresses=(), attributes={"i": str(i)})
                held[f"r{i}"] = [a.ip for a in info.addresses]
            owners = [f"r{i}" for i in range(40)] + [f"missing{i}" for i in range(10)]
            got = await asyncio.gather(*(store.get_allocation(pool="reads", owner=o) for o in owners * 4))
            for owner, info in zip(owners * 4, got, strict=True):
                if owner.startswith("missing"):
                    assert info is None
                else:
                    assert info.owner == owner and [a.ip for a in info.addresses] == held[owner]
                    assert info.attributes == {"i": owner[1:]}
            assert store.fast.read_requests >= 200 and store.fast.read_batches < store.fast.read_requests / 4

            stop = asyncio.Event()

            async def poll():  # keeps a shared GetPool read of the pool on its way most of the time
                while not stop.is_set():
                    await store.get_pool("reads")

            pollers = [asyncio.create_task(poll()) for _ in range(8)]
            try:
                for i in range(40, 80):
                    await store.allocate(pool="reads", owner=f"r{i}", policy=Policy.REQUIRE_DUAL_STACK,
                                         families=(), addresses=(), attributes={})
                    info = await store.get_pool("reads")
                    assert [(u.family, u.allocated) for u in info.usage] == [(Family.IPV4, 41), (Family.IPV6, 41)]
                    released = await store.release(pool="reads", owner=f"r{i - 40}", families=())
                    assert released
                    info = await store.get_pool("reads")
                    assert [u.allocated for u in info.usage] == [40, 40]
                    alloc = await store.get_allocation(pool="reads", owner=f"r{i - 40}")
                    assert alloc is None
            finally:
                stop.set()
                await asyncio.gather(*pollers)
            assert await store.fsck("reads") == []
        finally:
            await store.close()

    asyncio.run(main())


def test_work_that_comes_after_close_opens_no_new_pool(clean_db):
    """Found by attack: an Allocate batch that lingered while FastPath.close() ran (and so any read or
    batch that comes after it) opened a new pool afterwards, with a session that nothing closed. It
    now gets DatabaseUnavailable, and no session of the fast path is left."""
    import uuid

    import asyncpg

    from dsipam.server.domain import DatabaseUnavailable
    from dsipam.server.store._fast import asyncpg_dsn

    name = f"dsipam-fast-close-{uuid.uuid4().hex[:8]}"  # the session server's pool shares the database
    url = f"{clean_db}{'&' if '?' in clean_db else '?'}application_name={name}"

    async def sessions(conn: asyncpg.Connection) -> int:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)

    async def main():
        fast = FastPath(url, pool_size=2)
        sql = "SELECT $1::text AS name"
        assert (await fast.fetch_shared(sql, "p"))[0]["name"] == "p"
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            assert await sessions(conn) >= 1
        finally:
            await conn.close()
        await fast.close()
        with pytest.raises(DatabaseUnavailable, match="shutting down"):
            await fast.fetch_shared(sql, "p")
        with pytest.raises(DatabaseUnavailable, match="shutting down"):
            await fast.fetch(sql, "p")
        assert fast._pool is None and fast._reads == {}
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            for _ in range(50):  # a closed session's backend leaves pg_stat_activity when it has exited
                left = await sessions(conn)
                if left == 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert left == 0

    asyncio.run(main())


def test_shared_read_callers_are_never_left_waiting(clean_db):
    """A shared read's drain task that ends by cancellation (the loop's teardown, a bug) answers every
    caller it was to serve, the ones queued for its next read included, and leaves no entry behind.
    Found by review: the callers queued behind the cancelled read waited for ever (and their
    pool's entry stayed in FastPath._reads) unless another caller of the same pool came."""
    async def main():
        fast = FastPath(clean_db, pool_size=2, max_inflight=1)
        sql = "SELECT $1::text AS name, pg_sleep(0.3) AS slept"
        try:
            first = asyncio.create_task(fast.fetch_shared(sql, "p"))
            await asyncio.sleep(0.1)  # its read is on its way
            queued = [asyncio.create_task(fast.fetch_shared(sql, "p")) for _ in range(3)]
            await asyncio.sleep(0)
            drains = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "FastPath._drain_reads"]
            assert len(drains) == 1
            drains[0].cancel()
            done, pending = await asyncio.wait([first, *queued], timeout=5)
            assert not pending, f"{len(pending)} of 4 callers still wait"
            assert all(t.cancelled() for t in done)
            assert fast._reads == {}  # the one-item statement lives in the queue entry
            # The next caller of the pool reads as usual.
            rows = await asyncio.wait_for(fast.fetch_shared(sql, "p"), 5)
            assert rows[0]["name"] == "p"
        finally:
            await fast.close()

    asyncio.run(main())


def test_top_up_creates_many_blocks_at_once_skipping_full_and_existing_ones(clean_db):
    """top_up_blocks writes a range's spare blocks in one statement: blocks with nothing available
    (excluded) are not made, a block that already exists (made for a specific address) is skipped
    and not counted, it stops at the spare count and at the range's end, and every address the
    range can hand out is then handed out exactly once."""
    import asyncpg

    from dsipam.server.store._fast import asyncpg_dsn

    async def main():
        store = await _store(clean_db)
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            # Blocks of 16: 198.18.0.0/26 is four blocks, the second wholly excluded; IPv6 the same.
            await store.create_pool(build_pool_spec("top", [
                RangeInput("198.18.0.0/26", exclude=["198.18.0.16/28"], block_size=16),
                RangeInput("fd00::/122", exclude=["fd00::10/124"], block_size=16)], {}, 0))
            # A specific address in the third block makes that block first, out of order.
            await store.allocate(pool="top", owner="fixed", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                 addresses=["198.18.0.40", "fd00::28"], attributes={})
            for fam, first in ((Family.IPV4, "198.18.0.0/28"), (Family.IPV6, "fd00::/124")):
                assert await store.top_up_blocks("top", fam, 2) == 1  # the existing third block counts as spare
                assert await store.top_up_blocks("top", fam, 10) == 1  # the fourth; the range is then done
                assert await store.top_up_blocks("top", fam, 10) == 0
                bases = [str(r["base"]) for r in await conn.fetch(
                    "SELECT base FROM ipam_blocks WHERE family = $1 ORDER BY base", int(fam))]
                assert len(bases) == len(set(bases)) == 3 and bases[0] == first
                assert await conn.fetchval(
                    "SELECT next_block FROM ipam_ranges WHERE family = $1", int(fam)) is None
            assert await store.fsck("top") == []
            owners = [f"o{i}" for i in range(60)]
            results = await asyncio.gather(*(
                store.allocate(pool="top", owner=o, policy=Policy.REQUIRE_DUAL_STACK, families=(), addresses=(),
                               attributes={}) for o in owners), return_exceptions=True)
            ok = [r for r in results if not isinstance(r, Exception)]
            assert all(isinstance(r, PoolExhausted) for r in results if isinstance(r, Exception))
            # IPv4: 64 less the 16 excluded and the network and broadcast addresses (46), less the
            # fixed pair's: the pairs end with IPv4.
            assert len(ok) == 45
            ips = [a.ip for info, _ in ok for a in info.addresses] + ["198.18.0.40", "fd00::28"]
            assert len(ips) == len(set(ips)) == 92
            v4 = {ip for ip in ips if "." in ip}
            assert v4 == {f"198.18.0.{i}" for i in [*range(1, 16), *range(32, 63)]}
            assert await store.fsck("top") == []
        finally:
            await conn.close()
            await store.close()

    asyncio.run(main())


def test_a_deleted_pools_layout_is_not_kept(clean_db):
    """Pool ids are never reused, so a deleted pool's cached layout (and what hangs on it: its answer's
    kept part) must be dropped: when this process deletes it, and when a read finds it deleted by
    another process."""
    import gc
    import weakref

    async def main():
        store, other = await _store(clean_db), await _store(clean_db)
        try:
            layouts = []
            for i in range(20):
                name = f"gone{i}"
                await store.create_pool(build_pool_spec(name, [RangeInput(f"198.18.{i}.0/28")], {}, 0))
                await store.allocate(pool=name, owner="a", policy=Policy.SINGLE_STACK, families=(), addresses=(),
                                     attributes={})
                layouts.append(weakref.ref(store._by_name[name]))  # noqa: SLF001
                await store.get_pool(name)
                if i % 2:
                    await store.delete_pool(name, True)
                else:  # deleted elsewhere; this process learns it when a read finds the pool gone
                    await other.delete_pool(name, True)
                    with pytest.raises(PoolNotFound):
                        await store.get_pool(name)
                    with pytest.raises(PoolNotFound):
                        await store.allocate(pool=name, owner="b", policy=Policy.SINGLE_STACK, families=(),
                                             addresses=(), attributes={})
            # Deleted elsewhere, and the first call after it here an Allocate or a Release: the fast
            # path finds the layout stale, the full path finds the pool gone.
            for i, call in enumerate(("allocate", "release")):
                name = f"gone-{call}"
                await store.create_pool(build_pool_spec(name, [RangeInput(f"198.18.{100 + i}.0/28")], {}, 0))
                await store.allocate(pool=name, owner="a", policy=Policy.SINGLE_STACK, families=(), addresses=(),
                                     attributes={})
                layouts.append(weakref.ref(store._by_name[name]))  # noqa: SLF001
                await other.delete_pool(name, True)
                with pytest.raises(PoolNotFound):
                    if call == "allocate":
                        await store.allocate(pool=name, owner="b", policy=Policy.SINGLE_STACK, families=(),
                                             addresses=(), attributes={})
                    else:
                        await store.release(pool=name, owner="a", families=())
            assert not [n for n in store._by_name if n.startswith("gone")]  # noqa: SLF001
            assert not store._layouts  # noqa: SLF001
            gc.collect()
            assert [r for r in layouts if r() is not None] == []
        finally:
            await store.close()
            await other.close()

    asyncio.run(main())
