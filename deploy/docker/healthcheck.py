#!/opt/dsipam/venv/bin/python
"""grpc.health.v1.Health/Check against the local server: exit 0 when SERVING, 1 otherwise.

The image's HEALTHCHECK runs it. Target: the first argument, else DSIPAM_HEALTH_TARGET,
else 127.0.0.1:50051; the service name (default "", the whole server) may follow.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else os.environ.get("DSIPAM_HEALTH_TARGET", "127.0.0.1:50051")
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        print(f"dsipam-healthcheck: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"dsipam-healthcheck: {target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
