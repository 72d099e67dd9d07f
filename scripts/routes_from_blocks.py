#!/usr/bin/env python3
"""Prints the routes a routing controller would program for a pool: one per node-affine block.

    python scripts/routes_from_blocks.py --target 127.0.0.1:50051 POOL --via node-a=198.19.255.1 --via node-b=...

Each block that a node holds becomes `ip route replace <block> via <node's address>`
(`ip -6 route` for IPv6 blocks, with the node's IPv6 address when given as node=v4,v6).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--via", action="append", default=[], help="node=IPv4[,IPv6] next hop of a node")
    args = parser.parse_args()
    via: dict[str, list[str]] = {}
    for item in args.via:
        node, _, hops = item.partition("=")
        via[node] = hops.split(",")
    with grpc.insecure_channel(args.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        token = ""
        while True:
            page = stub.ListBlocks(pb.ListBlocksRequest(pool=args.pool, page_token=token))
            for b in page.blocks:
                if not b.node:
                    continue
                v6 = b.family == pb.IP_FAMILY_IPV6
                hops = via.get(b.node, [])
                hop = hops[1] if v6 and len(hops) > 1 else (hops[0] if hops and not v6 else f"<{b.node}>")
                cmd = "ip -6 route" if v6 else "ip route"
                print(f"{cmd} replace {b.cidr} via {hop}    # node {b.node}: {b.used} used, {b.free} free")
            token = page.next_page_token
            if not token:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
