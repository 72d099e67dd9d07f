"""Metrics, structured logs and the per-call wrapper.

* Prometheus metrics on their own HTTP port (``--metrics-listen``): per-RPC counts by status
  and latency histograms, per pool and family address gauges, database pool use and wait
  time, lock retries and database reachability.
* JSON logs (``--log-format json``): one object per line, with the request ID of the call
  that logged it (from the ``x-request-id`` header, else generated).
* The per-call wrapper (authorisation before the body, request IDs, bounds, counting) lives in
  :mod:`.rpc.pipeline`; ``CallWrapper``, ``CallInfo`` and ``current_call`` are re-exported here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from .background import report as report_background_error
from .domain import DatabaseUnavailable
from .rpc.pipeline import CallInfo, CallWrapper, current_call

log = logging.getLogger("dsipam.server")
access_log = logging.getLogger("dsipam.access")


# -- logs ------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, method, caller, and extras
    passed as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call = current_call.get()
        if call is not None:
            out["request_id"] = call.request_id
            out["method"] = call.method
            if call.caller:
                out["caller"] = call.caller
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        call = current_call.get()
        if call is not None:
            text += f" request_id={call.request_id}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += "".join(f" {k}={v}" for k, v in fields.items())
        return text


def setup_logging(level: str, fmt: str = "text") -> None:
    """Logs to stderr, as text or as JSON lines (``fmt="json"``)."""
    if fmt not in ("text", "json"):
        raise _setting_error(f"--log-format {fmt!r}: expected text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else _TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# -- metrics ---------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_POOL_STATES = ("allocated", "free", "cooldown", "reserved")


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.rpc_requests = Counter(
            "dsipam_rpc_requests", "IpamService calls by method and final status code.", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "dsipam_rpc_duration_seconds", "IpamService call latency by method.", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.db_wait = Histogram(
            "dsipam_db_pool_wait_seconds", "Time to get a connection from the database pool.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.db_in_use = Gauge("dsipam_db_pool_in_use", "Database connections checked out now.", registry=r)
        self.db_pool_size = Gauge(
            "dsipam_db_pool_size", "Database connections the pool keeps (plus up to max_overflow).", registry=r
        )
        self.lock_retries = Counter(
            "dsipam_db_lock_retries",
            "Transactions rolled back by a deadlock (40P01) or serialization failure (40001); each is run again.",
            ["sqlstate"], registry=r,
        )
        self.db_up = Gauge("dsipam_db_up", "1 when the last database ping succeeded, else 0.", registry=r)
        from .store._fast import (  # counted by the fast path, process-wide
            FAST_PATH_BATCH_SECONDS,
            FAST_PATH_BATCH_SIZE,
            FAST_PATH_ERRORS,
            FAST_PATH_LOCK_RETRIES,
        )

        self.fast_path_errors = FAST_PATH_ERRORS  # dsipam_fast_path_errors_total{kind}
        r.register(FAST_PATH_ERRORS)
        r.register(FAST_PATH_LOCK_RETRIES)  # dsipam_fast_path_lock_retries_total{kind,sqlstate}
        r.register(FAST_PATH_BATCH_SIZE)  # dsipam_fast_path_batch_size{kind} (histogram)
        r.register(FAST_PATH_BATCH_SECONDS)  # dsipam_fast_path_batch_duration_seconds{kind} (histogram)
        from .store.db import RECONNECTS  # counted by the store, process-wide

        r.register(RECONNECTS)  # dsipam_db_reconnects_total{path,reason}
        from .background import BACKGROUND_ERRORS  # counted by the background tasks, process-wide

        self.background_errors = BACKGROUND_ERRORS  # dsipam_background_errors_total{task}
        r.register(BACKGROUND_ERRORS)
        self.pool_snapshot: list[tuple[str, str, str, int]] = []
        self.pool_snapshot_time = 0.0
        r.register(_PoolCollector(self))
        self._rpc_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Counts one finished call and records its latency."""
        key = (method, code)
        child = self._rpc_children.get(key)
        if child is None:
            child = self._rpc_children[key] = self.rpc_requests.labels(method, code)
        child.inc()
        hist = self._latency_children.get(method)
        if hist is None:
            hist = self._latency_children[method] = self.rpc_seconds.labels(method)
        hist.observe(seconds)

    def instrument_engine(self, engine: Any, pool_size: int) -> None:
        """Pool in use (read at scrape time), pool wait time and lock retries of a SQLAlchemy AsyncEngine."""
        from sqlalchemy import event

        sync_engine = engine.sync_engine
        pool = sync_engine.pool
        self.db_pool_size.set(pool_size)
        self.db_in_use.set_function(lambda: float(sync_engine.pool.checkedout()))
        do_get = getattr(pool, "_do_get", None)
        if do_get is not None:  # SQLAlchemy has no "checkout started" event: time the pool's own get
            wait = self.db_wait

            def timed_get():  # type: ignore[no-untyped-def]
                start = time.perf_counter()
                try:
                    return do_get()
                finally:
                    wait.observe(time.perf_counter() - start)

            pool._do_get = timed_get

        retries = self.lock_retries

        @event.listens_for(sync_engine, "handle_error")
        def _on_error(ctx):  # type: ignore[no-untyped-def]
            from .store.db import RETRYABLE_SQLSTATES, sqlstate

            code = sqlstate(ctx.sqlalchemy_exception or ctx.original_exception) if ctx.original_exception else None
            if code in RETRYABLE_SQLSTATES:
                retries.labels(code).inc()

        for code in ("40001", "40P01"):
            retries.labels(code)  # show zeros from the start

    def serve_http(self, listen: str) -> tuple[Any, str]:
        """Starts the /metrics HTTP server (a thread) on ``host:port``; returns it and its address."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        except ValueError:
            raise _setting_error(f"--metrics-listen {listen!r}: expected host:port") from None
        bound = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return server, f"{shown}:{bound}"


class _PoolCollector:
    """``dsipam_pool_addresses{pool,family,state}`` from the last snapshot taken by :func:`refresh_pool_gauges`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "dsipam_pool_addresses",
            "Addresses of each pool and family by state (allocated, free, cooldown, reserved); refreshed periodically.",
            labels=["pool", "family", "state"],
        )
        for pool, fam, state, value in self.metrics.pool_snapshot:
            family.add_metric([pool, fam, state], float(value))
        yield family
        age = GaugeMetricFamily(
            "dsipam_pool_gauges_timestamp_seconds", "When the pool gauges were last refreshed (unix time)."
        )
        age.add_metric([], self.metrics.pool_snapshot_time)
        yield age


POOL_GAUGE_PAGE = 50
"""Pools read per ListPools page by :func:`refresh_pool_gauges`."""


async def refresh_pool_gauges(store: Any, metrics: Metrics, interval: float, page: int = POOL_GAUGE_PAGE) -> None:
    """Every ``interval`` seconds, reads every pool's usage (ListPools pages) into the gauges.

    Incremental, in the background: a small page of pools at a time, yielding to the event loop
    after each pool. A pool's layout is built once per version (the store caches it), and one
    with many excludes or reservations is built in a worker thread; so a replica that starts
    next to big pools answers health checks and calls at once, and the gauges fill in after."""
    while True:
        try:
            rows: list[tuple[str, str, str, int]] = []
            token = ""
            while True:
                pools, token = await store.list_pools(page, token)
                for p in pools:
                    for u in p.usage:
                        fam = f"ipv{int(u.family)}"
                        for state in _POOL_STATES:
                            rows.append((p.spec.name, fam, state, int(getattr(u, state, 0) or 0)))
                    await asyncio.sleep(0)
                if not token:
                    break
            metrics.pool_snapshot = rows
            metrics.pool_snapshot_time = time.time()
        except DatabaseUnavailable as exc:  # an outage (the health watch reports it): the gauges keep their values
            log.debug("pool gauges not refreshed: %s", exc)
        except Exception:  # noqa: BLE001 - the gauges keep their last values; logged and counted
            report_background_error(log, "pool-gauges", "pool gauges not refreshed")
        await asyncio.sleep(interval)


# -- database health -------------------------------------------------------------------


async def watch_database(
    ping: Callable[[], Any], set_serving: Callable[[bool], Any], interval: float, metrics: Metrics | None = None
) -> None:
    """Pings the database every ``interval`` seconds and reports the result through ``set_serving``
    (health SERVING / NOT_SERVING). A failed ping is tried once more at once, so that one stale
    pooled connection after a database restart does not flip the health."""
    serving: bool | None = None
    while True:
        ok = False
        for _attempt in range(2):
            try:
                await asyncio.wait_for(ping(), timeout=max(interval, 2.0))
                ok = True
                break
            except (DatabaseUnavailable, TimeoutError) as exc:  # unreachable: reported below, once
                last = exc
            except Exception as exc:  # noqa: BLE001 - "not reachable" too, but a bug: logged and counted
                report_background_error(log, "db-health", "database ping failed unexpectedly")
                last = exc
        if metrics is not None:
            metrics.db_up.set(1 if ok else 0)
        if ok != serving:
            if ok:
                if serving is not None:
                    log.warning("database reachable again: health SERVING")
            else:
                log.error("database unreachable (%s): health NOT_SERVING", str(last.__cause__ or last).splitlines()[0])
            await set_serving(ok)
            serving = ok
        await asyncio.sleep(interval)


# -- wiring ----------------------------------------------------------------------------

LIVENESS_SERVICE = "liveness"
"""A health service name that is SERVING while the process serves, whatever the database does."""


class Observability:
    """What the server runs besides its RPCs: metrics (when ``settings.metrics_listen`` is set),
    the pool gauges and the database health watch."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.metrics = Metrics() if settings.metrics_listen else None
        self.metrics_address = ""
        self._http: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ping_store: Any = None

    def instrument(self, engine: Any) -> None:
        """Database pool metrics for the store's engine."""
        if self.metrics is not None:
            self.metrics.instrument_engine(engine, self.settings.db_pool_size)

    async def start(self, store: Any, health_servicer: Any, services: Iterable[str]) -> None:
        """Starts the metrics HTTP server, the pool gauges and the database health watch, which
        sets every service in ``services`` (and "") NOT_SERVING while the database is unreachable."""
        from grpc_health.v1 import health_pb2

        from .store import Store, create_engine

        if self.metrics is not None:
            self._http, self.metrics_address = self.metrics.serve_http(self.settings.metrics_listen)
            self._tasks.append(asyncio.create_task(
                refresh_pool_gauges(store, self.metrics, self.settings.metrics_pool_interval)))
        # "liveness": the process serves gRPC; it does not follow the database, so that a liveness
        # probe pointed at it does not restart every replica during a database outage.
        await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.db_health_interval > 0:
            # Its own connection: a busy store pool must not read as "database down".
            self._ping_store = Store(create_engine(self.settings.database_url, pool_size=1, max_overflow=0))
            names = ["", *services]

            async def set_serving(ok: bool) -> None:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in names:
                    await health_servicer.set(name, status)

            self._tasks.append(asyncio.create_task(
                watch_database(self._ping_store.ping, set_serving, self.settings.db_health_interval, self.metrics)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - the task had died before: stopping anyway, but not silently
                report_background_error(log, "shutdown", "background task %s had failed", task.get_name())
        self._tasks.clear()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._ping_store is not None:
            await self._ping_store.close()
            self._ping_store = None


__all__ = [
    "CallInfo",
    "CallWrapper",
    "JsonFormatter",
    "Metrics",
    "Observability",
    "current_call",
    "refresh_pool_gauges",
    "setup_logging",
    "watch_database",
]


def _setting_error(message: str) -> SystemExit:
    from .settings import SettingError

    return SettingError(message)
