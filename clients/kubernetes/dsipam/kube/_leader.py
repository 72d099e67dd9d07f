"""Leader election with a coordination.k8s.io/v1 Lease.

One replica holds the Lease and acts; the others poll it every ``retry`` seconds and take it once
its holder has not renewed it for ``duration`` seconds, as measured by their own monotonic clock
from when they saw it change last (not renewTime against their wall clock: clock skew between
nodes never lets a standby take a Lease that is being renewed).
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


def describe_failure(exc: BaseException, namespace: str) -> str:
    """One line for a failed Lease call (never the HTTP headers and body an ApiException prints)."""
    if isinstance(exc, ApiException):
        if exc.status == 403:
            return f"forbidden in namespace {namespace} (set --namespace to the Role's namespace)"
        if exc.status == 401:
            return "unauthorized (the API server rejects the kubeconfig's or ServiceAccount's credentials)"
        return f"HTTP {exc.status} {(exc.reason or '').strip()}".strip()
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, metrics: Metrics, *,
                 duration: float = 15.0, renew_deadline: float = 10.0, retry: float = 2.0,
                 release_timeout: float = 5.0) -> None:
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
        self.release_timeout = release_timeout
        self.is_leader = False
        self.last_renew = 0.0  # monotonic time of the last successful acquire/renew
        # Another holder's Lease as last read (its resourceVersion) and the monotonic time it was
        # first seen so: the Lease expires ``duration`` after it stopped changing, by this replica's
        # clock (client-go's observedTime), never by comparing the holder's renewTime with this clock.
        self._observed: str | None = None
        self._observed_at = 0.0
        # The failure last logged and how often it repeated since (repeats are counted, not logged)
        self._failure: str | None = None
        self._repeats = 0

    def _failed(self, what: str, exc: BaseException) -> None:
        """Counts a failed Lease call; logs it at ERROR only when it differs from the last one."""
        self.metrics.lease_failures.inc()
        text = f"{what}{describe_failure(exc, self.namespace)}"
        if text == self._failure:
            self._repeats += 1
            log.debug("lease %s/%s: %s (again, %d repeat(s))", self.namespace, self.name, text, self._repeats)
            return
        self._failure, self._repeats = text, 0
        log.error("lease %s/%s: %s (retried every %gs; repeats counted in dsipam_controller_lease_failures_total, "
                  "logged again when the error changes)", self.namespace, self.name, text, self.retry)

    def _recovered(self) -> None:
        if self._failure is not None:
            log.info("lease %s/%s: the API server answers again (after %d repeat(s) of: %s)", self.namespace,
                     self.name, self._repeats, self._failure)
            self._failure, self._repeats = None, 0

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
            duration = spec.lease_duration_seconds or self.duration
            record = f"{spec.holder_identity}@{lease.metadata.resource_version}"
            if record != self._observed:
                self._observed, self._observed_at = record, time.monotonic()
            if time.monotonic() < self._observed_at + duration:
                return False  # held, and renewed within the last lease duration (as this replica saw it)
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
                acquired = await self.try_acquire_or_renew()
                self._recovered()
                if acquired:
                    self.is_leader = True
                    self.last_renew = time.monotonic()
                    self.metrics.leader.set(1)
                    self.metrics.leader_transitions.inc()
                    log.info("acquired the lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
            except Exception as exc:  # noqa: BLE001 - API server unreachable: counted, logged, tried again
                self._failed("", exc)
            await asyncio.sleep(self.retry)

    async def keep(self) -> None:
        """Renews the Lease; returns when it could not be renewed for ``renew_deadline`` seconds or
        another replica holds it (leadership lost: the caller stops acting)."""
        while True:
            await asyncio.sleep(self.retry)
            try:
                renewed = await self.try_acquire_or_renew()
                self._recovered()
                if renewed:
                    self.last_renew = time.monotonic()
                    continue
                log.error("lease %s/%s is held by another replica: leadership lost", self.namespace, self.name)
                break
            except Exception as exc:  # noqa: BLE001 - counted, logged, retried until the renew deadline
                self._failed("renew failed: ", exc)
            if time.monotonic() - self.last_renew > self.renew_deadline:
                log.error("lease %s/%s not renewed for %.0fs: leadership lost", self.namespace, self.name,
                          self.renew_deadline)
                break
        self.is_leader = False
        self.metrics.leader.set(0)

    async def release(self) -> None:
        """Gives the Lease up (clean shutdown): a successor need not wait for it to expire. Bounded by
        ``release_timeout``: an API server that does not answer never holds the shutdown up."""
        if not self.is_leader:
            return
        self.is_leader = False
        self.metrics.leader.set(0)
        try:
            await asyncio.wait_for(self._give_up(), self.release_timeout)
        except TimeoutError:
            self.metrics.lease_failures.inc()
            log.error("lease %s/%s not released: the API server did not answer within %gs (--release-timeout); "
                      "it expires on its own %gs after its last renewal", self.namespace, self.name,
                      self.release_timeout, self.duration)
        except Exception as exc:  # noqa: BLE001 - it expires on its own; counted
            self.metrics.lease_failures.inc()
            log.error("lease %s/%s not released: %s", self.namespace, self.name,
                      describe_failure(exc, self.namespace))

    async def _give_up(self) -> None:
        lease = await self.coord.read_namespaced_lease(self.name, self.namespace)
        if lease.spec is not None and lease.spec.holder_identity == self.identity:
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            lease.spec.acquire_time = None
            await self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released the lease %s/%s", self.namespace, self.name)
