"""A client process for the concurrency tests: N concurrent Allocates with grpc.aio.

    python alloc_worker.py TARGET POOL PREFIX COUNT CONCURRENCY [release]

Prints one JSON object: {"ok": {owner: [ips]}, "errors": {owner: code_name}}.
Every request starts after a shared barrier so that all processes overlap.
"""

import asyncio
import json
import sys

import grpc

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


async def main() -> None:
    target, pool, prefix, count, concurrency = sys.argv[1:6]
    release = len(sys.argv) > 6 and sys.argv[6] == "release"
    count, concurrency = int(count), int(concurrency)
    ok: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ipam_pb2_grpc.IpamServiceStub(channel)
        await channel.channel_ready()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(f"{prefix}-{i:04d}")

        async def run() -> None:
            while not queue.empty():
                owner = queue.get_nowait()
                try:
                    if release:
                        await stub.Release(pb.ReleaseRequest(pool=pool, owner=owner), timeout=60)
                        ok[owner] = []
                    else:
                        resp = await stub.Allocate(
                            pb.AllocateRequest(
                                pool=pool, owner=owner, ip_family_policy=pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK
                            ),
                            timeout=60,
                        )
                        ok[owner] = [a.ip for a in resp.allocation.addresses]
                except grpc.aio.AioRpcError as e:
                    errors[owner] = e.code().name + ": " + (e.details() or "")

        print("ready", flush=True)
        sys.stdin.readline()  # the barrier: the test writes a line to every worker at once
        await asyncio.gather(*(run() for _ in range(concurrency)))
    print(json.dumps({"ok": ok, "errors": errors}), flush=True)


asyncio.run(main())
