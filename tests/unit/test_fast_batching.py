"""The fast path's group commit: who goes in which batch (no database: ``_call`` is replaced)."""

import asyncio

from dsipam.server.store._fast import FastPath


class Recorder(FastPath):
    def __init__(self, **kw):
        super().__init__("postgresql://unused/none", **kw)
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()

    async def _call(self, kind, pool_name, version, batch):
        self.calls.append([r.args[0] for r in batch])
        await self.release.wait()
        return [{"owner": r.args[0]} for r in batch]


def test_a_lone_request_goes_at_once_and_a_batch_lingers_only_while_another_is_in_flight():
    async def main():
        fp = Recorder(max_batch=64, max_inflight=2, linger=3600.0)  # linger long: only a full quarter wakes it
        first = asyncio.ensure_future(fp.allocate("p", 1, "o0", True, True, "{}", ""))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert fp.calls == [["o0"]]  # nothing else in flight: sent at once, no linger
        rest = [asyncio.ensure_future(fp.allocate("p", 1, f"o{i}", True, True, "{}", "")) for i in range(1, 16)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert fp.calls == [["o0"]]  # 15 wait: fewer than a quarter of max_batch, the second batch lingers
        rest.append(asyncio.ensure_future(fp.allocate("p", 1, "o16", True, True, "{}", "")))
        for _ in range(5):
            await asyncio.sleep(0)
        assert fp.calls == [["o0"], [f"o{i}" for i in range(1, 17)]]  # the 16th woke it: one batch of 16
        fp.release.set()
        results = await asyncio.gather(first, *rest)
        assert [r["owner"] for r in results] == [f"o{i}" for i in range(17)]
        assert fp._queues == {}  # nothing left behind

    asyncio.run(main())


def test_without_linger_the_second_batch_goes_when_a_slot_is_free():
    async def main():
        fp = Recorder(max_batch=64, max_inflight=2, linger=0)
        futs = [asyncio.ensure_future(fp.allocate("p", 1, f"o{i}", True, True, "{}", "")) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert fp.calls == [["o0", "o1", "o2"]]  # all three were queued before the first drain ran
        more = [asyncio.ensure_future(fp.allocate("p", 1, f"o{i}", True, True, "{}", "")) for i in range(3, 5)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert fp.calls == [["o0", "o1", "o2"], ["o3", "o4"]]  # a free slot: sent at once, without lingering
        fp.release.set()
        assert len(await asyncio.gather(*futs, *more)) == 5

    asyncio.run(main())


def test_a_batch_emptied_while_it_lingered_is_not_sent():
    """Two drain tasks linger; the request that fills a quarter wakes both; the first takes every
    request and the second finds none: it must not call the database with an empty batch."""

    async def main():
        fp = Recorder(max_batch=8, max_inflight=2, linger=3600.0)  # a quarter: 2 waiting requests
        first = asyncio.ensure_future(fp.allocate("p", 1, "o0", True, True, "{}", ""))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert fp.calls == [["o0"]]  # o0's call is in flight (until release is set)
        second = asyncio.ensure_future(fp.allocate("p", 1, "o1", True, True, "{}", ""))
        for _ in range(5):
            await asyncio.sleep(0)
        queue = fp._queues[("allocate", "p", 1)]
        assert len(queue.lingering) == 1  # the second drain task lingers: o0's batch is in flight
        fp.release.set()
        await first
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(queue.lingering) == 2  # the first task, back for o1, lingers too
        third = asyncio.ensure_future(fp.allocate("p", 1, "o2", True, True, "{}", ""))
        results = await asyncio.gather(second, third)
        assert [r["owner"] for r in results] == ["o1", "o2"]
        assert fp.calls == [["o0"], ["o1", "o2"]]  # no empty batch
        assert fp.errors == {} and fp._queues == {}

    asyncio.run(main())
