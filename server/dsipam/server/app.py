"""Builds and runs the grpc.aio server: IpamService, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsipam.v1 import ipam_pb2, ipam_pb2_grpc

from . import security
from .background import report as report_background_error
from .domain import DatabaseUnavailable
from .observability import Observability
from .rpc import reflection
from .rpc.pipeline import CallWrapper
from .rpc.servicer import IpamServicer
from .settings import DEFAULT_LISTEN, Settings
from .store import Store, create_engine
from .store._watch import METRICS as WATCH_METRICS
from .store._watch import WatchService, start_watch

log = logging.getLogger("dsipam.server")

SERVICE_NAME = ipam_pb2.DESCRIPTOR.services_by_name["IpamService"].full_name
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""The smallest send limit: a page of 1000 allocations with large attributes must fit."""
PENDING_CALLS = 16384
"""The C-core's backlog of calls not yet picked up by the application (soft limit; hard: twice)."""


MAINTENANCE_SECONDS = 2.0
PRUNE_EVERY = 30  # maintenance rounds between event prunes


async def maintain(store: Store) -> None:
    """Frees addresses whose cooldown has passed and prunes old events. Every server runs
    this; the SQL skips rows another server holds, so they never collide."""
    rounds = 0
    skipped = 0  # rounds of the current outage (the health watch logs it at ERROR): one line at its start and end
    while True:
        try:
            while await store.reclaim_cooldowns(limit=500) == 500:
                pass
            if rounds % PRUNE_EVERY == 0:
                await store.prune_events()
            if skipped:
                log.info("maintenance resumed after %d round%s skipped", skipped, "" if skipped == 1 else "s")
            skipped = 0
        except DatabaseUnavailable:
            if not skipped:
                log.warning("maintenance round skipped: database unreachable")
            skipped += 1
        except Exception:  # noqa: BLE001 - keep maintaining; logged at ERROR and counted
            report_background_error(log, "maintenance", "maintenance round failed")
        rounds += 1
        await asyncio.sleep(MAINTENANCE_SECONDS)


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    store: Store
    addresses: list[str]
    maintenance: asyncio.Task[None] | None = None
    observability: Observability | None = None
    insecure: bool = False
    watch: WatchService | None = None  # token keys and the watch fan-out (store/_watch.py)
    authorizer: security.Authorizer | None = None

    async def stop(self, grace: float, delay: float = 0.0) -> None:
        """Health goes NOT_SERVING; after ``delay`` (for load balancers to notice) new calls are
        refused and in-flight calls get ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.server.stop(grace)
        if self.observability is not None:
            await self.observability.stop()
        if self.maintenance is not None:
            self.maintenance.cancel()
        if self.watch is not None:
            await self.watch.stop()
        if self.authorizer is not None and self.authorizer.kube is not None:
            await self.authorizer.kube.close()  # the API server session of TokenReviews
        await self.store.close()


def normalise_listen(address: str) -> str:
    """Accepts host:port, [v6]:port or unix:///path."""
    if address.startswith("unix:"):
        return address
    if ":" not in address:
        from .settings import SettingError

        raise SettingError(f"--listen {address!r}: expected host:port or unix:///path")
    return address


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC C-core's bounds (docs/security.md, "Resource bounds")."""
    ms = lambda seconds: max(1, int(seconds * 1000))  # noqa: E731
    options = [
        # A bigger request is refused (RESOURCE_EXHAUSTED naming the limit) by the C-core, which
        # reads its length prefix, before it is buffered or reaches Python.
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", max(MAX_RESPONSE_BYTES, settings.max_message_bytes)),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # Calls the C-core has accepted but the application has not picked up yet. Past the soft
        # limit it cancels new calls at random, past the hard limit all of them (CANCELLED,
        # before any handler: they are never counted). Its defaults (1000/3000) cancelled 5-10%
        # of a 1,000+ call burst; the bound that counts is max_concurrent_rpcs, in the pipeline,
        # which picks calls up and refuses the surplus at once.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
        ("grpc.server_handshake_timeout_ms", ms(settings.handshake_timeout_seconds)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_ping_interval_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
        # No bandwidth-delay probing: the per-stream receive window stays at HTTP/2's 64 KiB, so a
        # caller cannot push a whole request into the server's memory before it is authorised.
        ("grpc.http2.bdp_probe", 0),
    ]
    if settings.connection_idle_seconds > 0:
        options.append(("grpc.max_connection_idle_ms", ms(settings.connection_idle_seconds)))
    if settings.connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", ms(settings.connection_age_seconds)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.connection_age_grace_seconds)))
    return options


async def start(settings: Settings) -> Running:
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pgbouncer=settings.db_pgbouncer,
    )
    store = Store(engine)
    if settings.fast_path:
        from .store._fast import FastPath

        store.fast = FastPath(settings.database_url, pool_size=settings.db_fast_pool_size,
                              pgbouncer=settings.db_pgbouncer, max_inflight=settings.fast_inflight,
                              linger=settings.fast_linger_ms / 1000)
    authorizer = security.authorizer_from_settings(settings)
    credentials = security.credentials_from_settings(settings)
    observability = Observability(settings)
    observability.instrument(engine)
    wrapper = CallWrapper(authorizer, observability.metrics, max_concurrent_rpcs=settings.max_concurrent_rpcs,
                          request_read_seconds=settings.request_read_seconds)
    server = grpc.aio.server(options=server_options(settings))
    ipam_pb2_grpc.add_IpamServiceServicer_to_server(IpamServicer(store), wrapper.registrar(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    watch = await start_watch(store, settings)  # token keys before the first call; the watch fan-out
    if observability.metrics is not None:
        for metric in WATCH_METRICS:
            observability.metrics.registry.register(metric)
    bound = []
    for address in settings.listen or [DEFAULT_LISTEN]:
        address = normalise_listen(address)
        port = security.bind(server, address, credentials, settings.unix_socket_mode)
        if address.startswith("unix:"):
            bound.append(address)
        else:
            host = address.rsplit(":", 1)[0]
            bound.append(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await observability.start(store, health_servicer, [SERVICE_NAME])
    running = Running(server, health_servicer, store, bound, asyncio.create_task(maintain(store)))
    running.observability, running.insecure = observability, authorizer is None
    running.watch, running.authorizer = watch, authorizer
    return running


async def serve(settings: Settings, on_started=None) -> None:  # type: ignore[no-untyped-def]
    running = await start(settings)
    import gc

    gc.freeze()  # start-up objects never need collecting: keeps collections short under load
    if running.insecure:
        log.warning("authentication is off (--insecure)")
        print(security.INSECURE_ANNOUNCEMENT, flush=True)
    tls = "TLS with client certificates" if settings.tls_client_ca else "TLS" if settings.tls_cert else ""
    for address in running.addresses:
        log.info("dsipam listening on %s", address)
        shown = f"{address} ({tls})" if tls and not address.startswith("unix:") else address
        print(f"dsipam: listening on {shown}", flush=True)
    if running.observability is not None and running.observability.metrics_address:
        print(f"dsipam: metrics on http://{running.observability.metrics_address}/metrics", flush=True)
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
