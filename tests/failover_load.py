"""Allocation load from the SDK for fault runs, recorded as a history (tests/history.py), and a
health recorder. Used by tests/integration/test_patroni_failover.py and bench/failover.py.

:class:`AllocLoad` runs ``tasks`` asyncio tasks in a thread of its own (so that a test can inject
faults with blocking calls meanwhile), each with its own owners and one call at a time: an owner
believed to hold nothing is allocated (a dual-stack pair), one believed to hold a pair is released
or read (GetAllocation), and one whose last call had an unknown outcome gets that call again,
until an answer says what it holds. Every call goes through the SDK's ``AsyncIpamClient`` with its
default retry policy (UNAVAILABLE and ABORTED retried with backoff until the call's deadline) and
is recorded with its invocation, completion, outcome and addresses. :meth:`AllocLoad.stop` then
settles every owner whose state is unknown (calls again until answered), so that the history ends
with every holding confirmed by an answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from history import ALLOCATE, OK, READ, RELEASE, UNKNOWN, History, Op

from dsipam.client import AllocationNotFound, AsyncIpamClient, IpamClient, IpamError

# The attempts of the call being made in this task: the interceptor appends each one's status code.
_ATTEMPTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("attempts", default=None)


class AttemptRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Sees every attempt the SDK makes (its retries included) and notes its status code in the
    calling task's list, so that the history knows when an answer came after an attempt that
    may have acted (tests/history.py, "Client retries")."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        codes = _ATTEMPTS.get()
        if codes is not None:
            try:
                code = await call.code()
                codes.append(code.name)
            except asyncio.CancelledError:
                codes.append("CANCELLED")
                raise
        return call


@dataclass
class _Owner:
    name: str
    state: str = "free"  # free, held, or the kind of the call whose outcome is unknown
    addresses: frozenset[str] = frozenset()


@dataclass
class LoadStats:
    codes: Counter = field(default_factory=Counter)  # final error codes of calls that failed or were unknown
    bugs: list[str] = field(default_factory=list)  # anything that is not an SDK answer or error
    retried: Counter = field(default_factory=Counter)  # calls answered after more than one attempt, by kind


class AllocLoad:
    def __init__(self, target: str, history: History, pool: str, *, tasks: int = 6, owners: int = 12,
                 timeout: float = 8.0, read_share: float = 0.2, prefix: str = "", seed: int = 1,
                 pause: float = 0.0) -> None:
        self.target, self.history, self.pool = target, history, pool
        self.tasks, self.timeout, self.read_share, self.pause = tasks, timeout, read_share, pause
        self.owners = [[_Owner(f"{prefix}t{t}/o{i}") for i in range(owners)] for t in range(tasks)]
        self.rngs = [random.Random(seed * 1000 + t) for t in range(tasks)]
        self.stats = LoadStats()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.settle_timeout = 120.0

    # -- control (from the test's thread) ----------------------------------------------------

    def start(self) -> AllocLoad:
        self._thread = threading.Thread(target=self._run, name="alloc-load", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("load did not start")
        return self

    def stop(self, timeout: float = 180.0) -> LoadStats:
        """Stops the tasks after their current call, settles unknown owners, returns the stats."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("the load did not stop (a call hung past its deadline?)")
        if self._error is not None:
            raise RuntimeError(f"load failed: {self._error!r}") from self._error
        return self.stats

    def ok_count(self, kind: str = ALLOCATE, since: float = 0.0) -> int:
        return sum(1 for op in self.history.snapshot()
                   if op.kind == kind and op.outcome == OK and op.complete >= since)

    def wait_ok(self, count: int, kind: str = ALLOCATE, since: float = 0.0, timeout: float = 60.0) -> None:
        """Until ``count`` calls of ``kind`` answered ok since ``since`` (history clock)."""
        deadline = time.monotonic() + timeout
        while self.ok_count(kind, since) < count:
            if self._error is not None or self.stats.bugs:
                raise RuntimeError(f"load failed: {self._error!r} {self.stats.bugs[:3]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.ok_count(kind, since)} of {count} {kind} answered ok; "
                                   f"codes {dict(self.stats.codes)}")
            time.sleep(0.05)

    # -- the load (in its thread) ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with AsyncIpamClient(self.target, timeout=self.timeout, interceptors=[AttemptRecorder()]) as client:
            self._ready.set()
            await asyncio.gather(*(self._task(client, t) for t in range(self.tasks)))
            await asyncio.wait_for(
                asyncio.gather(*(self._settle(client, t) for t in range(self.tasks))), self.settle_timeout)

    async def _task(self, client: AsyncIpamClient, t: int) -> None:
        assert self._stop is not None
        rng = self.rngs[t]
        while not self._stop.is_set():
            owner = rng.choice(self.owners[t])
            if owner.state == "free":
                kind = ALLOCATE
            elif owner.state == "held":
                kind = READ if rng.random() < self.read_share else RELEASE
            else:
                kind = owner.state
            await self._call(client, f"t{t}", owner, kind)
            if self.pause:
                await asyncio.sleep(self.pause)

    async def _settle(self, client: AsyncIpamClient, t: int) -> None:
        for owner in self.owners[t]:
            while owner.state not in ("free", "held"):
                await self._call(client, f"t{t}", owner, owner.state)

    async def _call(self, client: AsyncIpamClient, process: str, owner: _Owner, kind: str) -> Op:
        h = self.history
        op = h.invoke(process, kind, owner.name)
        attempts: list[str] = []
        token = _ATTEMPTS.set(attempts)
        try:
            if kind == ALLOCATE:
                res = await client.allocate(self.pool, owner.name, policy="require")
                got = frozenset(str(a.ip) for a in res.allocation.addresses)
                h.ok(op, got, attempts)
                owner.state, owner.addresses = "held", got
            elif kind == RELEASE:
                released = await client.release(self.pool, owner.name)
                h.ok(op, (str(a.ip) for a in released), attempts)
                owner.state, owner.addresses = "free", frozenset()
            else:
                try:
                    alloc = await client.get_allocation(self.pool, owner.name)
                    got = frozenset(str(a.ip) for a in alloc.addresses)
                except AllocationNotFound:
                    got = frozenset()
                    attempts[-1:] = ["OK"]  # NOT_FOUND is this read's answer
                h.ok(op, got, attempts)
                owner.state, owner.addresses = ("held" if got else "free"), got
        except IpamError as exc:
            h.error(op, exc.code.name, exc.message[:200], attempts)
            self.stats.codes[exc.code.name] += 1
            if op.outcome == UNKNOWN and kind != READ:
                owner.state = kind  # ask again until answered
        except Exception as exc:  # noqa: BLE001 - not an SDK answer: a bug of the SDK or of this load
            h.unknown(op, repr(exc)[:200])
            self.stats.bugs.append(f"{op}: {exc!r}")
            if kind != READ:
                owner.state = kind
        finally:
            _ATTEMPTS.reset(token)
        if len(attempts) > 1:
            self.stats.retried[kind] += 1
        return op


def final_state(target: str, pool: str, timeout: float = 60.0) -> dict[str, frozenset[str]]:
    """Every allocation of ``pool`` (owner -> addresses), read through the SDK (retrying UNAVAILABLE)."""
    out: dict[str, frozenset[str]] = {}
    with IpamClient(target, timeout=timeout) as client:
        for alloc in client.iter_allocations(pool, page_size=1000):
            if alloc.owner in out:
                raise AssertionError(f"owner {alloc.owner!r} listed twice")
            out[alloc.owner] = frozenset(str(a.ip) for a in alloc.addresses)
    return out


class HealthRecorder:
    """Polls the server's gRPC health ("") every ``interval`` seconds in a thread and keeps each
    change as (monotonic time, status name)."""

    def __init__(self, target: str, interval: float = 0.1) -> None:
        self.target, self.interval = target, interval
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    def start(self) -> HealthRecorder:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.changes

    def status(self) -> str:
        return self.changes[-1][1] if self.changes else "?"

    def wait(self, status: str, since: float = 0.0, timeout: float = 60.0) -> float:
        """Until a change to ``status`` at or after ``since``; returns its time."""
        deadline = time.monotonic() + timeout
        while True:
            for when, s in list(self.changes):
                if s == status and when >= since:
                    return when
            if time.monotonic() > deadline:
                raise TimeoutError(f"health never {status} since {since:.3f}: {self.changes[-6:]}")
            time.sleep(0.05)

    def _run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self._stop.is_set():
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as exc:
                    status = f"error {exc.code().name}"
                if not self.changes or self.changes[-1][1] != status:
                    self.changes.append((time.monotonic(), status))
                self._stop.wait(self.interval)
