"""Pod-leak and node reconciliation.

An allocation belongs to a pod when it carries the ``k8s.podUID`` attribute (the CNI plugin
records K8S_POD_UID from CNI_ARGS under that name; clients/cni/dsipam/cni/_plugin.py).

Two paths lead to a release, both through GarbageCollect with an attribute selector or a node, so
that the server re-checks the grace against each allocation's create_time at the moment of release:

- **events**: a Pod DELETED (or turned Succeeded/Failed) schedules its UID, a Node DELETED
  schedules its name, ``grace`` seconds later;
- **full resync** (every ``resync_interval`` and after each start): list every pool's allocations
  FIRST, then the pods and nodes. Any allocation in the first list was made for a pod that existed
  before the pod list began (the CNI plugin runs for a pod that the API server already holds), so
  a pod missing from the second list is gone, never "not created yet"; and an allocation younger
  than the grace is kept in any case.

Only this cluster's pools are looked at: those labelled ``ipam.dsipam.io/cluster=<cluster id>`` (an
IPPool's pool gets the label from the controller; a pool made in dsipam directly is given it by
its operator). The CNI plugin does not record the cluster on an allocation, so a pool is the unit:
another cluster's pods and nodes, in its own pools or in unlabelled ones, are never taken for gone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dsipam.client import AsyncIpamClient, Pool

from ._ippool import CLUSTER_LABEL
from ._metrics import Metrics
from ._watch import MIRROR_ANNOTATION, list_all, slim_meta, slim_pod

log = logging.getLogger("dsipam.kube")

POD_UID = "k8s.podUID"
TERMINAL = frozenset({"Succeeded", "Failed"})


@dataclass
class ResyncReport:
    pools: int = 0
    allocations: int = 0
    pods: int = 0
    nodes: int = 0
    leaked: int = 0
    unlabelled: list[str] = field(default_factory=list)  # pools without a cluster label: not looked at
    released: int = 0
    nodes_gone: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _live_pod(pod: dict) -> bool:
    # A pod with a deletionTimestamp still runs until its containers stop: it stays live.
    return (pod.get("status") or {}).get("phase") not in TERMINAL


def pod_uids(pod: dict) -> list[str]:
    """The UIDs a pod's allocations can carry: metadata.uid, and for a static pod's mirror pod the
    UID the kubelet runs the static pod under (its kubernetes.io/config.mirror annotation)."""
    meta = pod["metadata"]
    uids = [meta["uid"]] if meta.get("uid") else []
    mirror = (meta.get("annotations") or {}).get(MIRROR_ANNOTATION)
    if mirror and mirror not in uids:
        uids.append(mirror)
    return uids


class Reconciler:
    """Releases what pods and nodes that are gone left behind."""

    def __init__(self, ipam: AsyncIpamClient, core: Any, metrics: Metrics, *, grace: float, cluster: str,
                 concurrency: int = 16) -> None:
        self.cluster = cluster
        self._told_unlabelled: set[str] = set()
        self.ipam = ipam
        self.core = core  # kubernetes_asyncio CoreV1Api
        self.metrics = metrics
        self.grace = grace
        self.sem = asyncio.Semaphore(concurrency)
        # pod UID -> monotonic due time; node name -> (wall time it went away, monotonic due time)
        self.pending_pods: dict[str, float] = {}
        self.pending_nodes: dict[str, tuple[dt.datetime, float]] = {}
        # UIDs of live pods as the pod events tell (a pending UID found live again is never released:
        # a static pod whose mirror pod was deleted and re-created by its kubelet)
        self.live_uids: set[str] = set()
        self.wake = asyncio.Event()
        self.node_exists: Callable[[str], bool] = lambda name: False
        self._node_retries: dict[str, int] = {}
        self._released_nodes: set[str] = set()  # released once, blocks still waiting for a cooldown
        self.last_report: ResyncReport | None = None

    # -- events ------------------------------------------------------------------------------

    def pod_event(self, kind: str, pod: dict) -> None:
        uids = pod_uids(pod)
        if not uids:
            return
        terminal = (pod.get("status") or {}).get("phase") in TERMINAL
        if kind == "DELETED" or terminal:
            self.live_uids.difference_update(uids)
            # A deleted mirror pod does not stop its static pod (its kubelet makes a new mirror):
            # only a terminal phase speaks for the static pod too.
            for uid in uids if terminal else uids[:1]:
                self.pending_pods.setdefault(uid, time.monotonic() + self.grace)
            self.wake.set()
        else:
            self.live_uids.update(uids)
            for uid in uids:
                self.pending_pods.pop(uid, None)

    def node_event(self, kind: str, node: dict) -> None:
        if kind == "DELETED":
            self.schedule_node(node["metadata"]["name"], dt.datetime.now(dt.UTC))

    def schedule_node(self, name: str, gone_since: dt.datetime) -> None:
        if name not in self.pending_nodes:
            self.pending_nodes[name] = (gone_since, time.monotonic() + self.grace)
            self.wake.set()

    async def run_pending(self) -> None:
        """Releases scheduled pods and nodes when their grace has passed."""
        while True:
            now = time.monotonic()
            due_pods = [u for u, t in self.pending_pods.items() if t <= now]
            for u in [u for u in due_pods if u in self.live_uids]:
                self.pending_pods.pop(u, None)
                due_pods.remove(u)
            due_nodes = [n for n, (_, t) in self.pending_nodes.items() if t <= now]
            if due_pods:
                pools = await self._pool_names()
                await asyncio.gather(*(self._release_pod(p, u) for u in due_pods for p in pools))
                for u in due_pods:
                    self.pending_pods.pop(u, None)
            for name in due_nodes:
                gone_since, _ = self.pending_nodes.pop(name)
                if self.node_exists(name):
                    # The Node is back (a kubelet re-registers a Node object deleted under it): its
                    # pods may still run with their addresses. Pods that are gone are released by
                    # the pod path; releasing by node here would hand out running pods' addresses.
                    self._node_retries.pop(name, None)
                    self._released_nodes.discard(name)
                    log.info("node %s is back: its allocations are kept (those of pods that are gone are "
                             "released one by one)", name)
                    continue
                await self.release_node(name, gone_since)
            nxt = min([*self.pending_pods.values(), *(t for _, t in self.pending_nodes.values())], default=None)
            self.wake.clear()
            timeout = None if nxt is None else max(0.0, nxt - time.monotonic())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _cluster_pools(self, report: ResyncReport | None = None) -> list[Pool]:
        """The pools labelled with this cluster's id: the only ones whose pod and node allocations
        it may release."""
        ours = []
        async for p in self.ipam.iter_pools(page_size=1000):
            owner = p.labels.get(CLUSTER_LABEL)
            if owner == self.cluster:
                ours.append(p)
            elif not owner and report is not None:
                report.unlabelled.append(p.name)
        return ours

    async def _pool_names(self) -> list[str]:
        return [p.name for p in await self._cluster_pools()]

    async def _release_pod(self, pool: str, uid: str, grace: float | None = None) -> int:
        async with self.sem:
            try:
                released = await self.ipam.garbage_collect(pool, (), grace=self.grace if grace is None else grace,
                                                           selector={POD_UID: uid})
            except Exception:  # noqa: BLE001 - counted, logged; the next resync tries again
                self.metrics.errors.labels(where="release-pod").inc()
                log.exception("releasing pod %s's allocations in pool %s failed", uid, pool)
                return 0
        for a in released:
            log.info("released %s/%s: pod %s is gone or finished (%s)", pool, a.owner, uid,
                     ", ".join(str(x.ip) for x in a.addresses))
        if released:
            self.metrics.leaks_released.labels(pool=pool).inc(len(released))
        self.metrics.reconciles.labels(kind="pod").inc()
        return len(released)

    async def release_node(self, name: str, gone_since: dt.datetime) -> None:
        """In every pool: the node's allocations made before ``gone_since`` (and older than the
        grace), then its blocks that are empty now (ReleaseNode). Blocks kept only because their
        released addresses wait out the pool's cooldown are tried again once it has passed (while
        the node is still gone: a node back under the same name owns what it allocated since)."""
        age = (dt.datetime.now(dt.UTC) - gone_since).total_seconds()
        grace = max(age, self.grace)
        again: float | None = None
        try:
            pools = await self._cluster_pools()
        except Exception:  # noqa: BLE001 - counted, logged, tried again
            self.metrics.errors.labels(where="release-node").inc()
            log.exception("releasing node %s: listing pools failed", name)
            self.pending_nodes[name] = (gone_since, time.monotonic() + max(self.grace, 5.0))
            return
        failed = False
        total = 0
        for pool in pools:
            try:
                released = await self.ipam.garbage_collect(pool.name, (), grace=grace, node=name)
                blocks = await self.ipam.release_node(pool.name, name)
            except Exception:  # noqa: BLE001 - counted, logged, tried again
                failed = True
                self.metrics.errors.labels(where="release-node").inc()
                log.exception("releasing node %s in pool %s failed", name, pool.name)
                continue
            total += len(released)
            if released:
                self.metrics.node_allocations_released.labels(pool=pool.name).inc(len(released))
            if blocks.released:
                self.metrics.node_blocks_released.labels(pool=pool.name).inc(len(blocks.released))
            if blocks.kept:
                wait = pool.cooldown.total_seconds() + 1.0
                again = wait if again is None else max(again, wait)
            if released or blocks.released or blocks.kept:
                log.info("node %s is gone: released %d allocation(s) and %d block(s) in pool %s (%d block(s) kept)",
                         name, len(released), len(blocks.released), pool.name, len(blocks.kept))
        first = name not in self._released_nodes
        if failed:
            self.pending_nodes[name] = (gone_since, time.monotonic() + max(self.grace, 5.0))
        elif again is not None and not self.node_exists(name) and self._node_retries.get(name, 0) < 5:
            self._node_retries[name] = self._node_retries.get(name, 0) + 1
            self.pending_nodes[name] = (gone_since, time.monotonic() + again)
        else:
            self._node_retries.pop(name, None)
        if not failed and first:
            self._released_nodes.add(name)
            self.metrics.nodes_released.inc()
            self.metrics.reconciles.labels(kind="node").inc()
        if name not in self.pending_nodes:
            self._released_nodes.discard(name)
        self.wake.set()

    # -- full resync -------------------------------------------------------------------------

    async def resync(self) -> ResyncReport:
        start = time.monotonic()
        report = ResyncReport()
        pools = [p.name for p in await self._cluster_pools(report)]
        report.pools = len(pools)
        new = sorted(set(report.unlabelled) - self._told_unlabelled)
        if new:  # once per pool and process: a pool of this cluster made in dsipam directly needs the label
            self._told_unlabelled.update(new)
            log.warning("pool(s) %s carry no %s label: their pods' and nodes' addresses are not reclaimed by "
                        "any cluster's controller; label this cluster's with %s=%s", ", ".join(new[:20]),
                        CLUSTER_LABEL, CLUSTER_LABEL, self.cluster)
        # 1. allocations first (all pools) ...
        by_pool: dict[str, list[tuple[str, str | None, dt.datetime | None]]] = {}
        for pool in pools:
            rows = []
            async for a in self.ipam.iter_allocations(pool, page_size=1000):
                uid = a.attributes.get(POD_UID)
                if uid:
                    rows.append((uid, a.node, a.create_time))
            by_pool[pool] = rows
            report.allocations += len(rows)
        # 2. ... then pods and nodes
        pods, _ = await list_all(self.core.list_pod_for_all_namespaces, slim=slim_pod)
        nodes, _ = await list_all(self.core.list_node, slim=slim_meta)
        report.pods, report.nodes = len(pods), len(nodes)
        live = {u for p in pods if _live_pod(p) for u in pod_uids(p)}
        node_names = {n["metadata"]["name"] for n in nodes}
        # 3. ... and keep the grace: from when the pod was first seen gone, and (checked by the server
        # in GarbageCollect) from each allocation's create_time.
        jobs = []
        released_now: set[str] = set()
        missing_nodes: set[str] = set()
        nodes_of_live_pods: set[str] = set()
        for pool, rows in by_pool.items():
            leaked: set[str] = set()
            for uid, node, _created in rows:
                if node and node not in node_names:
                    missing_nodes.add(node)
                    if uid in live:
                        nodes_of_live_pods.add(node)
                if uid not in live:
                    leaked.add(uid)
            report.leaked += len(leaked)
            # A pod seen gone for the first time waits out the grace from now (as after its DELETED
            # event); one already waiting past its grace goes now.
            now_mono = time.monotonic()
            for uid in leaked:
                due = self.pending_pods.setdefault(uid, now_mono + self.grace)
                if due <= now_mono:
                    jobs.append(self._release_pod(pool, uid))
                    released_now.add(uid)
                else:
                    self.wake.set()
        counts = await asyncio.gather(*jobs)
        report.released = sum(counts)
        for uid in released_now:
            self.pending_pods.pop(uid, None)
        # A node name that no Node has, but that live pods' allocations name, is not a deleted node
        # (a CNI configuration whose node is not the Node's name): never released from here.
        for node in sorted(missing_nodes - nodes_of_live_pods):
            if node not in self.pending_nodes:
                report.nodes_gone.append(node)
                self.schedule_node(node, dt.datetime.now(dt.UTC))
        report.seconds = time.monotonic() - start
        self.metrics.resync_seconds.observe(report.seconds)
        self.metrics.resync_allocations.set(report.allocations)
        self.metrics.resync_pods.set(report.pods)
        self.metrics.reconciles.labels(kind="resync").inc()
        self.last_report = report
        log.info("resync: %d pool(s), %d pod allocation(s), %d pod(s), %d node(s); %d leaked, %d released, "
                 "nodes gone %s; %.2fs", report.pools, report.allocations, report.pods, report.nodes, report.leaked,
                 report.released, report.nodes_gone or "none", report.seconds)
        return report


def names(objs: Iterable[dict]) -> set[str]:
    return {o["metadata"]["name"] for o in objs}
