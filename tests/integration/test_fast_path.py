"""The batched fast path: concurrent Allocates share round trips and stay exact."""

import asyncio

import pytest

from dsipam.server.domain import Family, Policy, PoolExhausted, RangeInput, build_pool_spec
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
