"""WatchAllocations through the SDK, sync and async, against real servers: events in order with
their addresses, resuming from a token (nothing missed, nothing twice), cancelling, starting
errors, and follow_allocations resuming by itself across a server restart on the same port."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import ServerProcess, free_port, spawn_server

import dsipam.client as sdk
from dsipam.client import AsyncIpamClient, EventType, IpamClient, RetryPolicy, WatchEvent

WAIT = 30.0  # deadline of the tests' calls and of waits for events: generous, for a loaded machine
QUICK = RetryPolicy(initial_backoff=0.05, max_backoff=0.5)
DUAL = ["198.18.0.0/24", "fd00::/120"]

Key = tuple[str, str, tuple[str, ...]]


def key(event: WatchEvent) -> Key:
    return (event.type.value, event.owner, tuple(str(a.ip) for a in event.addresses))


class Changes:
    """Allocates and releases through ``ipam``, recording the event each change must produce."""

    def __init__(self, ipam: IpamClient, pool: str) -> None:
        self.ipam = ipam
        self.pool = pool
        self.expected: list[Key] = []

    def alloc(self, owner: str, **kwargs: Any) -> None:
        allocation = self.ipam.allocate(self.pool, owner, **kwargs).allocation
        self.expected.append(("allocated", owner, tuple(str(a.ip) for a in allocation.addresses)))

    def release(self, owner: str) -> None:
        released = self.ipam.release(self.pool, owner)
        ordered = sorted(released, key=lambda a: a.family.version)  # events list IPv4 first
        self.expected.append(("released", owner, tuple(str(a.ip) for a in ordered)))


def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def take(events: Any, n: int) -> list[WatchEvent]:
    """The next ``n`` events that are not bookmarks."""
    out: list[WatchEvent] = []
    for event in events:
        if not event.is_bookmark:
            out.append(event)
            if len(out) == n:
                break
    return out


def test_watch_sync_delivers_in_order_and_resumes_from_a_token(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("w", DUAL, cooldown=0)
        changes = Changes(ipam, "w")
        with ipam.watch_allocations("w") as events:
            first = next(events)
            assert first.type is EventType.BOOKMARK and first.is_bookmark and first.resume_token
            assert (first.owner, first.addresses, first.time) == ("", (), None)
            assert events.resume_token == first.resume_token and events.resumes == 0
            changes.alloc("a", policy="require")
            changes.alloc("b", families="ipv6")
            changes.release("a")
            got = take(events, 3)
            assert [key(e) for e in got] == changes.expected
            assert all(e.time is not None and e.time.tzinfo is not None for e in got)
            assert got[0].addresses[0].prefix_length == 24 and got[0].addresses[1].prefix_length == 120
            token = events.resume_token
            assert token == got[-1].resume_token
        # away: these happen while nobody watches
        changes.alloc("c", policy="require")
        changes.release("b")
        with ipam.watch_allocations("w", token) as events:
            first = next(events)
            assert first.is_bookmark and first.resume_token == token  # resuming here would miss nothing
            changes.alloc("d")  # a marker: the next event after the two missed ones
            assert [key(e) for e in take(events, 3)] == changes.expected[3:]

        # cancel() from another thread ends an iteration that waits for events, without an error
        events = ipam.watch_allocations("w", token)
        rest: list[WatchEvent] = []
        consumer = threading.Thread(target=lambda: rest.extend(events), daemon=True)
        consumer.start()
        until(lambda: len([e for e in rest if not e.is_bookmark]) >= 3, "the events again")
        events.cancel()
        consumer.join(WAIT)
        assert not consumer.is_alive() and events.cancelled
        assert [key(e) for e in rest if not e.is_bookmark] == changes.expected[3:]

        # starting errors come from the call itself
        with pytest.raises(sdk.PoolNotFound):
            ipam.watch_allocations("missing")
        with pytest.raises(sdk.InvalidArgument) as caught:
            ipam.watch_allocations("w", "junk")
        assert caught.value.field == "resume_token"
        ipam.create_pool("other", "198.18.1.0/24")
        with pytest.raises(sdk.InvalidArgument, match="another pool"):
            ipam.watch_allocations("other", token)


async def test_watch_async_delivers_resumes_and_cancels(target: str) -> None:
    async with AsyncIpamClient(target, timeout=WAIT) as ipam:
        await ipam.create_pool("aw", DUAL, cooldown=0)
        expected: list[Key] = []
        stream = ipam.watch_allocations("aw")  # nothing is sent until it is awaited or iterated
        async with await stream as events:
            assert events is stream and events.resume_token  # the first bookmark is in
            for owner in ("a", "b"):
                allocation = (await ipam.allocate("aw", owner, policy="require")).allocation
                expected.append(("allocated", owner, tuple(str(a.ip) for a in allocation.addresses)))
            got = []
            async for event in events:
                if not event.is_bookmark:
                    got.append(key(event))
                    if len(got) == 2:
                        break
            assert got == expected
            token = events.resume_token
        released = await ipam.release("aw", "a")
        expected.append(("released", "a", tuple(str(a.ip) for a in sorted(released, key=lambda a: a.family.version))))
        resumed = ipam.watch_allocations("aw", token)
        rest: list[Key] = []
        arrived = asyncio.Event()

        async def consume() -> None:
            async for event in resumed:
                if not event.is_bookmark:
                    rest.append(key(event))
                    arrived.set()

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(arrived.wait(), WAIT)
        resumed.cancel()  # the consumer waits for the next event: it ends quietly
        await asyncio.wait_for(consumer, WAIT)
        assert rest == expected[2:] and resumed.cancelled
        with pytest.raises(sdk.PoolNotFound):
            await ipam.watch_allocations("missing")
        with pytest.raises(sdk.PoolNotFound):
            async for _ in ipam.follow_allocations("missing"):
                pass


def test_follow_allocations_resumes_across_a_server_restart(db_url: str, target: str, clean_db: str,
                                                             tmp_path: Path) -> None:
    """Sync and async followers of a server that is stopped and started again on the same port:
    the changes made before, during (through another server) and after the outage all arrive,
    once each, in order."""
    port = free_port()
    env = {"DSIPAM_SHUTDOWN_GRACE": "1"}  # the watches would hold a graceful stop for its full grace
    servers: list[ServerProcess] = [spawn_server(db_url, tmp_path, port=port, extra_env=env)]
    sync_got: list[Key] = []
    async_got: list[Key] = []
    failures: list[BaseException] = []
    async_side: dict[str, Any] = {}
    ready = threading.Event()

    def follow_sync(stream: sdk.WatchStream) -> None:
        try:
            for event in stream:
                sync_got.append(key(event))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    def follow_async() -> None:
        async def main() -> None:
            async with AsyncIpamClient(servers[0].target, timeout=WAIT, retry=QUICK) as aio:
                stream = await aio.follow_allocations("f")
                async_side.update(stream=stream, loop=asyncio.get_running_loop())
                ready.set()
                async for event in stream:
                    async_got.append(key(event))

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            ready.set()

    threads: list[threading.Thread] = []
    try:
        with IpamClient(target, timeout=WAIT) as writer, \
                IpamClient(servers[0].target, timeout=WAIT, retry=QUICK) as reader:
            writer.create_pool("f", DUAL, cooldown=0)
            changes = Changes(writer, "f")
            stream = reader.follow_allocations("f")
            threads = [threading.Thread(target=follow_sync, args=(stream,), daemon=True),
                       threading.Thread(target=follow_async, daemon=True)]
            for thread in threads:
                thread.start()
            assert ready.wait(WAIT) and not failures, failures

            def both_have(n: int) -> bool:
                assert not failures, failures
                return len(sync_got) >= n and len(async_got) >= n

            for i in range(3):
                changes.alloc(f"before-{i}", policy="require")
            changes.release("before-0")
            until(lambda: both_have(4), "the events before the restart")

            servers[0].terminate()  # the watches break (UNAVAILABLE)
            for i in range(3):  # the writer's server is another process: changes go on
                changes.alloc(f"during-{i}", policy="require")
            changes.release("before-1")
            servers.append(spawn_server(db_url, tmp_path, port=port, extra_env=env))
            for i in range(2):
                changes.alloc(f"after-{i}", families="ipv6")
            changes.release("during-2")
            until(lambda: both_have(len(changes.expected)), "the events during and after the restart")

            assert sync_got == changes.expected
            assert async_got == changes.expected
            assert stream.resumes >= 1 and async_side["stream"].resumes >= 1
            assert stream.resume_token and not stream.cancelled

            stream.cancel()
            async_side["loop"].call_soon_threadsafe(async_side["stream"].cancel)
            for thread in threads:
                thread.join(WAIT)
                assert not thread.is_alive()
            assert not failures, failures

            # with max_outage, a server that stays away ends the follow with its error
            limited = reader.follow_allocations("f", max_outage=1.0)
            servers[-1].terminate()
            with pytest.raises(sdk.ServiceUnavailable):
                for _ in limited:
                    pass
    finally:
        for server in servers:
            server.terminate()
        for thread in threads:
            thread.join(5)
