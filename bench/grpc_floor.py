#!/usr/bin/env python3
"""gRPC's own CPU at a fixed call rate: a bare health server (nothing of dsipam's) under ghz,
as grpc.aio on uvloop (as ``dsipam serve`` runs), grpc.aio with ``dsipam serve``'s server options,
and grpcio's threaded server, so that the floor under GetPool at the CNI STATUS rate (issue 19,
must-show 3: 500 calls/s within 0.15 of a core) can be read apart from dsipam's own work.

  python bench/grpc_floor.py                           # 500 calls/s for 10 s, each server twice
  python bench/grpc_floor.py --rate 500 --seconds 20 --servers aio,sync --rounds 3

The server is pinned to CPU 0 and ghz to CPU 1, with ghz's flags of bench/rpc_cost.py's status
phase (4 connections, 16 workers, --rps). Server CPU from /proc/PID/stat over the measured run.
Needs ghz (GHZ, PATH, or ../shared/ghz/ghz)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ghz_load  # noqa: E402
from harness import cpu_seconds, free_port, log  # noqa: E402

HEALTH_PROTO = Path(__file__).resolve().parent / "ghz" / "proto" / "grpc" / "health" / "v1" / "health.proto"


def serve(kind: str, port: int) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return
    import uvloop

    options: list[tuple[str, int]] = []
    if kind.startswith("aio-dsipam-options"):
        from dsipam.server.app import server_options
        from dsipam.server.settings import Settings

        # "aio-dsipam-options-without-grpc.keepalive_time_ms": all of them but the one named
        dropped = kind.removeprefix("aio-dsipam-options").removeprefix("-without-")
        options = [(k, v) for k, v in server_options(Settings()) if k != dropped]

    async def main() -> None:
        aio = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)
        aio.add_insecure_port(f"127.0.0.1:{port}")
        await aio.start()
        await aio.wait_for_termination()

    uvloop.install()
    asyncio.run(main())


def measure(ghz: str, kind: str, rate: int, seconds: float) -> str:
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", kind, "--port", str(port)])
    try:
        base = [ghz, "--insecure", "--connections", "4", "-c", "16", "--call", "grpc.health.v1.Health/Check",
                "--import-paths", str(HEALTH_PROTO.parents[3]), "--proto", "grpc/health/v1/health.proto", "-O", "json"]
        for _ in range(50):  # the server is up when a warm-up run answers
            warm = subprocess.run(["taskset", "-c", "1", *base, "-n", "500", f"127.0.0.1:{port}"], capture_output=True, text=True)
            if warm.returncode == 0 and json.loads(warm.stdout).get("errorDistribution") is None:
                break
            time.sleep(0.2)
        cpu, started = cpu_seconds(proc.pid), time.monotonic()
        run = subprocess.run(["taskset", "-c", "1", *base, "-n", str(int(rate * seconds)), "--rps", str(rate),
                              f"127.0.0.1:{port}"], capture_output=True, text=True, check=True)
        core = (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - started)
        rep = json.loads(run.stdout)
        errors = sum((rep.get("errorDistribution") or {}).values())
        return f"{kind}: {rep['rps']:.0f} calls/s, server {core:.3f} of a core ({core / rep['rps'] * 1e6:.0f} µs a call), errors {errors}"
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--servers", default="aio,aio-dsipam-options,sync",
                   help="comma-separated: aio, aio-dsipam-options, aio-dsipam-options-without-OPTION, sync")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port)
        return
    ghz = ghz_load.find_ghz()
    if ghz is None:
        p.error("ghz not found (GHZ, PATH, or ../shared/ghz/ghz)")
    for rnd in range(a.rounds):
        for kind in a.servers.split(","):
            log(f"round {rnd + 1} " + measure(ghz, kind, a.rate, a.seconds))


if __name__ == "__main__":
    main()
