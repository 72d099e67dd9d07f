"""Per-call cost of the call pipeline's choices (rpc/pipeline.py), in server CPU microseconds.

Runs a grpc.aio server in this process with the real CallWrapper around a servicer whose
Allocate returns a fixed answer (so that only the pipeline and gRPC are measured, not the
database), and a load client in a child process (64 calls in flight, ``--calls`` calls per
variant, after a warm-up). Variants:

* ``registered``: the method table registered with ``add_registered_method_handlers`` (the
  old wiring: the request is read and buffered before the caller is checked);
* ``generic``: today's wiring with authentication on: ``service()`` checks the bearer token from
  the metadata, then the fast unary handler runs (the check runs again, from the token cache);
* ``guarded``: every call served by the guarded, stream-shaped handler (what callers without
  a token, e.g. on the unix socket or with a client certificate, get).

Usage: ``.venv/bin/python bench/pipeline_cost.py [--calls 20000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from typing import Any

import grpc

from dsipam.server.rpc import pipeline
from dsipam.server.security import AuthConfig, Authorizer, hash_token
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

TOKEN = "dsipam_bench-token"
ANSWER = pb.AllocateResponse(allocation=pb.Allocation(pool="p", owner="o", addresses=[
    pb.Address(family=pb.IP_FAMILY_IPV4, ip="198.18.0.1", prefix_length=24),
    pb.Address(family=pb.IP_FAMILY_IPV6, ip="fd00::1", prefix_length=120)]), created=True)


class Servicer(ipam_pb2_grpc.IpamServiceServicer):
    async def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:  # noqa: N802
        return ANSWER


class RegisteredRegistrar(pipeline._Registrar):
    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()})


class AlwaysGuarded(pipeline._WrappedGeneric):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = super().service(handler_call_details)
        entry = self._cache.get(handler_call_details.method)
        return entry.guarded if entry is not None else handler


class GuardedRegistrar(pipeline._Registrar):
    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(AlwaysGuarded(h, self._wrapper) for h in handlers))


def client(port: int, calls: int, out: Any) -> None:
    async def run() -> float:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            md = (("authorization", f"Bearer {TOKEN}"),)
            request = pb.AllocateRequest(pool="p", owner="c1/eth0", ip_family_policy=pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK)
            for _ in range(500):
                await stub.Allocate(request, metadata=md)
            left = calls

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await stub.Allocate(request, metadata=md)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(64)))
            return time.perf_counter() - start

    out.put(asyncio.run(run()))


async def measure(variant: str, calls: int) -> tuple[float, float]:
    config = AuthConfig.from_mapping({"tokens": [{"name": "bench", "role": "admin", "hash": hash_token(TOKEN)}]})
    wrapper = pipeline.CallWrapper(Authorizer(config), None, max_concurrent_rpcs=4096)
    server = grpc.aio.server()
    registrar = {"registered": RegisteredRegistrar, "generic": pipeline._Registrar,
                 "guarded": GuardedRegistrar}[variant](server, wrapper)
    ipam_pb2_grpc.add_IpamServiceServicer_to_server(Servicer(), registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    queue: Any = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=client, args=(port, calls, queue))
    cpu0 = time.process_time()
    proc.start()
    while proc.is_alive() and queue.empty():  # noqa: ASYNC110 - a child process, not a task
        await asyncio.sleep(0.05)
    wall = queue.get()
    cpu = time.process_time() - cpu0
    proc.join()
    await server.stop(0)
    return cpu / (calls + 500) * 1e6, calls / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in ("registered", "generic", "guarded")}
    for _ in range(args.rounds):
        for variant in results:
            results[variant].append(asyncio.run(measure(variant, args.calls)))
    print(f"{'variant':<12} {'server CPU us/call (median)':>28} {'calls/s (median)':>18}")
    for variant, runs in results.items():
        print(f"{variant:<12} {statistics.median(r[0] for r in runs):>28.1f} {statistics.median(r[1] for r in runs):>18.0f}")


if __name__ == "__main__":
    main()
