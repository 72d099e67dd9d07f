"""IPPool (ipam.dsipam.io/v1alpha1): the dsipam pool of the same name follows the object's spec.

Level-triggered and idempotent: every pass compares the object's spec with the pool as dsipam
has it now and makes only the calls that close the gap, so an event seen twice, a resync, or a
restart in the middle changes nothing more.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from dsipam.client import (
    AsyncIpamClient,
    FailedPrecondition,
    InvalidArgument,
    IpamError,
    Pool,
    PoolNotFound,
    Range,
)

from ._metrics import Metrics

log = logging.getLogger("dsipam.kube")

GROUP = "ipam.dsipam.io"
VERSION = "v1alpha1"
PLURAL = "ippools"
FINALIZER = "ipam.dsipam.io/pool"
FORCE_DELETE = "ipam.dsipam.io/force-delete"  # annotation "true": delete even with live allocations
MANAGED_LABEL = "ipam.dsipam.io/managed-by"  # on the dsipam pool
MANAGED_VALUE = "dsipam-controller"
SERVICES_LABEL = "ipam.dsipam.io/services"  # on the dsipam pool: spec.services, lowercased
# on the dsipam pool: the id of the cluster whose controller manages it and reclaims its pods' and
# nodes' addresses (several clusters may share one dsipam server; docs/kubernetes.md)
CLUSTER_LABEL = "ipam.dsipam.io/cluster"
INT64_MAX = 2**63 - 1
MERGE = "application/merge-patch+json"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_ranges(spec: dict) -> list[Range]:
    out = []
    for i, r in enumerate(spec.get("ranges") or ()):
        try:
            out.append(Range(r["cidr"], first=r.get("first") or None, last=r.get("last") or None,
                             gateway=r.get("gateway") or None, exclude=r.get("exclude") or (),
                             block_size=int(r.get("blockSize") or 0)))
        except (IpamError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"spec.ranges[{i}]: {exc}") from None
    return out


def parse_duration(text: str) -> float:
    """A Go duration such as ``30s``, ``1m30s``, ``250ms`` (the CRD's CEL rule accepts only these)."""
    import re

    total = 0.0
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise InvalidArgument(f"spec.cooldown: {text!r} is not a duration such as 30s or 5m")
    for value, unit in parts:
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _same_range(want: Range, have: Range) -> bool:
    return (want.cidr == have.cidr and want.first in (None, have.first) and want.last in (None, have.last)
            and want.gateway == have.gateway and set(want.exclude) == set(have.exclude)
            # the server makes a block no larger than its range (blockSize 65536 on a /24 is 256):
            # compared as is, such a range would be removed and added again on every pass
            and min(want.block_size, want.cidr.num_addresses) in (0, have.block_size))


def _usage(pool: Pool) -> tuple[list[dict], dict[str, str]]:
    rows, summary = [], {}
    for u in pool.usage:
        fam = "IPv4" if str(u.family).lower().endswith("4") else "IPv6"
        rows.append({"family": fam, "size": min(u.size, INT64_MAX), "allocated": min(u.allocated, INT64_MAX),
                     "free": min(u.free, INT64_MAX), "cooldown": min(u.cooldown, INT64_MAX),
                     "reserved": min(u.reserved, INT64_MAX)})
        summary["ipv4Usage" if fam == "IPv4" else "ipv6Usage"] = f"{u.allocated}/{u.size}"
    return rows, summary


class PoolReconciler:
    def __init__(self, ipam: AsyncIpamClient, custom: Any, metrics: Metrics, *, cluster: str) -> None:
        self.cluster = cluster
        self.ipam = ipam
        self.custom = custom  # kubernetes_asyncio CustomObjectsApi
        self.metrics = metrics

    async def reconcile(self, obj: dict) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        self.metrics.reconciles.labels(kind="ippool").inc()
        if meta.get("deletionTimestamp"):
            await self._finalize(obj)
            return
        if FINALIZER not in (meta.get("finalizers") or ()):
            await self._patch_meta(obj, finalizers=[*(meta.get("finalizers") or ()), FINALIZER])
        spec = obj.get("spec") or {}
        conds: dict[str, tuple[str, str, str]] = {}
        pool: Pool | None = None
        try:
            pool, problems = await self._sync(name, spec)
        except _NotManaged as exc:
            conds["Synced"] = ("False", exc.reason, str(exc))
            conds["Ready"] = ("False", exc.reason, str(exc))
            await self._write_status(obj, conds, None)
            return
        except IpamError as exc:
            reason = _reason(exc)
            conds["Synced"] = ("False", reason, str(exc))
            try:
                pool = await self.ipam.get_pool(name)
            except PoolNotFound:
                pool = None
            problems = []
        else:
            if problems:
                conds["Synced"] = ("False", problems[0][0], "; ".join(p[1] for p in problems))
            else:
                conds["Synced"] = ("True", "Synced", "the pool matches the spec")
        if pool is None:
            conds["Ready"] = ("False", conds["Synced"][1], "the pool does not exist: " + conds["Synced"][2])
        else:
            conds["Ready"] = ("True", "PoolServing", f"pool {name} serves {len(pool.ranges)} range(s)")
        await self._write_status(obj, conds, pool)

    async def refresh_status(self, obj: dict) -> None:
        """Usage only (the periodic refresh): no writes to dsipam."""
        await self.reconcile(obj)

    async def _sync(self, name: str, spec: dict) -> tuple[Pool, list[tuple[str, str]]]:
        ranges = desired_ranges(spec)
        labels = {**(spec.get("labels") or {}), MANAGED_LABEL: MANAGED_VALUE, CLUSTER_LABEL: self.cluster}
        if spec.get("services") in ("Allowed", "Default"):  # LoadBalancer Services may use it (_services.py)
            labels[SERVICES_LABEL] = spec["services"].lower()
        cooldown = parse_duration(spec["cooldown"]) if spec.get("cooldown") else None
        affinity = (spec.get("nodeAffinity") or "Borrow").lower()
        network = spec.get("network") or ""
        try:
            pool = await self.ipam.get_pool(name)
        except PoolNotFound:
            pool = await self.ipam.create_pool(name, ranges, labels=labels, cooldown=cooldown,
                                               node_affinity=affinity, network=network)
            self.metrics.pool_writes.labels(op="create").inc()
            log.info("created pool %s (%s)", name, ", ".join(str(r.cidr) for r in ranges))
            return pool, []
        if pool.labels.get(MANAGED_LABEL) != MANAGED_VALUE:
            raise _NotManaged(f"pool {name} exists and was not created by the controller (no label "
                              f"{MANAGED_LABEL}={MANAGED_VALUE}): it is left alone")
        other = self._other_cluster(pool)
        if other is not None:
            raise _NotManaged(f"pool {name} belongs to the controller of cluster {other} (label {CLUSTER_LABEL}; this "
                              f"cluster is {self.cluster}): it is left alone", reason="PoolOfAnotherCluster")
        # A managed pool without the label (made before clusters were told apart) is adopted: the
        # label is written below with the others.
        problems: list[tuple[str, str]] = []
        if pool.network != network:
            problems.append(("NetworkMismatch", f"spec.network {network!r} but the pool is in network "
                                                f"{pool.network!r} (set at creation only)"))
        want_cooldown = cooldown if cooldown is not None else 30.0
        changes: dict[str, Any] = {}
        if dict(pool.labels) != labels:
            changes["labels"] = labels
        if abs(pool.cooldown.total_seconds() - want_cooldown) > 1e-6:
            changes["cooldown"] = want_cooldown
        if str(pool.node_affinity).lower() != affinity:
            changes["node_affinity"] = affinity
        if changes:
            pool = await self.ipam.update_pool(name, **changes)
            self.metrics.pool_writes.labels(op="update").inc()
            log.info("updated pool %s: %s", name, ", ".join(changes))
        have = {r.cidr: r for r in pool.ranges}
        want = {r.cidr: r for r in ranges}
        for cidr, r in want.items():
            if cidr not in have:
                try:
                    pool = await self.ipam.add_pool_range(name, r)
                except (InvalidArgument, FailedPrecondition) as exc:
                    problems.append((_reason(exc), f"adding {cidr}: {exc}"))
                    continue
                self.metrics.pool_writes.labels(op="add-range").inc()
                log.info("pool %s: added range %s", name, cidr)
        for cidr, r in list(have.items()):
            if cidr in want and _same_range(want[cidr], r):
                continue
            try:
                pool = await self.ipam.remove_pool_range(name, cidr)
            except FailedPrecondition as exc:
                what = "changing" if cidr in want else "removing"
                problems.append(("RangeRemovalBlocked", f"{what} {cidr}: {exc}"))
                continue
            self.metrics.pool_writes.labels(op="remove-range").inc()
            log.info("pool %s: removed range %s", name, cidr)
            if cidr in want:  # a changed range: put back its new form
                pool = await self.ipam.add_pool_range(name, want[cidr])
                self.metrics.pool_writes.labels(op="add-range").inc()
                log.info("pool %s: re-added range %s with its new settings", name, cidr)
        return pool, problems

    async def _finalize(self, obj: dict) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        if FINALIZER not in (meta.get("finalizers") or ()):
            return
        force = (meta.get("annotations") or {}).get(FORCE_DELETE, "").lower() == "true"
        try:
            pool = await self.ipam.get_pool(name)
        except PoolNotFound:
            pool = None
        if pool is not None and pool.labels.get(MANAGED_LABEL) == MANAGED_VALUE and self._other_cluster(pool) is None:
            allocated = sum(u.allocated for u in pool.usage)
            if allocated and not force:
                msg = (f"pool {name} still holds {allocated} allocated address(es): the IPPool is deleted once they "
                       f"are released (or annotate it {FORCE_DELETE}=true to delete them with it)")
                await self._write_status(obj, {"Ready": ("False", "DeletionBlocked", msg),
                                               "Synced": ("False", "DeletionBlocked", msg)}, pool)
                return
            try:
                await self.ipam.delete_pool(name, force=force)
            except PoolNotFound:
                pass
            except FailedPrecondition as exc:  # allocated meanwhile
                await self._write_status(obj, {"Ready": ("False", "DeletionBlocked", str(exc)),
                                               "Synced": ("False", "DeletionBlocked", str(exc))}, pool)
                return
            self.metrics.pool_writes.labels(op="delete").inc()
            log.info("deleted pool %s%s", name, " (forced)" if force else "")
        await self._patch_meta(obj, finalizers=[f for f in meta.get("finalizers") or () if f != FINALIZER])

    def _other_cluster(self, pool: Pool) -> str | None:
        """The other cluster whose label the pool carries, or None (this cluster's, or no label)."""
        owner = pool.labels.get(CLUSTER_LABEL)
        return owner if owner and owner != self.cluster else None

    async def _patch_meta(self, obj: dict, *, finalizers: list[str]) -> None:
        meta = obj["metadata"]
        body = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
        updated = await self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, meta["name"], body,
                                                                _content_type=MERGE)
        meta["finalizers"] = finalizers
        meta["resourceVersion"] = updated["metadata"]["resourceVersion"]

    async def _write_status(self, obj: dict, conds: dict[str, tuple[str, str, str]], pool: Pool | None) -> None:
        meta = obj["metadata"]
        old = {c["type"]: c for c in ((obj.get("status") or {}).get("conditions") or ())}
        conditions = []
        for ctype in ("Ready", "Synced"):
            if ctype not in conds:
                continue
            status, reason, message = conds[ctype]
            prev = old.get(ctype)
            since = prev["lastTransitionTime"] if prev and prev.get("status") == status else _now()
            conditions.append({"type": ctype, "status": status, "reason": reason, "message": message[:32000],
                               "observedGeneration": meta.get("generation", 0), "lastTransitionTime": since})
        status: dict[str, Any] = {"observedGeneration": meta.get("generation", 0), "conditions": conditions}
        if pool is not None:
            rows, summary = _usage(pool)
            status["usage"] = rows
            status["ipv4Usage"] = summary.get("ipv4Usage")
            status["ipv6Usage"] = summary.get("ipv6Usage")
        current = obj.get("status") or {}
        if all(current.get(k) == v for k, v in status.items() if k != "lastSyncTime"):
            return  # nothing changed: no write
        status["lastSyncTime"] = _now()
        updated = await self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, meta["name"],
                                                                       {"status": status}, _content_type=MERGE)
        obj["status"] = updated.get("status")
        self.metrics.status_writes.inc()


class _NotManaged(Exception):
    def __init__(self, message: str, *, reason: str = "PoolNotManaged") -> None:
        super().__init__(message)
        self.reason = reason


def _reason(exc: IpamError) -> str:
    words = (exc.reason or type(exc).__name__).replace("_", " ").title().replace(" ", "")
    return words or "Error"
