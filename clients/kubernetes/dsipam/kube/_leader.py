"""Leader election with a coordination.k8s.io/v1 Lease.

One replica holds the Lease and acts; the others poll it every ``retry`` seconds and take it once
its holder has not renewed it for ``duration`` seconds (renewTime + leaseDurationSeconds is past).
Every write is a replace with the resourceVersion that was read, so two candidates never both win.
A holder that cannot renew for ``renew_deadline`` (< ``duration``) seconds stops acting before
anyone else may start; on a clean shutdown it gives the Lease up so that a successor starts at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from ._metrics import Metrics

log = logging.getLogger("dsipam.kube")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, metrics: Metrics, *,
                 duration: float = 15.0, renew_deadline: float = 10.0, retry: float = 2.0) -> None:
        if not 0 < retry < renew_deadline < duration:
            raise ValueError("lease: need 0 < retry interval < renew deadline < lease duration")
        self.coord = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.metrics = metrics
        self.duration = duration
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.is_leader = False
        self.last_renew = 0.0  # monotonic time of the last successful acquire/renew

    def _spec(self, old: Any | None) -> client.V1LeaseSpec:
        now = _now()
        same = old is not None and old.holder_identity == self.identity
        transitions = (old.lease_transitions or 0) if old is not None else 0
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, int(round(self.duration))),
            acquire_time=old.acquire_time if same else now,
            renew_time=now,
            lease_transitions=transitions if same or old is None or not old.holder_identity else transitions + 1,
        )

    async def try_acquire_or_renew(self) -> bool:
        try:
            lease = await self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=self._spec(None))
            try:
                await self.coord.create_namespaced_lease(self.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        if spec.holder_identity and spec.holder_identity != self.identity:
            renewed = spec.renew_time or spec.acquire_time
            duration = spec.lease_duration_seconds or self.duration
            if renewed is not None and _now() < renewed + dt.timedelta(seconds=duration):
                return False  # held, and not expired
        lease.spec = self._spec(spec)
        try:
            await self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it first
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Returns once this replica holds the Lease."""
        log.info("waiting for the lease %s/%s as %s", self.namespace, self.name, self.identity)
        while True:
            try:
                if await self.try_acquire_or_renew():
                    self.is_leader = True
                    self.last_renew = time.monotonic()
                    self.metrics.leader.set(1)
                    self.metrics.leader_transitions.inc()
                    log.info("acquired the lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
            except Exception as exc:  # noqa: BLE001 - API server unreachable: counted, logged, tried again
                self.metrics.lease_failures.inc()
                log.error("lease %s/%s: %s: %s", self.namespace, self.name, type(exc).__name__, exc)
            await asyncio.sleep(self.retry)

    async def keep(self) -> None:
        """Renews the Lease; returns when it could not be renewed for ``renew_deadline`` seconds or
        another replica holds it (leadership lost: the caller stops acting)."""
        while True:
            await asyncio.sleep(self.retry)
            try:
                if await self.try_acquire_or_renew():
                    self.last_renew = time.monotonic()
                    continue
                log.error("lease %s/%s is held by another replica: leadership lost", self.namespace, self.name)
                break
            except Exception as exc:  # noqa: BLE001 - counted, logged, retried until the renew deadline
                self.metrics.lease_failures.inc()
                log.error("lease %s/%s renew failed: %s: %s", self.namespace, self.name, type(exc).__name__, exc)
            if time.monotonic() - self.last_renew > self.renew_deadline:
                log.error("lease %s/%s not renewed for %.0fs: leadership lost", self.namespace, self.name,
                          self.renew_deadline)
                break
        self.is_leader = False
        self.metrics.leader.set(0)

    async def release(self) -> None:
        """Gives the Lease up (clean shutdown): a successor need not wait for it to expire."""
        if not self.is_leader:
            return
        self.is_leader = False
        self.metrics.leader.set(0)
        try:
            lease = await self.coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                lease.spec.acquire_time = None
                await self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("released the lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001 - it expires on its own; counted
            self.metrics.lease_failures.inc()
            log.error("lease %s/%s not released: %s: %s", self.namespace, self.name, type(exc).__name__, exc)
