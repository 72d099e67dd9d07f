"""The controller process: health and metrics, leader election, then the watches and the loops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AsyncIpamClient, DeadlineExceeded, PermissionDenied, ServiceUnavailable, Unauthenticated

from ._ippool import GROUP, PLURAL, VERSION, PoolReconciler
from ._lbplan import LB_CLASS
from ._leader import LeaderElector
from ._metrics import Metrics
from ._reconcile import Reconciler
from ._services import LbSettings, ServiceReconciler, slim_namespace, slim_service
from ._watch import Informer, slim_meta, slim_pod

log = logging.getLogger("dsipam.kube")

# dsipam failures that make the leader unready: its token is rejected or dsipam cannot be reached
DSIPAM_DOWN = (Unauthenticated, PermissionDenied, ServiceUnavailable, DeadlineExceeded)
FIRST_RETRY = 2.0  # seconds before a failed resync is tried again; doubles up to --resync-interval

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass
class Settings:
    kubeconfig: str | None = None
    namespace: str = "default"  # of the Lease
    lease_name: str = "dsipam-controller"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    grace: float = 60.0
    resync_interval: float = 300.0
    status_interval: float = 30.0
    listen: str = "0.0.0.0:8080"
    watch_timeout: int = 300
    release_timeout: float = 5.0
    lb_class: str = LB_CLASS
    lb_default_implementation: bool = False
    lb_default_pool: str = ""
    lb_concurrency: int = 16
    cluster_id: str = ""  # empty: the UID of the kube-system Namespace, read at the start of lead()

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = f"{socket.gethostname()}_{os.getpid()}"


def default_namespace() -> str:
    for var in ("DSIPAM_CONTROLLER_NAMESPACE", "POD_NAMESPACE"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


class Controller:
    def __init__(self, settings: Settings, ipam: AsyncIpamClient) -> None:
        self.s = settings
        self.ipam = ipam
        self.metrics = Metrics()
        self.ready = False
        # why the leader's last resync failed, when dsipam refused its token or could not be reached
        self.dsipam_problem: str | None = None
        self.started = time.monotonic()
        self.elector: LeaderElector | None = None
        self.pools: PoolReconciler | None = None
        self.reconciler: Reconciler | None = None
        self.services: ServiceReconciler | None = None
        self.informers: list[Informer] = []
        self.cluster: str | None = None  # the cluster id in use (Settings.cluster_id or kube-system's UID)
        self.pool_queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()

    # -- health and metrics -------------------------------------------------------------------

    async def start_http(self) -> web.AppRunner:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            e = self.elector
            if e is not None and e.is_leader and time.monotonic() - e.last_renew > self.s.lease_duration:
                return web.Response(status=500, text="lease not renewed\n")
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            if not self.ready:
                return web.Response(status=503, text="starting\n")
            leader = self.elector is not None and self.elector.is_leader
            if leader and self.dsipam_problem is not None:
                return web.Response(status=503, text=f"not ready (leader): {self.dsipam_problem}\n")
            return web.Response(text=f"ok ({'leader' if leader else 'standby'})\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.s.listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port))
        await site.start()
        bound = runner.addresses[0]
        print(f"dsipam controller: metrics and health on http://{bound[0]}:{bound[1]}/metrics", flush=True)
        return runner

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> int:
        runner = await self.start_http()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.s.kubeconfig:
            cfg = client.Configuration()
            await config.load_kube_config(config_file=self.s.kubeconfig, client_configuration=cfg)
        else:  # the pod's ServiceAccount; the projected token is re-read as the kubelet rotates it
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg, try_refresh_token=True)
        api = client.ApiClient(configuration=cfg)
        self.elector = LeaderElector(api, self.s.namespace, self.s.lease_name, self.s.identity, self.metrics,
                                     duration=self.s.lease_duration, renew_deadline=self.s.renew_deadline,
                                     retry=self.s.retry_period, release_timeout=self.s.release_timeout)
        self.ready = True  # standby replicas are ready too: they wait for the Lease
        code = 0
        try:
            acquire = asyncio.create_task(self.elector.acquire())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                acquire.cancel()
                return 0
            print(f"dsipam controller: leader ({self.s.identity})", flush=True)
            work = asyncio.create_task(self.lead(api))
            keep = asyncio.create_task(self.elector.keep())
            done, _ = await asyncio.wait({work, keep, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if keep in done:
                log.error("leadership lost: stopping (the Deployment restarts this replica as a standby)")
                code = 1
            elif work in done and work.exception() is not None:
                exc = work.exception()
                log.error("controller failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                code = 1
            for t in (work, keep, stopped):
                t.cancel()
            await asyncio.gather(work, keep, stopped, return_exceptions=True)
            if code == 0:
                await self.elector.release()
            return code
        finally:
            self.ready = False
            await api.close()
            await runner.cleanup()

    async def cluster_id(self, core: client.CoreV1Api) -> str:
        """--cluster-id, else the UID of the kube-system Namespace (stable for the cluster's life). A
        refusal (403) or no such Namespace ends the controller with the reason; any other failure is
        logged, counted and tried again: no allocation is touched before the id is known."""
        if self.s.cluster_id:
            return self.s.cluster_id
        delay = 1.0
        while True:
            try:
                ns = await core.read_namespace("kube-system")
            except ApiException as exc:
                if exc.status in (401, 403, 404):
                    raise RuntimeError(
                        f"cannot read the kube-system Namespace for the cluster id (HTTP {exc.status} "
                        f"{(exc.reason or '').strip()}): give --cluster-id (DSIPAM_CONTROLLER_CLUSTER_ID) or allow "
                        "get on namespaces") from None
                failure: Exception = exc
            except Exception as exc:  # noqa: BLE001 - counted, logged, tried again
                failure = exc
            else:
                return str(ns.metadata.uid)
            self.metrics.errors.labels(where="cluster-id").inc()
            log.error("reading the kube-system Namespace for the cluster id failed: %s: %s; again in %gs",
                      type(failure).__name__, str(failure).strip().splitlines()[0][:300] if str(failure).strip()
                      else "", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def lead(self, api: client.ApiClient) -> None:
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        cluster = await self.cluster_id(core)
        self.cluster = cluster
        print(f"dsipam controller: cluster id {cluster}", flush=True)
        self.pools = PoolReconciler(self.ipam, custom, self.metrics, cluster=cluster)
        self.reconciler = Reconciler(self.ipam, core, self.metrics, grace=self.s.grace, cluster=cluster)

        def list_ippools(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)

        pools = Informer("ippools", list_ippools, self._ippool_event, self.metrics, watch_timeout=self.s.watch_timeout)
        pods = Informer("pods", core.list_pod_for_all_namespaces, self._pod_event, self.metrics,
                        watch_timeout=self.s.watch_timeout, slim=slim_pod)
        nodes = Informer("nodes", core.list_node, self._node_event, self.metrics, watch_timeout=self.s.watch_timeout,
                         slim=slim_meta)
        services = Informer("services", core.list_service_for_all_namespaces, self._service_event, self.metrics,
                            watch_timeout=self.s.watch_timeout, slim=slim_service)
        namespaces = Informer("namespaces", core.list_namespace, self._namespace_event, self.metrics,
                              watch_timeout=self.s.watch_timeout, slim=slim_namespace)
        self.services = ServiceReconciler(
            self.ipam, core, self.metrics,
            LbSettings(lb_class=self.s.lb_class, default_implementation=self.s.lb_default_implementation,
                       default_pool=self.s.lb_default_pool, concurrency=self.s.lb_concurrency,
                       resync_interval=self.s.resync_interval, cluster=cluster),
            services=lambda: services.cache, ippools=lambda: pools.cache)
        self.informers = [pools, pods, nodes, namespaces, services]
        self.reconciler.node_exists = lambda name: name in nodes.cache
        async with asyncio.TaskGroup() as tg:
            for inf in self.informers:
                tg.create_task(inf.run())
            # a Service's pool depends on its namespace's annotation and on the IPPools (the default
            # pool, a pool's families): none is reconciled before those lists are in the caches too
            tg.create_task(self.services.run((services.synced, namespaces.synced, pools.synced)))
            tg.create_task(self._pool_worker(pools))
            tg.create_task(self.reconciler.run_pending())
            tg.create_task(self._resync_loop())
            tg.create_task(self._status_loop(pools))

    # -- events -------------------------------------------------------------------------------

    def _ippool_event(self, kind: str, obj: dict) -> None:
        if self.services is not None:
            self.services.ippool_event(kind, obj)
        if kind == "DELETED":
            return
        self._enqueue(obj["metadata"]["name"])

    def _service_event(self, kind: str, obj: dict) -> None:
        assert self.services is not None
        self.services.service_event(kind, obj)

    def _namespace_event(self, kind: str, obj: dict) -> None:
        assert self.services is not None
        self.services.namespace_event(kind, obj)

    def _enqueue(self, name: str) -> None:
        if name not in self.queued:
            self.queued.add(name)
            self.pool_queue.put_nowait(name)

    def _pod_event(self, kind: str, obj: dict) -> None:
        assert self.reconciler is not None
        self.reconciler.pod_event(kind, obj)

    def _node_event(self, kind: str, obj: dict) -> None:
        assert self.reconciler is not None
        self.reconciler.node_event(kind, obj)

    async def _pool_worker(self, informer: Informer) -> None:
        assert self.pools is not None
        while True:
            name = await self.pool_queue.get()
            self.queued.discard(name)
            obj = informer.cache.get(name)
            if obj is None:
                continue
            try:
                await self.pools.reconcile(obj)
            except ApiException as exc:
                if exc.status != 409:
                    raise_later = exc
                else:  # the object changed meanwhile: its newer version is (or soon is) in the cache
                    self.metrics.conflicts.inc()
                    log.info("IPPool %s changed while it was reconciled (409): again with its new version", name)
                    asyncio.get_running_loop().call_later(0.2, self._enqueue, name)
                    continue
                self.metrics.errors.labels(where="ippool").inc()
                log.error("IPPool %s: reconcile failed: %s", name, raise_later, exc_info=raise_later)
                asyncio.get_running_loop().call_later(2.0, self._enqueue, name)
            except Exception as exc:  # noqa: BLE001 - counted, logged, retried after a pause
                self.metrics.errors.labels(where="ippool").inc()
                log.error("IPPool %s: reconcile failed: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
                asyncio.get_running_loop().call_later(2.0, self._enqueue, name)

    async def _resync_loop(self) -> None:
        assert self.reconciler is not None
        for inf in self.informers:
            await inf.synced.wait()
        retry = min(FIRST_RETRY, self.s.resync_interval)
        last_error: str | None = None
        while True:
            try:
                await self.reconciler.resync()
            except Exception as exc:  # noqa: BLE001 - counted, logged, tried again with a backoff
                self.metrics.errors.labels(where="resync").inc()
                text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                self.dsipam_problem = f"resync failed: dsipam {text}" if isinstance(exc, DSIPAM_DOWN) else None
                log.error("resync failed: %s; tried again in %gs", text, retry,
                          exc_info=exc if text != last_error else None)  # the traceback once per distinct error
                last_error = text
                await asyncio.sleep(retry)
                retry = min(retry * 2, self.s.resync_interval)
                continue
            if last_error is not None:
                log.info("resync works again (after: %s)", last_error)
            self.dsipam_problem, last_error = None, None
            retry = min(FIRST_RETRY, self.s.resync_interval)
            await asyncio.sleep(self.s.resync_interval)

    async def _status_loop(self, informer: Informer) -> None:
        await informer.synced.wait()
        while True:
            await asyncio.sleep(self.s.status_interval)
            for name in list(informer.cache):
                self._enqueue(name)


async def serve(settings: Settings, ipam: AsyncIpamClient) -> int:
    async with ipam:
        return await Controller(settings, ipam).run()
