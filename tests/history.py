"""A history of allocation calls and a checker for it, as Jepsen does it: pure code, no server.

The recorder (:class:`History`) keeps, for every call a client makes, its invocation and completion
on one monotonic clock, the owner, the kind of call, the outcome and the addresses the answer
named. The checker (:func:`check`) then proves two properties from the history and the state read
at the end, or names the calls that break them:

1. **No address is held by two owners over overlapping intervals.** For every owner and every
   address it was ever seen to hold, an interval runs from the earliest invocation of an Allocate
   that could have taken it to the completion of the first call that saw it gone (its release, a
   read that found the owner empty, an Allocate that answered another address), or to the end of
   the history when nothing saw it go. Two owners' intervals for one address must not overlap.
2. **Every acknowledged allocation stays visible until its release.** After an Allocate answered
   addresses R for an owner, every call of that owner that observed its holding before a release
   of that owner could have taken effect (an Allocate, a read, the Release itself) must have seen
   exactly R, and so must the final state when no release followed.

Outcomes. ``ok``: the call was answered; its effect (if any) took place between its invocation
and its completion. ``fail``: a definite refusal (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ABORTED
...): no effect. ``unknown``: the client gave up or lost the connection (DEADLINE_EXCEEDED,
UNAVAILABLE after its retries, CANCELLED, INTERNAL): the call may have taken effect, at any time
from its invocation until ``linger`` seconds after its completion (a server can still finish a
call its client has given up on; ``linger=None`` means at any later time). Unknown Allocates are
treated as possibly taken: when an owner is later seen holding an address, its interval starts at
the earliest such call that could have taken it. Unknown Releases may have freed what the owner
held, so they end the visibility obligation of (2), but never shorten an interval of (1); a
Release acts once, so one that must have acted already (a later call saw the holding gone with no
other Release to thank) excuses no later loss.

Client retries. A client that retries (the SDK does, on UNAVAILABLE and ABORTED) answers a call
with its last attempt, and an earlier attempt that failed ambiguously may have acted: a Release
whose first attempt committed but lost its answer in a failover answers "nothing released" on
its retry. The recorder keeps each attempt's status code (``Op.attempts``); such a Release counts
as the release of what the owner held, not as proof that it held nothing (nor, when an unknown
Allocate of the owner may still have been acting, is a retry that released other addresses).

Soundness. The intervals of (1) are upper bounds of the real holding times, so that a real
double holding always shows. A correct server may still reuse an address soon after its release,
and then two upper bounds can overlap without any fault: the checker relies on the pool's
cooldown, which keeps a released address free for ``cooldown`` seconds. When the longest
Allocate span (invocation of the earliest candidate call to the observation) plus the longest
Release span (invocation of the earliest release that could have freed it to the observation that
it was gone) reach the cooldown, an overlap proves nothing: the report is then *inconclusive*,
which fails too (use a longer cooldown). Each owner's calls must not overlap each other (one
client task per owner, one call at a time, as a CNI runtime does per container); the checker
refuses a history where they do.

Used by tests/integration/test_patroni_failover.py and bench/failover.py; its own tests, with
histories that must fail, are tests/unit/test_history_checker.py.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

ALLOCATE, RELEASE, READ = "allocate", "release", "read"
KINDS = (ALLOCATE, RELEASE, READ)
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
OUTCOMES = (OK, FAIL, UNKNOWN)

# gRPC status codes (names) that are definite refusals: the server did nothing. Any other error
# (UNAVAILABLE after the client's retries, DEADLINE_EXCEEDED, CANCELLED, INTERNAL, UNKNOWN) is an
# unknown outcome.
DEFINITE_FAILURES = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "PERMISSION_DENIED",
    "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
})

INF = math.inf


def outcome_of_code(code: str) -> str:
    """``fail`` for a definite refusal, else ``unknown``."""
    return FAIL if code in DEFINITE_FAILURES else UNKNOWN


@dataclass
class Op:
    """One call: ``addresses`` is what an ``ok`` answer named (Allocate: what the owner holds;
    Release: what was released; read: what the owner holds, empty when it holds nothing)."""

    process: str
    kind: str
    owner: str
    invoke: float
    complete: float = INF
    outcome: str = UNKNOWN
    addresses: frozenset[str] = frozenset()
    error: str = ""
    index: int = 0
    # The status code of every attempt the client made for this call ("OK" for an answer), when
    # known: a client that retries answers with its last attempt, and an earlier attempt that
    # failed ambiguously (UNAVAILABLE, DEADLINE_EXCEEDED ...) may have acted.
    attempts: tuple[str, ...] = ()

    @property
    def earlier_attempt_may_have_acted(self) -> bool:
        """An earlier attempt of this call failed without a definite refusal: it may have taken
        effect, so the answer shows the state after this call's own effect."""
        return any(code not in DEFINITE_FAILURES and code != "OK" for code in self.attempts[:-1])

    def __str__(self) -> str:
        what = sorted(self.addresses) if self.outcome == OK else self.error or self.outcome
        tries = f" after attempts {'/'.join(self.attempts)}" if len(self.attempts) > 1 else ""
        return (f"#{self.index} {self.process} {self.kind}({self.owner}) [{self.invoke:.3f}, {self.complete:.3f}] "
                f"{self.outcome} {what}{tries}")


class History:
    """Thread-safe recorder of :class:`Op` s on one monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.ops: list[Op] = []
        self._lock = threading.Lock()

    def invoke(self, process: str, kind: str, owner: str) -> Op:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
        with self._lock:
            op = Op(process, kind, owner, self.clock(), index=len(self.ops))
            self.ops.append(op)
        return op

    def ok(self, op: Op, addresses: Iterable[str] = (), attempts: Sequence[str] = ()) -> Op:
        op.addresses, op.outcome, op.complete, op.attempts = frozenset(addresses), OK, self.clock(), tuple(attempts)
        return op

    def fail(self, op: Op, error: str) -> Op:
        op.outcome, op.error, op.complete = FAIL, error, self.clock()
        return op

    def unknown(self, op: Op, error: str) -> Op:
        op.outcome, op.error, op.complete = UNKNOWN, error, self.clock()
        return op

    def error(self, op: Op, code: str, message: str = "", attempts: Sequence[str] = ()) -> Op:
        """Records an error answer by its gRPC status code name: a definite refusal (``fail``) only
        when no earlier attempt may have acted, else an unknown outcome."""
        op.attempts = tuple(attempts)
        outcome = outcome_of_code(code)
        if outcome == FAIL and op.earlier_attempt_may_have_acted:
            outcome = UNKNOWN
        op.outcome, op.error, op.complete = outcome, f"{code} {message}".strip(), self.clock()
        return op

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)


@dataclass(frozen=True)
class Interval:
    owner: str
    address: str
    start: float
    end: float
    first_seen: Op | None  # the call (None: the final state) that first showed the owner holding it
    gone_seen: Op | None  # the call that first showed it gone (None: held at the end / final state)

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass
class Report:
    ops: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # "allocate ok" -> n ...
    intervals: list[Interval] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    max_allocate_span: float = 0.0
    max_release_span: float = 0.0
    cooldown: float | None = None
    inconclusive: str = ""

    @property
    def valid(self) -> bool:
        return not self.violations and not self.inconclusive

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"{self.ops} calls ({counts}); {len(self.intervals)} holding intervals; spans: allocate "
                f"{self.max_allocate_span:.2f}s, release {self.max_release_span:.2f}s"
                + (f" (cooldown {self.cooldown:g}s)" if self.cooldown is not None else "")
                + f"; {len(self.violations)} violations" + (f"; INCONCLUSIVE: {self.inconclusive}"
                                                            if self.inconclusive else ""))

    def assert_valid(self) -> None:
        if not self.valid:
            shown = "\n".join(self.violations[:10])
            more = f"\n... and {len(self.violations) - 10} more" if len(self.violations) > 10 else ""
            raise AssertionError(f"history check failed: {self.summary()}\n{shown}{more}")


def _window_end(op: Op, linger: float | None) -> float:
    """The latest time ``op`` may take effect."""
    if op.outcome == OK:
        return op.complete
    if op.outcome == FAIL:
        return -INF
    if linger is None or op.complete == INF:
        return INF
    return op.complete + linger


@dataclass
class _Obs:
    """An observation of an owner's holding: ``held`` at some point in [op.invoke, at]."""

    op: Op | None  # None: the final state
    inv: float
    at: float
    held: frozenset[str]


def check(ops: Sequence[Op], final: Mapping[str, Iterable[str]], *, final_time: float | None = None,
          cooldown: float | None = None, linger: float | None = None) -> Report:
    """Checks a history (see the module's doc). ``final``: owner -> addresses it holds in the state
    read after every call completed (owners holding nothing may be left out), read at
    ``final_time`` (default: after the last completion). ``cooldown``: the pool's cooldown in
    seconds on the history's clock (None: no reuse argument, intervals are compared as they are).
    Raises ValueError for a history it cannot judge (an owner's calls overlap)."""
    report = Report(ops=len(ops), cooldown=cooldown)
    for op in ops:
        if op.kind not in KINDS or op.outcome not in OUTCOMES:
            raise ValueError(f"not a call of this model: {op}")
        key = f"{op.kind} {op.outcome}"
        report.counts[key] = report.counts.get(key, 0) + 1
    done = [op.complete for op in ops if op.complete != INF]
    end_time = final_time if final_time is not None else (max(done) if done else 0.0) + 1e-6
    final_sets = {o: frozenset(a) for o, a in final.items()}
    by_owner: dict[str, list[Op]] = {}
    for op in ops:
        by_owner.setdefault(op.owner, []).append(op)
    for owner in final_sets:
        by_owner.setdefault(owner, [])
    for owner, owner_ops in by_owner.items():
        owner_ops.sort(key=lambda o: (o.invoke, o.index))
        for prev, nxt in zip(owner_ops, owner_ops[1:], strict=False):
            if nxt.invoke < prev.complete:
                raise ValueError(f"owner {owner!r}: calls overlap ({prev} and {nxt}); the checker needs one call "
                                 "at a time per owner")
        _check_owner(owner, owner_ops, final_sets.get(owner, frozenset()), end_time, linger, report)
    _check_overlaps(report)
    if report.violations and cooldown is not None and report.max_allocate_span + report.max_release_span >= cooldown:
        report.inconclusive = (f"the longest allocate span ({report.max_allocate_span:.2f}s) plus the longest release "
                               f"span ({report.max_release_span:.2f}s) reach the pool's cooldown ({cooldown:g}s): an "
                               "overlap may be a legitimate reuse; run with a longer cooldown")
    return report


def _observations(ops: list[Op], final: frozenset[str], end_time: float) -> list[_Obs]:
    out = []
    for op in ops:
        if op.outcome != OK:
            continue
        if op.kind == RELEASE:
            # Just before its effect the owner held what it released; after it, nothing. A Release
            # that answered "nothing" after an attempt that may have acted shows only the after-state:
            # that attempt may have released what the owner held.
            if op.addresses or not op.earlier_attempt_may_have_acted:
                out.append(_Obs(op, op.invoke, op.complete, op.addresses))
            out.append(_Obs(op, op.invoke, op.complete, frozenset()))
        else:
            out.append(_Obs(op, op.invoke, op.complete, op.addresses))
    out.append(_Obs(None, end_time, end_time, final))
    return out


def _check_owner(owner: str, ops: list[Op], final: frozenset[str], end_time: float, linger: float | None,
                 report: Report) -> None:
    obs = _observations(ops, final, end_time)
    allocates = [op for op in ops if op.kind == ALLOCATE and op.outcome != FAIL]
    releases = [op for op in ops if op.kind == RELEASE and op.outcome != FAIL]

    # (1) Intervals: per address, episodes of consecutive observations holding it.
    addresses = sorted({a for o in obs for a in o.held})
    for address in addresses:
        i = 0
        while i < len(obs):
            if address not in obs[i].held:
                i += 1
                continue
            first = obs[i]
            last_without = next((obs[j] for j in range(i - 1, -1, -1) if address not in obs[j].held), None)
            j = i
            while j + 1 < len(obs) and address in obs[j + 1].held:
                j += 1
            last = obs[j]
            gone = obs[j + 1] if j + 1 < len(obs) else None
            # The allocate that took it was invoked before the first sight and could still take
            # effect after the last sight of the owner without it.
            floor = last_without.inv if last_without is not None else -INF
            candidates = [op for op in allocates if op.invoke <= first.at and _window_end(op, linger) >= floor]
            if not candidates:
                report.violations.append(
                    f"owner {owner!r} was seen holding {address} ({_who(first)}) without any Allocate that could "
                    "have taken it")
                start = first.inv
            else:
                start = min(op.invoke for op in candidates)
            end = gone.at if gone is not None else INF
            report.max_allocate_span = max(report.max_allocate_span, first.at - start)
            if gone is not None and gone.op is not None:
                could_free = [op for op in releases if op.invoke <= gone.at and _window_end(op, linger) >= last.inv]
                if could_free:
                    report.max_release_span = max(report.max_release_span, gone.at - min(op.invoke for op in could_free))
            report.intervals.append(Interval(owner, address, start, end, first.op, gone.op if gone else None))
            i = j + 1

    # (2) Visibility of every acknowledged allocation until a release could have taken effect.
    acted_by = _unknown_releases_acted(ops, linger)
    for ack in ops:
        if ack.kind != ALLOCATE or ack.outcome != OK:
            continue
        # The earliest moment a release may have taken effect: the invocation of the first release
        # after the answer, or of an unknown one from before that may still have been acting.
        later = [op for op in releases if op.invoke >= ack.complete]
        lingering = [op for op in releases if op.invoke < ack.complete and op.outcome == UNKNOWN
                     and acted_by.get(op.index, _window_end(op, linger)) >= ack.invoke]
        release_from = min((op.invoke for op in later + lingering), default=INF)
        for op in ops:
            if op.invoke < ack.complete or op.outcome != OK:
                continue
            if op.kind == RELEASE:
                retried_away = not op.addresses and op.earlier_attempt_may_have_acted
                # Its first attempt may have freed the acknowledged addresses, and an unknown
                # Allocate still acting may have taken others, which the retry released.
                refilled = op.earlier_attempt_may_have_acted and any(
                    a.outcome == UNKNOWN and a.invoke < op.complete and _window_end(a, linger) >= op.invoke
                    for a in allocates)
                if (op.invoke == release_from and not lingering and op.addresses != ack.addresses
                        and not retried_away and not refilled):
                    report.violations.append(
                        f"owner {owner!r}: Allocate acknowledged {sorted(ack.addresses)} ({ack}) but its Release "
                        f"released {sorted(op.addresses)} ({op})" + _lost(op.addresses))
                break
            if op.complete > release_from:
                break
            if op.addresses != ack.addresses:
                report.violations.append(
                    f"owner {owner!r}: Allocate acknowledged {sorted(ack.addresses)} ({ack}) but before any Release "
                    f"{op} saw {sorted(op.addresses)}" + _lost(op.addresses))
                break
        else:
            if release_from == INF and final != ack.addresses:
                report.violations.append(
                    f"owner {owner!r}: Allocate acknowledged {sorted(ack.addresses)} ({ack}) and no Release "
                    f"followed, but the final state holds {sorted(final)}" + _lost(final))


def _unknown_releases_acted(ops: list[Op], linger: float | None) -> dict[int, float]:
    """For an unknown Release invoked while the owner held something (the call before it answered
    addresses), the time by which it must have acted: the completion of the first later call that
    saw the holding gone (nothing, or other addresses), when no other Release could have freed it
    meanwhile.
    A Release acts once: after that it cannot free a later allocation too. (Had the holding been
    lost instead, that loss is a fault all the same.)"""
    acted_by: dict[int, float] = {}
    for i, u in enumerate(ops):
        if u.kind != RELEASE or u.outcome != UNKNOWN or i == 0:
            continue
        prev = ops[i - 1]
        if prev.outcome != OK or prev.kind == RELEASE or not prev.addresses:
            continue
        # An earlier Release still acting after that call's observation may have freed it first.
        if any(op.kind == RELEASE and op.outcome != FAIL and op.invoke < u.invoke
               and acted_by.get(op.index, _window_end(op, linger)) >= prev.invoke for op in ops[:i]):
            continue
        for op in ops[i + 1:]:
            if op.outcome == FAIL or op.kind != RELEASE and op.outcome == UNKNOWN:
                continue  # no effect, or at most an Allocate's: it frees nothing
            if op.outcome != OK:
                break  # another unknown Release may have freed it
            if op.kind == RELEASE and (op.addresses or op.earlier_attempt_may_have_acted):
                break  # this Release (or its first attempt) may have freed it
            if op.kind != RELEASE and op.addresses == prev.addresses:
                continue  # still held: the unknown Release has not acted yet
            acted_by[u.index] = min(op.complete, _window_end(u, linger))
            break
    return acted_by


def _lost(seen: frozenset[str]) -> str:
    return ": the acknowledged allocation was lost" if not seen else ": the allocation changed without a release"


def _who(o: _Obs) -> str:
    return str(o.op) if o.op is not None else "the final state"


def _check_overlaps(report: Report) -> None:
    by_address: dict[str, list[Interval]] = {}
    for iv in report.intervals:
        by_address.setdefault(iv.address, []).append(iv)
    for address, ivs in by_address.items():
        ivs.sort(key=lambda iv: iv.start)
        for a_i, a in enumerate(ivs):
            for b in ivs[a_i + 1:]:
                if a.owner != b.owner and a.overlaps(b):
                    report.violations.append(
                        f"address {address} held by {a.owner!r} over [{a.start:.3f}, {a.end:.3f}] "
                        f"(seen by {a.first_seen or 'the final state'}, gone by {a.gone_seen or 'never'}) and by "
                        f"{b.owner!r} over [{b.start:.3f}, {b.end:.3f}] (seen by {b.first_seen or 'the final state'})")


def final_holdings(allocations: Iterable[tuple[str, Iterable[str]]]) -> dict[str, frozenset[str]]:
    """owner -> addresses from (owner, addresses) pairs, refusing an owner listed twice."""
    out: dict[str, frozenset[str]] = {}
    for owner, addrs in allocations:
        if owner in out:
            raise ValueError(f"owner {owner!r} listed twice in the final state")
        out[owner] = frozenset(addrs)
    return out


def windows(ops: Sequence[Op], fault_at: float, kind: str = ALLOCATE, until: float = INF) -> dict[str, float]:
    """Figures of one fault from the history: ``first_ok``, from ``fault_at`` to the completion of
    the first ``ok`` call of ``kind`` invoked after it; ``gap``, the longest time between two
    consecutive ``ok`` completions of ``kind`` from the last one before ``fault_at`` until ``until``
    (the unavailability window as the clients saw it, whenever it began after the fault)."""
    after = sorted(op.complete for op in ops if op.kind == kind and op.outcome == OK and op.invoke >= fault_at)
    first_ok = after[0] - fault_at if after else INF
    done = sorted(op.complete for op in ops if op.kind == kind and op.outcome == OK and op.complete <= until)
    before = [t for t in done if t <= fault_at]
    times = before[-1:] + [t for t in done if t > fault_at]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    gap = max(gaps) if gaps and before else INF
    return {"first_ok": first_ok, "gap": gap}
