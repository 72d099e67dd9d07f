"""Builds and runs the grpc.aio server: IpamService, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsipam.v1 import ipam_pb2, ipam_pb2_grpc

from .rpc import reflection
from .rpc.servicer import IpamServicer
from .settings import DEFAULT_LISTEN, Settings
from .store import Store, create_engine

log = logging.getLogger("dsipam.server")

SERVICE_NAME = ipam_pb2.DESCRIPTOR.services_by_name["IpamService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    store: Store
    addresses: list[str]

    async def stop(self, grace: float, delay: float = 0.0) -> None:
        """Health goes NOT_SERVING; after ``delay`` (for load balancers to notice) new calls are
        refused and in-flight calls get ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.server.stop(grace)
        await self.store.close()


def normalise_listen(address: str) -> str:
    """Accepts host:port, [v6]:port or unix:///path."""
    if address.startswith("unix:"):
        return address
    if ":" not in address:
        raise SystemExit(f"--listen {address!r}: expected host:port or unix:///path")
    return address


async def start(settings: Settings) -> Running:
    engine = create_engine(
        settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
    )
    store = Store(engine)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    ipam_pb2_grpc.add_IpamServiceServicer_to_server(IpamServicer(store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = []
    for address in settings.listen or [DEFAULT_LISTEN]:
        address = normalise_listen(address)
        port = server.add_insecure_port(address)
        if address.startswith("unix:"):
            bound.append(address)
        else:
            host = address.rsplit(":", 1)[0]
            bound.append(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, health_servicer, store, bound)


async def serve(settings: Settings, on_started=None) -> None:  # type: ignore[no-untyped-def]
    running = await start(settings)
    for address in running.addresses:
        log.info("dsipam listening on %s", address)
        print(f"dsipam: listening on {address}", flush=True)
    if on_started is not None:
        on_started(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, finishing in-flight calls (grace %ss)", settings.shutdown_grace)
    print("dsipam: shutting down", flush=True)
    await running.stop(settings.shutdown_grace, settings.shutdown_delay)
