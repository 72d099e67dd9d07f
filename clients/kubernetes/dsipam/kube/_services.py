"""LoadBalancer Services: addresses from dsipam pools, under Kubernetes' own ipFamilyPolicy rules.

A Service is dsipam's when it is ``type: LoadBalancer`` with ``spec.loadBalancerClass`` equal to
the controller's class (``--lb-class``), or without a class when the controller is the cluster's
default implementation (``--lb-default-implementation``). Its owner key in dsipam is
``svc/<namespace>/<name>/<uid>``; the allocation's attributes carry ``k8s.kind=Service``, the
cluster id (``k8s.cluster``: several clusters may share one dsipam server), the namespace, name and
UID.

Level-triggered and idempotent, as the other reconcilers: each pass reads the Service as the API
server stored it, works out what it should hold (``_lbplan``: pure functions), asks dsipam for the
difference, and writes ``status.loadBalancer.ingress`` and the condition
``ipam.dsipam.io/AddressesAllocated`` only when they change. Where the owner holds addresses is
kept in an index (owner -> pools), built from dsipam (ListAllocations with the ``k8s.kind``
selector) before any Service is reconciled and widened before every Allocate, so that a release
never misses a pool. A finalizer, added before the first Allocate, holds a deleted Service until
its addresses are released, also when the controller was down at the time; the full resync
releases what Services of this cluster that are gone without it (finalizer removed by hand) left
behind: only allocations whose ``k8s.cluster`` is this cluster's id, and those without the attribute
(made before it existed) whose Service this cluster was seen to have.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import (
    AddressInCooldown,
    AddressInUse,
    AllocationNotFound,
    AsyncIpamClient,
    EventType,
    Family,
    FamilyNotInPool,
    InvalidArgument,
    OwnerHoldsOtherAddress,
    PoolExhausted,
    PoolNotFound,
)

from ._lbplan import (
    ANNOTATIONS,
    CLUSTER_ATTRIBUTE,
    CONDITION,
    IPS_ANNOTATION,
    KIND_ATTRIBUTE,
    KIND_SERVICE,
    LB_CLASS,
    MAX_ANNOTATION,
    MOVE_ANNOTATION,
    POOL_ANNOTATION,
    POOL_SERVICES_LABEL,
    SERVICE_FINALIZER,
    IPAddress,
    Problem,
    Want,
    changes,
    ingress,
    is_ours,
    owner_of,
    parse_requested,
    plan,
    pool_choice,
    service_families,
    truthy,
    uid_of_owner,
)
from ._metrics import Metrics
from ._watch import list_all

log = logging.getLogger("dsipam.kube")

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
COMPONENT = "dsipam-controller"
POOL_INFO_TTL = 2.0  # seconds a pool's families and labels are reused between Services
MAX_BACKOFF = 30.0
_UNSET = object()


@dataclass
class LbSettings:
    lb_class: str = LB_CLASS
    default_implementation: bool = False
    default_pool: str = ""  # a dsipam pool's name; empty: the IPPool marked spec.services: Default
    concurrency: int = 16
    resync_interval: float = 300.0
    cluster: str = ""  # this cluster's id: the k8s.cluster attribute of every allocation made here


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slim_service(obj: dict) -> dict:
    """What the controller needs of a Service (only its own annotations, each bounded)."""
    meta = obj.get("metadata") or {}
    slim = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp")
            if k in meta}
    ann = meta.get("annotations") or {}
    ours = {k: v[:MAX_ANNOTATION + 1] for k in ANNOTATIONS if isinstance(v := ann.get(k), str)}
    if ours:
        slim["annotations"] = ours
    if meta.get("finalizers"):
        slim["finalizers"] = list(meta["finalizers"])
    spec = obj.get("spec") or {}
    out: dict[str, Any] = {"metadata": slim, "spec": {k: spec[k] for k in (
        "type", "loadBalancerClass", "ipFamilyPolicy", "ipFamilies", "loadBalancerIP") if k in spec}}
    status = obj.get("status") or {}
    st: dict[str, Any] = {}
    ing = (status.get("loadBalancer") or {}).get("ingress")
    if ing:
        st["ingress"] = [{k: e[k] for k in ("ip", "hostname", "ipMode") if k in e} for e in ing[:16]]
    for c in status.get("conditions") or ():
        if c.get("type") == CONDITION:
            st["condition"] = {k: c.get(k) for k in ("status", "reason", "message", "observedGeneration",
                                                     "lastTransitionTime")}
    out["status"] = st
    return out


def slim_namespace(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    slim = {k: meta[k] for k in ("name", "uid", "resourceVersion") if k in meta}
    value = (meta.get("annotations") or {}).get(POOL_ANNOTATION)
    if isinstance(value, str):
        slim["annotations"] = {POOL_ANNOTATION: value[:MAX_ANNOTATION + 1]}
    return {"metadata": slim}


async def _body(resp: Any) -> dict:
    """The JSON of a response asked for with ``_preload_content=False``, or the ApiException that
    the client raises for a failed call in the other mode (it does not in this one)."""
    try:
        data = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status < 300:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = data.decode(errors="replace")[:2000]
        raise exc
    return json.loads(data)


def _uid_only(obj: dict) -> dict:
    return {"metadata": {"uid": (obj.get("metadata") or {}).get("uid")}}


def _key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace')}/{meta['name']}"


class KeyQueue:
    """client-go's work queue: a key waits once however often it is added, and goes to one worker
    at a time (added while it is being worked on: queued again when that ends)."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[str] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._q.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.add, key)

    async def get(self) -> str:
        key = await self._q.get()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._q.put_nowait(key)

    def __len__(self) -> int:
        return len(self._dirty)


@dataclass(frozen=True)
class PoolInfo:
    name: str
    families: tuple[Family, ...]
    services: str | None  # the pool's ipam.dsipam.io/services label
    cooldown: float
    networks: tuple = ()  # the ranges' CIDRs: a requested address outside them is refused before any release


class PoolCache:
    """Pools' families and labels for a short while: 1,000 Services of one pool need one GetPool."""

    def __init__(self, ipam: AsyncIpamClient) -> None:
        self.ipam = ipam
        self._entries: dict[str, tuple[float, asyncio.Future[PoolInfo]]] = {}

    def invalidate(self, name: str) -> None:
        self._entries.pop(name, None)

    async def get(self, name: str) -> PoolInfo:
        now = time.monotonic()
        entry = self._entries.get(name)
        if entry is None or entry[0] < now or (entry[1].done() and entry[1].exception() is not None):
            fut: asyncio.Future[PoolInfo] = asyncio.get_running_loop().create_future()
            self._entries[name] = (now + POOL_INFO_TTL, fut)
            try:
                pool = await self.ipam.get_pool(name)
                fut.set_result(PoolInfo(name, pool.families, pool.labels.get(POOL_SERVICES_LABEL),
                                        pool.cooldown.total_seconds(), tuple(r.cidr for r in pool.ranges)))
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                self._entries.pop(name, None)
                raise
            return fut.result()
        return await asyncio.shield(entry[1])


@dataclass
class _Memo:
    signature: tuple
    own_versions: set[str] = field(default_factory=set)  # resourceVersions our own writes produced


_PROBLEM_MAP: tuple[tuple[type[Exception], str, bool], ...] = (
    (PoolNotFound, "PoolNotFound", True),
    (PoolExhausted, "PoolExhausted", True),
    (AddressInUse, "AddressInUse", True),
    (AddressInCooldown, "AddressInCooldown", True),
    (FamilyNotInPool, "FamilyNotInPool", True),
    (InvalidArgument, "AddressNotInPool", False),
)


class ServiceReconciler:
    def __init__(self, ipam: AsyncIpamClient, core: Any, metrics: Metrics, settings: LbSettings, *,
                 services: Callable[[], dict[str, dict]], ippools: Callable[[], dict[str, dict]]) -> None:
        self.ipam = ipam
        self.core = core  # kubernetes_asyncio CoreV1Api
        self.metrics = metrics
        self.s = settings
        self.services = services  # the Service informer's cache
        self.ippools = ippools  # the IPPool informer's cache
        self.pools = PoolCache(ipam)
        self.queue = KeyQueue()
        self.index: dict[str, set[str]] = {}  # owner -> pools it may hold addresses in
        self.ready = asyncio.Event()  # the index was built: Services may be reconciled
        self.gone: dict[str, list[dict]] = {}  # key -> deleted Services whose addresses are to go
        self.ns_pool: dict[str, str] = {}  # namespace -> its ipam.dsipam.io/pool annotation
        self.failures: dict[str, int] = {}  # key -> reconciles in a row that failed (exceptions)
        self.attempts: dict[str, int] = {}  # key -> passes in a row that met a Problem to retry
        self.waiting: dict[str, str | None] = {}  # key -> the pool its Service waits for (None: any)
        self.waiting_for: dict[str, str] = {}  # key -> the address (held by another) its Service waits for
        # key -> (address, until, reason, message): a change to that address failed and the old one
        # was taken back; not tried again (given back again) before ``until`` or the address's release
        self.blocked: dict[str, tuple[str, float, str, str]] = {}
        # key -> the pool of a PreferDualStack Service that has no range of its secondary family:
        # done, but looked at again when that pool's IPPool changes (it may gain the range)
        self.single_family: dict[str, str] = {}
        self.memo: dict[str, _Memo] = {}
        self.last_event: dict[str, tuple[str, str]] = {}
        self.watches: dict[str, asyncio.Task] = {}
        self._default_seen: object = _UNSET
        self.last_sweep: dict[str, int] = {}
        self.adopted: set[str] = set()  # owners without k8s.cluster whose Service was seen in this cluster
        self.told_untagged: set[str] = set()  # owners without k8s.cluster logged as kept

    # -- events -------------------------------------------------------------------------------

    def service_event(self, kind: str, obj: dict) -> None:
        key = _key(obj)
        if kind == "DELETED":
            if self._relevant(obj):
                self.gone.setdefault(key, []).append(obj)
                self.queue.add(key)
            return
        if self._relevant(obj):
            self.queue.add(key)

    def _relevant(self, obj: dict) -> bool:
        meta = obj["metadata"]
        return (is_ours(obj.get("spec") or {}, self.s.lb_class, self.s.default_implementation)
                or SERVICE_FINALIZER in (meta.get("finalizers") or ())
                or "condition" in (obj.get("status") or {})
                or owner_of(meta.get("namespace", ""), meta["name"], meta.get("uid", "")) in self.index)

    def namespace_event(self, kind: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        value = None if kind == "DELETED" else (obj["metadata"].get("annotations") or {}).get(POOL_ANNOTATION)
        if self.ns_pool.get(name) == value:
            return
        if value is None:
            self.ns_pool.pop(name, None)
        else:
            self.ns_pool[name] = value
        for key, svc in list(self.services().items()):
            if svc["metadata"].get("namespace") == name and self._relevant(svc):
                self.queue.add(key)

    def ippool_event(self, kind: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        self.pools.invalidate(name)
        try:
            default: object = self.default_pool()
        except Problem as p:
            default = p.message
        if default != self._default_seen:  # the default changed: every Service may be concerned
            self._default_seen = default
            for key, svc in list(self.services().items()):
                if self._relevant(svc):
                    self.queue.add(key)
            return
        for key, pool in list(self.waiting.items()):
            if pool is None or pool == name:
                self.queue.add(key)
        for key, pool in list(self.single_family.items()):
            if pool == name:
                self.memo.pop(key, None)
                self.queue.add(key)

    def default_pool(self) -> str | None:
        if self.s.default_pool:
            return self.s.default_pool
        marked = sorted(n for n, o in self.ippools().items()
                        if (o.get("spec") or {}).get("services") == "Default"
                        and not o["metadata"].get("deletionTimestamp"))
        if len(marked) > 1:
            raise Problem("AmbiguousDefaultPool", f"IPPools {', '.join(marked[:5])} are all marked spec.services: "
                                                  "Default; mark one", retry=True)
        return marked[0] if marked else None

    # -- the loops ------------------------------------------------------------------------------

    async def run(self, synced: Sequence[asyncio.Event]) -> None:
        """``synced``: the informers whose caches a Service's reconcile reads (the Services, the
        namespaces' pool annotations, the IPPools); no Service is reconciled before all are set."""
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(max(1, self.s.concurrency)):
                    tg.create_task(self._worker())
                tg.create_task(self._resync_loop(synced))
        finally:
            await self.close()

    async def _resync_loop(self, synced: Sequence[asyncio.Event]) -> None:
        retry = 2.0
        last_error: str | None = None
        while True:
            try:
                await self.sweep(synced)
            except Exception as exc:  # noqa: BLE001 - counted, logged, tried again with a backoff
                self.metrics.errors.labels(where="service-resync").inc()
                text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                log.error("LoadBalancer resync failed: %s; tried again in %gs", text, retry,
                          exc_info=exc if text != last_error else None)  # the traceback once per distinct error
                last_error = text
                await asyncio.sleep(retry)
                retry = min(retry * 2, self.s.resync_interval)
                continue
            if last_error is not None:
                log.info("LoadBalancer resync works again (after: %s)", last_error)
            retry, last_error = 2.0, None
            await asyncio.sleep(self.s.resync_interval)

    async def sweep(self, synced: Sequence[asyncio.Event]) -> dict[str, int]:
        """Lists every pool's Service allocations (into the index), THEN the Services, and releases
        the allocations of Services that are gone: every allocation listed was made for a Service
        that existed before the Service list began, so one missing from it is gone. Then every
        Service is reconciled again."""
        start = time.monotonic()
        listed: dict[str, set[str]] = {}
        untagged: dict[str, set[str]] = {}  # made before k8s.cluster existed: whose, the Services tell
        others = 0
        pools = [p.name async for p in self.ipam.iter_pools(page_size=1000)]
        for pool in pools:
            async for a in self.ipam.iter_allocations(pool, selector={KIND_ATTRIBUTE: KIND_SERVICE}, page_size=1000):
                if not uid_of_owner(a.owner):
                    continue
                cluster = a.attributes.get(CLUSTER_ATTRIBUTE)
                if cluster == self.s.cluster:
                    listed.setdefault(a.owner, set()).add(pool)
                elif cluster is None:
                    untagged.setdefault(a.owner, set()).add(pool)
                else:
                    others += 1  # another cluster's Service: never indexed, never released here
        items, _ = await list_all(self.core.list_service_for_all_namespaces, slim=_uid_only)
        live = {o["metadata"]["uid"] for o in items}
        # An allocation without the attribute is this cluster's when its Service (a UID: unique
        # across clusters) is here, or was seen here by an earlier sweep; any other may be another
        # cluster's: kept, and named once.
        for owner, where in untagged.items():
            if uid_of_owner(owner) in live:
                self.adopted.add(owner)
            if owner in self.adopted:
                listed.setdefault(owner, set()).update(where)
            elif owner not in self.told_untagged:
                self.told_untagged.add(owner)
                log.warning("Service allocation %s in pool(s) %s has no %s attribute and its Service is not in this "
                            "cluster: kept (it may be another cluster's; if it was this cluster's, release it with "
                            "'dsipam alloc release POOL %s')", owner, ", ".join(sorted(where)), CLUSTER_ATTRIBUTE,
                            owner)
        for owner, where in listed.items():
            self.index.setdefault(owner, set()).update(where)
        released = 0
        for owner, where in listed.items():
            if uid_of_owner(owner) in live:
                continue
            self.adopted.discard(owner)
            for pool in sorted(where):
                got = await self._release(pool, owner, why="its Service is gone")
                released += len(got)
            self.index.pop(owner, None)
        for event in synced:
            await event.wait()
        self.memo.clear()
        if not self.ready.is_set():
            self.ready.set()
        for key, svc in list(self.services().items()):
            if self._relevant(svc):
                self.queue.add(key)
        report = {"pools": len(pools), "allocations": sum(map(len, listed.values())), "services": len(items),
                  "released": released, "other_clusters": others,
                  "untagged_kept": len([o for o in untagged if o not in self.adopted and o not in listed])}
        self.last_sweep = report
        self.metrics.reconciles.labels(kind="service-resync").inc()
        log.info("LoadBalancer resync: %d pool(s), %d Service allocation(s) of this cluster, %d of other clusters, "
                 "%d without a cluster kept; %d Service(s); %d address(es) of gone Services released; %.2fs",
                 report["pools"], report["allocations"], others, report["untagged_kept"], report["services"],
                 released, time.monotonic() - start)
        return report

    async def _worker(self) -> None:
        await self.ready.wait()
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile_key(key)
            except ApiException as exc:
                if exc.status == 409:  # the Service changed meanwhile: again with its newer version
                    self.metrics.conflicts.inc()
                    self.queue.add_after(key, 0.2)
                elif exc.status == 404:  # gone meanwhile: its DELETED event follows
                    pass
                else:
                    self._failed(key, exc)
            except Exception as exc:  # noqa: BLE001 - counted, logged, retried with a backoff
                self._failed(key, exc)
            else:
                self.failures.pop(key, None)
            finally:
                self.queue.done(key)
                self.metrics.services_queued.set(len(self.queue))

    def _failed(self, key: str, exc: BaseException) -> None:
        n = self.failures[key] = self.failures.get(key, 0) + 1
        delay = min(2.0 ** (n - 1), MAX_BACKOFF)
        self.metrics.errors.labels(where="service").inc()
        log.error("Service %s: reconcile failed: %s: %s; again in %gs", key, type(exc).__name__,
                  (str(exc).strip().splitlines() or [""])[0][:300], delay, exc_info=exc)
        self.queue.add_after(key, delay)

    # -- one Service ---------------------------------------------------------------------------

    async def reconcile_key(self, key: str) -> None:
        while self.gone.get(key):
            old = self.gone[key][0]
            meta = old["metadata"]
            await self._release_all(owner_of(meta["namespace"], meta["name"], meta["uid"]), why="Service deleted")
            self.gone[key].pop(0)
        self.gone.pop(key, None)
        obj = self.services().get(key)
        if obj is None:
            self._forget(key)
            return
        await self.reconcile(key, obj)

    def _forget(self, key: str) -> None:
        for d in (self.memo, self.last_event, self.waiting, self.waiting_for, self.blocked, self.single_family,
                  self.failures, self.attempts):
            d.pop(key, None)  # type: ignore[attr-defined]
        self.metrics.services_waiting.set(len(self.waiting))

    async def reconcile(self, key: str, obj: dict) -> None:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        owner = owner_of(ns, name, uid)
        if meta.get("deletionTimestamp") or not is_ours(spec, self.s.lb_class, self.s.default_implementation):
            await self._let_go(key, obj, owner)
            return
        signature = self._signature(obj)
        memo = self.memo.get(key)
        if memo is not None and memo.signature[0] == signature[0] and (
                memo.signature == signature or meta.get("resourceVersion") in memo.own_versions):
            return  # nothing changed since it was done, or the object is one of our own writes
        self.metrics.reconciles.labels(kind="service").inc()
        own: set[str] = set()
        if SERVICE_FINALIZER not in (meta.get("finalizers") or ()):
            obj = await self._patch_finalizers(obj, [*(meta.get("finalizers") or ()), SERVICE_FINALIZER])
            own.add(obj["metadata"]["resourceVersion"])
        try:
            held, order, pool, note = await self._converge(obj, owner)
        except Problem as p:
            self.metrics.service_problems.labels(reason=p.reason).inc()
            self.waiting[key] = getattr(p, "pool", None)
            if getattr(p, "address", None) and p.reason == "AddressInUse":  # (one in cooldown: no release comes)
                self.waiting_for[key] = p.address  # type: ignore[attr-defined]
            else:
                self.waiting_for.pop(key, None)
            self.metrics.services_waiting.set(len(self.waiting))
            self.memo.pop(key, None)
            await self._event(key, obj, "Warning", p.reason, p.message)
            # what the Service holds changed before the problem (a family dropped, an address given
            # back that could not be taken again): the ingress says so, never an address not held
            await self._write_status(obj, getattr(p, "ingress", None), ("False", p.reason, p.message))
            if p.retry:
                delay = self._retry_later(key, getattr(p, "pool", None))
                if getattr(p, "swap", False) and getattr(p, "address", None):
                    self.blocked[key] = (p.address, time.monotonic() + delay - 0.05, p.reason,  # type: ignore
                                         p.message)
                else:
                    self.blocked.pop(key, None)
            return
        addresses = ", ".join(str(held[f]) for f in order if f in held)
        if note is None:
            cond = ("True", "Allocated", f"{addresses} from pool {pool}")
        else:
            cond = ("True", note.reason, f"{addresses} from pool {pool}; {note.message}")
        changed, obj = await self._write_status(obj, ingress(order, held), cond)
        if changed is not None:
            own.add(obj["metadata"]["resourceVersion"])
            if changed:
                await self._event(key, obj, "Normal", "AddressesAllocated", f"{addresses} from pool {pool}",
                                  dedupe=False)
        if note is not None:
            self.metrics.service_problems.labels(reason=note.reason).inc()
            await self._event(key, obj, "Normal" if note.reason == "SingleFamilyPool" else "Warning", note.reason,
                              note.message)
        if note is not None and note.retry:
            self.waiting[key] = pool
            self.memo.pop(key, None)
            self._retry_later(key, pool)
        else:
            self.waiting.pop(key, None)
            self.waiting_for.pop(key, None)
            self.blocked.pop(key, None)
            self.attempts.pop(key, None)
            if note is not None and note.reason == "SingleFamilyPool":
                self.single_family[key] = pool
            else:
                self.single_family.pop(key, None)
            self.memo[key] = _Memo(self._signature(obj), own)
        self.metrics.services_waiting.set(len(self.waiting))

    def _retry_later(self, key: str, pool: str | None) -> float:
        n = self.attempts[key] = self.attempts.get(key, 0) + 1
        delay = min(2.0 ** (n - 1), MAX_BACKOFF)
        self.queue.add_after(key, delay)
        if pool is not None:
            self._watch_pool(pool)
        return delay

    def _signature(self, obj: dict) -> tuple:
        meta = obj["metadata"]
        try:
            default: object = self.default_pool()
        except Problem as p:
            default = p.message
        outside = (self.ns_pool.get(meta.get("namespace", "")), default)  # inputs that are not the Service's
        return (outside, meta.get("uid"), json.dumps(meta.get("annotations") or {}, sort_keys=True),
                SERVICE_FINALIZER in (meta.get("finalizers") or ()), json.dumps(obj.get("spec"), sort_keys=True),
                json.dumps(obj.get("status"), sort_keys=True))

    async def _converge(self, obj: dict, owner: str) -> tuple[dict[Family, IPAddress], tuple[Family, ...], str,
                                                                Problem | None]:
        """Makes the owner hold what the Service asks for; returns (held, order, pool, note)."""
        meta, spec = obj["metadata"], obj.get("spec") or {}
        annotations = meta.get("annotations") or {}
        ns = meta["namespace"]
        policy, families = service_families(spec)
        requested = parse_requested(annotations.get(IPS_ANNOTATION), spec.get("loadBalancerIP"))
        desired, source = pool_choice(annotations.get(POOL_ANNOTATION), self.ns_pool.get(ns), self.default_pool(), ns)
        note: Problem | None = None
        target = desired
        others = await self._holding_pools(owner, exclude=desired)
        if others:
            if truthy(annotations.get(MOVE_ANNOTATION)):
                log.info("Service %s/%s moves from pool %s to pool %s (%s=true)", ns, meta["name"],
                         ", ".join(others), desired, MOVE_ANNOTATION)
            else:
                target = others[0]
                note = Problem("PoolChangeNotApplied", f"the {source} asks for pool {desired}, but the Service holds "
                                                       f"addresses of pool {target}: annotate it {MOVE_ANNOTATION}=true "
                                                       "to move (its addresses change)")
        try:
            info = await self.pools.get(target)
        except PoolNotFound:
            raise _pool_problem(Problem("PoolNotFound", f"pool {target} does not exist", retry=True), target) from None
        if info.services not in ("allowed", "default") and target != self.s.default_pool:
            raise _pool_problem(Problem("PoolNotAllowed", f"pool {target} is not for Services (its IPPool has no "
                                                          f"spec.services, nor the pool a label {POOL_SERVICES_LABEL})",
                                        retry=True), target)
        try:
            want = plan(policy, families, target, info.families, requested)
        except Problem as p:
            raise _pool_problem(p, target) from None
        for addr in want.addresses.values():  # refused before anything held is given back for it
            if info.networks and not any(addr in net for net in info.networks if net.version == addr.version):
                raise _pool_problem(Problem("AddressNotInPool", f"requested address {addr} is outside the ranges of "
                                                                f"pool {target}"), target)
        held = await self._held(target, owner) if target in self.index.get(owner, ()) else {}
        before = dict(held)
        ch = changes(want, held)
        swapped = {f: before[f] for f in ch.release if f in want.order}
        blocked = self.blocked.get(_key(obj))
        if swapped and blocked and blocked[1] > time.monotonic() and blocked[0] in {
                str(want.addresses[f]) for f in swapped if f in want.addresses}:
            again = Problem(blocked[2], blocked[3], retry=True)  # as the last try, without giving back again
            again.address, again.swap = blocked[0], True  # type: ignore[attr-defined]
            raise _pool_problem(again, target)
        if swapped:  # shown by another Service: taken, surely; refused without giving anything back
            asked = {str(want.addresses[f]) for f in swapped if f in want.addresses}
            for k, other in list(self.services().items()):
                shown = asked & {e.get("ip") for e in (other.get("status") or {}).get("ingress") or ()}
                if shown and k != _key(obj):
                    keeps = ", ".join(str(swapped[f]) for f in want.order if f in swapped)
                    taken = Problem("AddressInUse", f"requested address {min(shown)} is held by another owner; "
                                                    f"keeps {keeps}", retry=True)
                    taken.address = min(shown)  # type: ignore[attr-defined]
                    raise _pool_problem(taken, target)
        if ch.release:
            await self._release(target, owner, families=ch.release,
                                why="no longer asked for (ipFamilies or requested address changed)")
            for fam in ch.release:
                held.pop(fam, None)
        if ch.allocate:
            try:
                held = await self._allocate(target, owner, want, held, obj)
            except Problem as p:
                # An owner holds one address per family, so a changed request gives the old address
                # back first (dsipam has no swap); when the new one cannot be had, the old one is
                # taken back (its last holder may, even in cooldown) and the Service keeps it.
                if swapped:
                    held = await self._take_back(target, owner, swapped, want, held, obj, p)
                    p.swap = True  # type: ignore[attr-defined]
                if held != before or target != desired or not others:
                    # the pool the Service stays in: the ingress is what dsipam holds there (also after
                    # a controller died between a give-back and a take; while moving, the old pool's
                    # addresses are still the Service's and stay listed)
                    p.ingress = ingress(want.order, held)  # type: ignore[attr-defined]
                raise
        if target == desired and others:  # moved: what the old pools held goes now
            for pool in others:
                await self._release(pool, owner, why=f"moved to pool {target}")
                self.index.get(owner, set()).discard(pool)
        missing = [f for f in want.order if f not in held]
        if missing and note is None:  # PreferDualStack's secondary (plan() left out a family the pool lacks)
            note = Problem("SecondaryFamilyPending", f"PreferDualStack: pool {target} has no free {missing[0].label} "
                                                     "address; it is added when one is free", retry=True)
        elif len(want.order) < len(families) and note is None and policy == "PreferDualStack":
            note = Problem("SingleFamilyPool", f"PreferDualStack: pool {target} has no {families[1].label} range; "
                                               f"{families[0].label} only")
        return held, want.order, target, note

    async def _holding_pools(self, owner: str, exclude: str) -> list[str]:
        """Pools other than ``exclude`` where the owner holds addresses (checked: the index may
        name pools where an Allocate did not go through)."""
        out = []
        for pool in sorted(self.index.get(owner, set()) - {exclude}):
            try:
                await self.ipam.get_allocation(pool, owner)
            except (AllocationNotFound, PoolNotFound):
                self.index.get(owner, set()).discard(pool)
                continue
            out.append(pool)
        return out

    async def _held(self, pool: str, owner: str) -> dict[Family, IPAddress]:
        try:
            a = await self.ipam.get_allocation(pool, owner)
        except (AllocationNotFound, PoolNotFound):
            return {}
        return {x.family: x.ip for x in a.addresses}

    async def _allocate(self, pool: str, owner: str, want: Want, held: dict[Family, IPAddress],
                        obj: dict) -> dict[Family, IPAddress]:
        meta = obj["metadata"]
        attrs = self._attributes(meta)
        self.index.setdefault(owner, set()).add(pool)  # before the call: a release never misses it
        order = list(want.order)
        policy = "require" if len(order) == 2 else "single"
        addrs = [str(want.addresses[f]) for f in order if f in want.addresses]
        try:
            try:
                res = await self.ipam.allocate(pool, owner, policy=policy, families=order, addresses=addrs,
                                               attributes=attrs)
            except PoolExhausted as exc:
                fam = exc.metadata.get("family")
                secondary = order[1] if len(order) == 2 else None
                if secondary is None or secondary not in want.optional or fam != secondary.label:
                    raise
                # PreferDualStack: the secondary family is full; the primary alone
                first = [str(want.addresses[order[0]])] if order[0] in want.addresses else []
                res = await self.ipam.allocate(pool, owner, policy="single", families=order[:1], addresses=first,
                                               attributes=attrs)
        except OwnerHoldsOtherAddress:
            self.pools.invalidate(pool)
            raise  # what we held changed under us: the next pass reads it again
        except tuple(t for t, _, _ in _PROBLEM_MAP) as exc:
            if isinstance(exc, InvalidArgument) and not (exc.field or "").startswith("addresses"):
                raise  # not about the requested addresses: a failure, not a verdict
            if not held:
                self.index.get(owner, set()).discard(pool)  # nothing taken: the call was undone whole
            reason, retry = next((r, rt) for t, r, rt in _PROBLEM_MAP if isinstance(exc, t))
            text = str(exc).split(" (request ", 1)[0]
            if isinstance(exc, PoolExhausted) and exc.metadata.get("family"):
                text = f"pool {pool} has no free {exc.metadata['family']} address"
            elif isinstance(exc, AddressInUse):
                text = f"requested address {exc.metadata.get('address', '')} is held by another owner"
            elif isinstance(exc, PoolNotFound):
                self.pools.invalidate(pool)
                text = f"pool {pool} does not exist"
            problem = Problem(reason, text, retry=retry)
            if isinstance(exc, AddressInUse | AddressInCooldown) and exc.metadata.get("address"):
                problem.address = exc.metadata["address"]  # type: ignore[attr-defined]
            raise _pool_problem(problem, pool) from None
        got = {x.family: x.ip for x in res.allocation.addresses}
        extra = [f for f in got if f not in want.order]
        if extra:  # held from before, no longer asked for
            await self._release(pool, owner, families=tuple(extra), why="no longer asked for")
            for f in extra:
                got.pop(f)
        if res.created:
            self.metrics.service_addresses.labels(op="allocate").inc(len([f for f in got if f not in held]))
            log.info("Service %s/%s: %s from pool %s", meta["namespace"], meta["name"],
                     ", ".join(str(got[f]) for f in want.order if f in got), pool)
        return got

    def _attributes(self, meta: dict) -> dict[str, str]:
        return {KIND_ATTRIBUTE: KIND_SERVICE, CLUSTER_ATTRIBUTE: self.s.cluster, "k8s.namespace": meta["namespace"],
                "k8s.service": meta["name"], "k8s.serviceUID": meta["uid"]}

    async def _take_back(self, pool: str, owner: str, swapped: dict[Family, IPAddress], want: Want,
                         held: dict[Family, IPAddress], obj: dict, problem: Problem) -> dict[Family, IPAddress]:
        """After a changed request failed: the addresses given back for it, taken again; returns what
        the owner holds. One that cannot be had (taken meanwhile: a pool without cooldown) is named in
        the problem's message; any other failure of the call is logged, counted and raised."""
        order = [f for f in want.order if f in swapped]
        meta = obj["metadata"]
        attrs = self._attributes(meta)
        old = ", ".join(str(swapped[f]) for f in order)
        self.index.setdefault(owner, set()).add(pool)
        try:
            res = await self.ipam.allocate(pool, owner, policy="require" if len(order) == 2 else "single",
                                           families=order, addresses=[str(swapped[f]) for f in order],
                                           attributes=attrs)
        except (AddressInUse, AddressInCooldown, PoolExhausted) as exc:
            log.warning("Service %s/%s: could not take back %s from pool %s: %s", meta["namespace"], meta["name"],
                        old, pool, exc)
            problem.message += f"; its previous address {old} was taken meanwhile"
            return await self._held(pool, owner)
        except Exception as exc:
            self.metrics.errors.labels(where="service-take-back").inc()
            log.error("Service %s/%s: taking back %s in pool %s failed: %s: %s", meta["namespace"], meta["name"],
                      old, pool, type(exc).__name__, exc)
            raise
        problem.message += f"; keeps {old}"
        log.info("Service %s/%s keeps %s from pool %s (%s)", meta["namespace"], meta["name"], old, pool,
                 problem.reason)
        return {x.family: x.ip for x in res.allocation.addresses}

    async def _release(self, pool: str, owner: str, *, families: tuple[Family, ...] = (), why: str) -> tuple:
        try:
            got = await self.ipam.release(pool, owner, families=list(families) or None)
        except PoolNotFound:
            return ()
        if got:
            self.metrics.service_addresses.labels(op="release").inc(len(got))
            log.info("released %s/%s (%s): %s", pool, owner, ", ".join(str(a.ip) for a in got), why)
        return got

    async def _release_all(self, owner: str, *, why: str) -> list[str]:
        released: list[str] = []
        for pool in sorted(self.index.get(owner, set())):
            released += [str(a.ip) for a in await self._release(pool, owner, why=why)]
        self.index.pop(owner, None)
        return released

    async def _let_go(self, key: str, obj: dict, owner: str) -> None:
        """Not (or no longer) dsipam's, or deleted: its addresses go, then our status and finalizer."""
        meta = obj["metadata"]
        released = await self._release_all(owner, why="Service deleted" if meta.get("deletionTimestamp")
                                           else "no longer a LoadBalancer Service of class " + self.s.lb_class)
        if released:
            self.metrics.reconciles.labels(kind="service").inc()
        if not meta.get("deletionTimestamp"):
            st = obj.get("status") or {}
            if "condition" in st or (st.get("ingress") and released):
                keep = [] if (obj.get("spec") or {}).get("type") != "LoadBalancer" else \
                    [e for e in st.get("ingress") or () if e.get("ip") not in released]
                body = {"metadata": {"resourceVersion": meta["resourceVersion"]},
                        "status": {"loadBalancer": {"ingress": keep or None},
                                   "conditions": [{"type": CONDITION, "$patch": "delete"}]}}
                resp = await self.core.patch_namespaced_service_status(meta["name"], meta["namespace"], body,
                                                                       _content_type=STRATEGIC, _preload_content=False)
                obj = slim_service(await _body(resp))
                meta = obj["metadata"]
            if released:
                await self._event(key, obj, "Normal", "AddressesReleased",
                                  f"released {', '.join(released)}: not a LoadBalancer Service of class "
                                  f"{self.s.lb_class}", dedupe=False)
        if SERVICE_FINALIZER in (meta.get("finalizers") or ()):
            await self._patch_finalizers(obj, [f for f in meta["finalizers"] if f != SERVICE_FINALIZER])
        self._forget(key)

    # -- writes to the API server ----------------------------------------------------------------

    async def _patch_finalizers(self, obj: dict, finalizers: list[str]) -> dict:
        meta = obj["metadata"]
        body = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
        resp = await self.core.patch_namespaced_service(meta["name"], meta["namespace"], body, _content_type=MERGE,
                                                        _preload_content=False)
        return slim_service(await _body(resp))

    async def _write_status(self, obj: dict, want_ingress: list[dict] | None,
                            cond: tuple[str, str, str]) -> tuple[bool | None, dict]:
        """Writes ingress (None: leave it) and the condition when they differ from the stored ones.
        Returns (None: nothing written, else whether the ingress changed; the object)."""
        meta, st = obj["metadata"], obj.get("status") or {}
        status_text, reason, message = cond
        message = message[:32000]
        gen = meta.get("generation", 0)
        old = st.get("condition") or {}
        same_cond = (old.get("status"), old.get("reason"), old.get("message"), old.get("observedGeneration")) == (
            status_text, reason, message, gen)
        ingress_changed = want_ingress is not None and (st.get("ingress") or []) != want_ingress
        if same_cond and not ingress_changed:
            return None, obj
        since = old.get("lastTransitionTime") if old.get("status") == status_text and old.get(
            "lastTransitionTime") else _now()
        status: dict[str, Any] = {"conditions": [{"type": CONDITION, "status": status_text, "reason": reason,
                                                  "message": message, "observedGeneration": gen,
                                                  "lastTransitionTime": since}]}
        if ingress_changed:
            status["loadBalancer"] = {"ingress": want_ingress or None}
        resp = await self.core.patch_namespaced_service_status(meta["name"], meta["namespace"], {"status": status},
                                                               _content_type=STRATEGIC, _preload_content=False)
        self.metrics.service_status_writes.inc()
        return ingress_changed, slim_service(await _body(resp))

    async def _event(self, key: str, obj: dict, etype: str, reason: str, message: str, *,
                     dedupe: bool = True) -> None:
        """A core/v1 Event on the Service; a Warning repeated with the same reason and message is
        not written again."""
        if dedupe and self.last_event.get(key) == (reason, message):
            return
        self.last_event[key] = (reason, message)
        meta = obj["metadata"]
        now = _now()
        body = {"metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": meta["namespace"],
                                   "name": meta["name"], "uid": meta["uid"],
                                   "resourceVersion": meta.get("resourceVersion")},
                "reason": reason, "message": message[:1024], "type": etype,
                "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
                "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            await _body(await self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 403 and "being terminated" in str(exc.body)):
                return  # its namespace is going away
            self.metrics.errors.labels(where="service-event").inc()
            log.error("Service %s: writing Event %s failed: HTTP %s %s", key, reason, exc.status,
                      (exc.reason or "").strip())
        except Exception as exc:  # noqa: BLE001 - an Event is a report, not the work: counted, logged
            self.metrics.errors.labels(where="service-event").inc()
            log.error("Service %s: writing Event %s failed: %s: %s", key, reason, type(exc).__name__, exc)

    # -- waiting for addresses ------------------------------------------------------------------

    def _watch_pool(self, pool: str) -> None:
        """Follows the pool's releases while Services wait for it: a freed address (after the
        pool's cooldown) is tried at once instead of at the next backoff."""
        if pool in self.watches:
            return
        self.watches[pool] = asyncio.get_running_loop().create_task(self._follow(pool), name=f"lb-watch-{pool}")

    def _waiters(self, pool: str) -> list[str]:
        return [k for k, p in self.waiting.items() if p == pool]

    async def _follow(self, pool: str) -> None:
        try:
            async with self.ipam.follow_allocations(pool, bookmarks=True) as events:
                first = True
                async for ev in events:
                    waiters = self._waiters(pool)
                    if not waiters:
                        return
                    if first or ev.type is EventType.RELEASED:
                        freed = None if first else {str(a.ip) for a in ev.addresses}
                        first = False
                        # a Service waiting for one address held by another wakes when that one is
                        # freed (not at its own take-back's release: that would loop)
                        waiters = [k for k in waiters if freed is None or k not in self.waiting_for
                                   or self.waiting_for[k] in freed]
                        if not waiters:
                            continue
                        if freed is not None:
                            for k in waiters:
                                self.blocked.pop(k, None)
                        try:
                            cooldown = (await self.pools.get(pool)).cooldown
                        except PoolNotFound:
                            return
                        for k in waiters:
                            self.queue.add(k)
                            if cooldown:
                                self.queue.add_after(k, cooldown + 0.5)
        except PoolNotFound:
            return
        except Exception as exc:  # noqa: BLE001 - the backoff still retries: counted, logged
            self.metrics.errors.labels(where="service-pool-watch").inc()
            log.error("watching pool %s for freed addresses failed: %s: %s", pool, type(exc).__name__, exc)
        finally:
            self.watches.pop(pool, None)

    async def close(self) -> None:
        for t in list(self.watches.values()):
            t.cancel()
        await asyncio.gather(*self.watches.values(), return_exceptions=True)


def _pool_problem(p: Problem, pool: str) -> Problem:
    p.pool = pool  # type: ignore[attr-defined]
    return p
