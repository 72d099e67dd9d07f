"""Idle watch streams: what 10,000 of them cost one server process and its database.

Starts one ``dsipam serve`` process on a scratch database with one pool, then measures, first
without watchers and then with ``--streams`` idle WatchAllocations streams open (spread over
``--clients`` client processes and channels of at most ``--per-channel`` streams each, since a
server caps the HTTP/2 streams of one connection):

* server CPU over ``--idle`` seconds (user+system, from /proc/<pid>/stat), and its RSS;
* database: connections of the server (pg_stat_activity) and transactions committed in the
  scratch database over the same window (pg_stat_database.xact_commit);
* Allocate latency (p50/p99) of ``--allocs`` Allocates from ``--concurrency`` concurrent callers
  on a separate channel, each followed by its Release, in another pool than the watched one
  (the streams stay idle: each Allocate's NOTIFY wakes nobody);
* that every stream still works: one Allocate in the watched pool at the end must reach all;
* then the streams are closed and the no-watcher figures measured again (the ratio of Allocate
  p99 is to the mean of the two, so that a shared machine's drift shows).

    python bench/watch_idle.py --streams 10000 --clients 4 --idle 20 --allocs 2000

Loopback only; bounded in count and time; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Servers, cpu_seconds, log, machine_info, psql, rss_bytes, scratch_database  # noqa: E402

POOL = "busy"  # Allocates go here
WATCHED = "watched"  # the streams watch this one: idle until the final delivery check


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


def db_connections(url: str) -> int:
    return int(psql(url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{_db(url)}' "
                         "AND application_name <> 'psql' AND pid <> pg_backend_pid()"))


def db_commits(url: str) -> int:
    return int(psql(url, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{_db(url)}'"))


# -- watcher processes ---------------------------------------------------------------------


def _watch_process(target: str, streams: int, per_channel: int, ready: mp.Queue, stop: mp.Event,  # type: ignore[type-arg]
                   result: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_watch_async(target, streams, per_channel, ready, stop, result))


async def _watch_async(target: str, streams: int, per_channel: int, ready, stop, result) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from dsipam.v1 import ipam_pb2 as pb
    from dsipam.v1 import ipam_pb2_grpc

    channels = []
    calls = []
    seen = [0] * streams
    errors: dict[str, int] = {}

    async def consume(i: int, call) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:  # read(), not iteration: the first message was read() already
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                if message.type != pb.EVENT_TYPE_BOOKMARK:
                    seen[i] += 1
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1

    tasks = []
    opened = 0
    while opened < streams:
        # One connection per channel: a local subchannel pool keeps channels from sharing one.
        ch = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(ch)
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        batch = []
        for _ in range(min(per_channel, streams - opened)):
            call = stub.WatchAllocations(pb.WatchAllocationsRequest(pool=WATCHED))
            batch.append(call)
        # Wait for each stream's first bookmark: the stream is open and admitted.
        for call in batch:
            try:
                first = await asyncio.wait_for(call.read(), 60)
                assert first.type == pb.EVENT_TYPE_BOOKMARK
            except grpc.aio.AioRpcError as err:
                errors[f"start:{err.code().name}"] = errors.get(f"start:{err.code().name}", 0) + 1
                continue
            calls.append(call)
            tasks.append(asyncio.create_task(consume(len(calls) - 1, call)))
        opened += len(batch)
    ready.put(len(calls))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    result.put({"streams": len(calls), "seen": seen[:len(calls)], "errors": errors})
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


# -- Allocate latency ----------------------------------------------------------------------


async def _allocates(target: str, count: int, concurrency: int, tag: str) -> list[float]:
    import grpc

    from dsipam.v1 import ipam_pb2 as pb
    from dsipam.v1 import ipam_pb2_grpc

    took: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                owner = f"{tag}-{i}"
                start = time.perf_counter()
                await stub.Allocate(pb.AllocateRequest(pool=POOL, owner=owner,
                                                       ip_family_policy=pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK),
                                    timeout=30)
                took.append(time.perf_counter() - start)
                await stub.Release(pb.ReleaseRequest(pool=POOL, owner=owner), timeout=30)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(took)


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def measure(label: str, url: str, pid: int, target: str, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    # A first round of Allocates warms the pool's blocks, caches and connection pools.
    asyncio.run(_allocates(target, min(200, args.allocs), args.concurrency, f"{label}-warm"))
    time.sleep(2.0)
    cpu0, commits0, t0 = cpu_seconds(pid), db_commits(url), time.monotonic()
    time.sleep(args.idle)
    cpu1, commits1, t1 = cpu_seconds(pid), db_commits(url), time.monotonic()
    conns = db_connections(url)
    rss = rss_bytes(pid)[0]
    began = time.perf_counter()
    took = asyncio.run(_allocates(target, args.allocs, args.concurrency, label))
    elapsed = time.perf_counter() - began
    out = {
        "label": label,
        "idle_seconds": round(t1 - t0, 1),
        "server_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "db_transactions_per_second": round((commits1 - commits0) / (t1 - t0), 2),
        "db_connections": conns,
        "server_rss_mib": round(rss / 2**20, 1),
        "allocate_p50_ms": round(_pct(took, 0.50), 2),
        "allocate_p99_ms": round(_pct(took, 0.99), 2),
        "allocates": len(took),
        "allocate_release_pairs_per_second": round(len(took) / elapsed, 1),
    }
    log(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=4, help="client processes holding the streams")
    parser.add_argument("--per-channel", type=int, default=500, help="streams per connection")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of the idle window")
    parser.add_argument("--allocs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--compare-trigger", action="store_true",
                        help="also measure Allocate with the NOTIFY trigger disabled (no watchers)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if not 0 < args.streams <= 20000 or not 0 < args.allocs <= 20000 or not 0 < args.idle <= 300:
        parser.error("bounded: streams 1-20000, allocs 1-20000, idle up to 300 s")
    env = {
        "DSIPAM_MAX_WATCH_STREAMS": str(args.streams + 100),
        "DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY": str(args.streams + 100),
        # Watch streams are calls in flight too (docs/security.md, "Resource bounds").
        "DSIPAM_MAX_CONCURRENT_RPCS": str(args.streams + 1000),
    }
    results: dict = {"machine": machine_info(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                     "streams_requested": args.streams}
    with scratch_database("dsipam_watch_bench") as url, Servers(url, env=env) as servers:
        target, pid = servers.targets[0], servers.pids[0]
        import grpc

        from dsipam.v1 import ipam_pb2 as pb
        from dsipam.v1 import ipam_pb2_grpc

        with grpc.insecure_channel(target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            # No cooldown: released addresses are free at once, so no maintenance work (reclaiming
            # cooldowns of earlier rounds) lands in a later measurement window.
            from google.protobuf import duration_pb2

            stub.CreatePool(pb.CreatePoolRequest(
                pool=pb.Pool(name=POOL, ranges=[pb.IpRange(cidr="198.18.0.0/17"), pb.IpRange(cidr="fd00::/112")],
                             cooldown=duration_pb2.Duration(seconds=0))))
            stub.CreatePool(pb.CreatePoolRequest(
                pool=pb.Pool(name=WATCHED, ranges=[pb.IpRange(cidr="198.18.128.0/24"), pb.IpRange(cidr="fd00:1::/120")])))
        results["without"] = measure("without-watchers", url, pid, target, args)
        if args.compare_trigger:  # what the NOTIFY trigger itself costs an Allocate (no watchers either way)
            psql(url, "ALTER TABLE ipam_events DISABLE TRIGGER ipam_events_notify")
            results["without_trigger"] = measure("without-watchers-without-trigger", url, pid, target, args)
            psql(url, "ALTER TABLE ipam_events ENABLE TRIGGER ipam_events_notify")

        ctx = mp.get_context("spawn")
        ready, result, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        share = [args.streams // args.clients + (1 if i < args.streams % args.clients else 0) for i in range(args.clients)]
        procs = [ctx.Process(target=_watch_process, args=(target, n, args.per_channel, ready, stop, result))
                 for n in share]
        start = time.monotonic()
        for p in procs:
            p.start()
        opened = sum(ready.get(timeout=600) for _ in procs)
        log(f"{opened} watch streams open in {time.monotonic() - start:.1f}s")
        results["streams_open"] = opened
        results["open_seconds"] = round(time.monotonic() - start, 1)
        results["with"] = measure(f"with-{opened}-watchers", url, pid, target, args)
        with grpc.insecure_channel(target) as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).Allocate(pb.AllocateRequest(
                pool=WATCHED, owner="final", ip_family_policy=pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK), timeout=30)
        sent = time.monotonic()
        time.sleep(10.0)  # the event reaches every stream
        results["server_log_tail"] = "\n".join(
            next(iter(servers.logdir.glob("*.log"))).read_text(errors="replace").splitlines()[-5:])
        results["final_event_wait_seconds"] = round(time.monotonic() - sent, 1)
        stop.set()
        reports = [result.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        seen = [n for r in reports for n in r["seen"]]
        expected = 1  # the final Allocate in the watched pool
        results["events_per_stream_expected"] = expected
        results["streams_with_every_event"] = sum(1 for n in seen if n == expected)
        results["stream_errors"] = {k: v for r in reports for k, v in r["errors"].items()}
        # The machine may be shared: bracket the run with a second measurement without watchers.
        results["without_again"] = measure("without-watchers-again", url, pid, target, args)
    w = results["with"]
    base = (results["without"]["allocate_p99_ms"] + results["without_again"]["allocate_p99_ms"]) / 2
    results["allocate_p99_ratio"] = round(w["allocate_p99_ms"] / base, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
