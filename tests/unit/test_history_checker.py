"""The history checker (tests/history.py): histories that must fail, histories that must pass,
and histories made by a simulated allocator, correct or faulty (hypothesis)."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from history import (  # noqa: E402
    ALLOCATE,
    FAIL,
    INF,
    OK,
    READ,
    RELEASE,
    UNKNOWN,
    History,
    Op,
    check,
    final_holdings,
    outcome_of_code,
    windows,
)


class Builder:
    """Writes histories by hand: ``b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")``."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def op(self, process: str, kind: str, owner: str, invoke: float, complete: float, outcome: str = OK,
           *addresses: str) -> Op:
        op = Op(process, kind, owner, invoke, complete, outcome, frozenset(addresses), index=len(self.ops))
        self.ops.append(op)
        return op


def verdict(b: Builder, final: dict[str, tuple[str, ...]], **kw: float | None):  # type: ignore[no-untyped-def]
    return check(b.ops, {o: frozenset(a) for o, a in final.items()}, **kw)


# -- histories that must pass ---------------------------------------------------------------------


def test_allocate_release_passes():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "198.18.0.1", "fd00::1")
    b.op("p1", READ, "o1", 2, 3, OK, "198.18.0.1", "fd00::1")
    b.op("p1", ALLOCATE, "o1", 4, 5, OK, "198.18.0.1", "fd00::1")  # idempotent: same pair
    b.op("p1", RELEASE, "o1", 6, 7, OK, "198.18.0.1", "fd00::1")
    b.op("p2", ALLOCATE, "o2", 0.5, 1.5, OK, "198.18.0.2", "fd00::2")
    report = verdict(b, {"o2": ("198.18.0.2", "fd00::2")}, cooldown=30)
    report.assert_valid()
    assert len(report.intervals) == 4
    assert report.counts == {"allocate ok": 3, "read ok": 1, "release ok": 1}


def test_reuse_after_release_passes_when_the_intervals_do_not_overlap():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 3, OK, "a")
    b.op("p2", ALLOCATE, "o2", 40, 41, OK, "a")  # after the release and its cooldown
    verdict(b, {"o2": ("a",)}, cooldown=30).assert_valid()


def test_unknown_release_then_an_empty_release_passes():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 10, UNKNOWN)  # timed out; it had released
    b.op("p1", RELEASE, "o1", 11, 12, OK)  # releases nothing: the first one did
    verdict(b, {}).assert_valid()


def test_unknown_allocate_learned_later_passes():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 8, UNKNOWN)
    b.op("p1", ALLOCATE, "o1", 9, 10, OK, "a")  # created=False: the first one had taken it
    verdict(b, {"o1": ("a",)}).assert_valid()


def test_retried_release_that_finds_nothing_is_the_release():
    # Its first attempt released "a" and lost its answer in a failover; the retry found nothing.
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 5, OK).attempts = ("UNAVAILABLE", "OK")
    report = verdict(b, {})
    report.assert_valid()
    assert [(iv.start, iv.end) for iv in report.intervals] == [(0, 5)]
    # A retry after a definite refusal proves nothing acted before it: then "nothing" is a loss.
    b.ops[1].attempts = ("ABORTED", "OK")
    assert any("its Release released []" in v for v in verdict(b, {}).violations)


def test_retried_release_may_release_what_a_lingering_allocate_took():
    # The Release's first attempt freed "a" and lost its answer; the timed-out Allocate, still
    # acting, took "b"; the retry released "b". (Found by the simulator: a false alarm before.)
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", ALLOCATE, "o1", 2, 3, UNKNOWN)
    b.op("p1", RELEASE, "o1", 4, 8, OK, "b").attempts = ("UNAVAILABLE", "OK")
    verdict(b, {}, cooldown=900, linger=2.0).assert_valid()
    # Without an Allocate that could still act, a Release answering other addresses is a fault.
    report = verdict(b, {}, cooldown=900, linger=0.5)
    assert any("its Release released ['b']" in v for v in report.violations), report.violations
    b.ops[2].attempts = ("OK",)
    report = verdict(b, {}, cooldown=900, linger=2.0)
    assert any("its Release released ['b']" in v for v in report.violations), report.violations


def test_failed_calls_take_no_part():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, FAIL)  # RESOURCE_EXHAUSTED: nothing taken
    b.op("p1", RELEASE, "o1", 2, 3, FAIL)
    b.op("p1", ALLOCATE, "o1", 4, 5, OK, "a")
    report = verdict(b, {"o1": ("a",)})
    report.assert_valid()
    assert [(iv.start, iv.end) for iv in report.intervals] == [(4, INF)]


def test_lingering_unknown_release_may_free_a_later_acknowledged_allocation():
    # The unknown Release may still have been acting after the second (idempotent) Allocate
    # answered: a server finishes calls whose clients gave up. Without a bound that is allowed ...
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 3, UNKNOWN)
    b.op("p1", ALLOCATE, "o1", 4, 5, OK, "a")
    b.op("p1", READ, "o1", 9, 10, OK)
    verdict(b, {}).assert_valid()
    # ... but not when calls stop acting half a second after their clients give up.
    report = verdict(b, {}, linger=0.5)
    assert not report.valid
    assert any("before any Release" in v and "was lost" in v for v in report.violations), report.violations


# -- histories that must fail ---------------------------------------------------------------------


def test_acknowledged_allocation_missing_from_the_final_state_fails():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a", "fd00::1")
    report = verdict(b, {})
    assert not report.valid
    assert any("no Release followed" in v and "was lost" in v for v in report.violations), report.violations


def test_lost_allocation_given_to_another_owner_fails_twice():
    # The failover lost o1's acknowledged allocation; the new primary handed "a" to o2.
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p2", ALLOCATE, "o2", 5, 6, OK, "a")
    report = verdict(b, {"o2": ("a",)}, cooldown=30)
    assert not report.valid and not report.inconclusive
    assert any("address a held by 'o1'" in v and "'o2'" in v for v in report.violations), report.violations
    assert any("'o1'" in v and "was lost" in v for v in report.violations), report.violations


def test_address_held_twice_at_the_end_fails():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p2", ALLOCATE, "o2", 2, 3, OK, "a")
    report = verdict(b, {"o1": ("a",), "o2": ("a",)})
    assert [v for v in report.violations if v.startswith("address a")], report.violations


def test_unknown_allocate_counts_as_possibly_taken():
    # o2 held "a" until 0.6; o1's Allocate that timed out was invoked at 0.4 and o1 turned out to
    # hold "a": it may have taken "a" while o2 still held it.
    b = Builder()
    b.op("p2", ALLOCATE, "o2", 0.2, 0.3, OK, "a")
    b.op("p2", RELEASE, "o2", 0.5, 0.6, OK, "a")
    b.op("p1", ALLOCATE, "o1", 0.4, 1.0, UNKNOWN)
    b.op("p1", ALLOCATE, "o1", 1.1, 1.2, OK, "a")
    report = verdict(b, {"o1": ("a",)}, cooldown=10)
    assert not report.valid and not report.inconclusive
    assert any(v.startswith("address a held by 'o2' over [0.200, 0.600]") and "'o1' over [0.400, inf]" in v
               for v in report.violations), report.violations
    # Without the unknown call the same addresses are fine: o1 took "a" after o2 let it go.
    b2 = Builder()
    b2.op("p2", ALLOCATE, "o2", 0.2, 0.3, OK, "a")
    b2.op("p2", RELEASE, "o2", 0.5, 0.6, OK, "a")
    b2.op("p1", ALLOCATE, "o1", 1.1, 1.2, OK, "a")
    verdict(b2, {"o1": ("a",)}).assert_valid()


def test_release_of_nothing_right_after_an_acknowledged_allocate_fails():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 3, OK)
    report = verdict(b, {})
    assert any("its Release released []" in v for v in report.violations), report.violations


def test_read_that_misses_an_acknowledged_allocation_fails():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", READ, "o1", 2, 3, OK)
    b.op("p1", RELEASE, "o1", 4, 5, OK)
    report = verdict(b, {})
    assert any("before any Release" in v and "saw []" in v for v in report.violations), report.violations


def test_allocation_that_changes_without_a_release_fails():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", ALLOCATE, "o1", 2, 3, OK, "b")
    report = verdict(b, {"o1": ("b",)})
    assert any("changed without a release" in v for v in report.violations), report.violations


def test_one_unknown_release_does_not_excuse_two_losses():
    # The timed-out Release may have freed "a" (the retry found nothing: it did, or "a" was lost),
    # but a Release acts once: it cannot also have freed "b", acknowledged after the retry found
    # nothing. Without this, one timeout during the first failover of a run hid every later loss
    # of that owner (the checker runs with linger=None).
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 12, UNKNOWN)
    b.op("p1", RELEASE, "o1", 13, 14, OK)  # nothing left to release
    b.op("p1", ALLOCATE, "o1", 15, 16, OK, "b")
    b.op("p1", READ, "o1", 100, 101, OK)  # "b" is gone without a release
    for linger in (None, 30.0):
        report = verdict(b, {}, cooldown=900, linger=linger)
        assert any("acknowledged ['b']" in v and "was lost" in v for v in report.violations), report.violations
    # ... and lost from the final state when nothing read it:
    b.ops.pop()
    report = verdict(b, {}, cooldown=900)
    assert any("acknowledged ['b']" in v and "no Release followed" in v for v in report.violations), report.violations


def test_unknown_release_that_may_not_have_acted_yet_still_excuses():
    # The retry released "a" itself: the timed-out Release had not acted and may still free "b".
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 12, UNKNOWN)
    b.op("p1", RELEASE, "o1", 13, 14, OK, "a")
    b.op("p1", ALLOCATE, "o1", 15, 16, OK, "b")
    b.op("p1", READ, "o1", 100, 101, OK)
    verdict(b, {}, cooldown=900).assert_valid()
    # The owner held nothing when the timed-out Release was invoked: it may act on a later allocation.
    b = Builder()
    b.op("p1", READ, "o1", 0, 1, OK)
    b.op("p1", RELEASE, "o1", 2, 12, UNKNOWN)
    b.op("p1", READ, "o1", 13, 14, OK)
    b.op("p1", ALLOCATE, "o1", 15, 16, OK, "b")
    verdict(b, {}, cooldown=900).assert_valid()
    # Its retry's first attempt may have acted (it failed ambiguously): the first Release may still act.
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p1", RELEASE, "o1", 2, 12, UNKNOWN)
    b.op("p1", RELEASE, "o1", 13, 14, OK).attempts = ("UNAVAILABLE", "OK")
    b.op("p1", ALLOCATE, "o1", 15, 16, OK, "b")
    verdict(b, {}, cooldown=900).assert_valid()


def test_holding_without_any_allocate_fails():
    report = check([], {"ghost": frozenset({"a"})})
    assert any("without any Allocate" in v for v in report.violations), report.violations


def test_reuse_within_the_spans_is_inconclusive_not_a_pass():
    # o2 may have taken "a" right after o1's release took effect (a pool without cooldown): the
    # intervals overlap, but the cooldown given is too short to call that a fault.
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 0.1, OK, "a")
    b.op("p1", RELEASE, "o1", 1, 2, OK, "a")
    b.op("p2", ALLOCATE, "o2", 1.5, 2.5, OK, "a")
    report = verdict(b, {"o2": ("a",)}, cooldown=0.1)
    assert report.violations and report.inconclusive
    assert not report.valid
    with pytest.raises(AssertionError, match="INCONCLUSIVE"):
        report.assert_valid()


def test_overlapping_calls_of_one_owner_are_refused():
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 2, OK, "a")
    b.op("p2", READ, "o1", 1, 3, OK, "a")
    with pytest.raises(ValueError, match="calls overlap"):
        verdict(b, {"o1": ("a",)})


def test_recorder_and_helpers():
    clock = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).__next__
    h = History(clock)
    a = h.ok(h.invoke("p1", ALLOCATE, "o1"), ["a"])
    r = h.error(h.invoke("p1", RELEASE, "o1"), "DEADLINE_EXCEEDED", "deadline")
    g = h.error(h.invoke("p1", ALLOCATE, "o2"), "RESOURCE_EXHAUSTED")
    assert (a.invoke, a.complete, a.outcome, a.addresses) == (1.0, 2.0, OK, frozenset({"a"}))
    assert (r.outcome, r.error) == (UNKNOWN, "DEADLINE_EXCEEDED deadline")
    assert g.outcome == FAIL
    after = h.error(h.invoke("p1", ALLOCATE, "o3"), "RESOURCE_EXHAUSTED", attempts=("UNAVAILABLE", "RESOURCE_EXHAUSTED"))
    assert after.outcome == UNKNOWN  # the first attempt may have taken an address
    assert outcome_of_code("UNAVAILABLE") == UNKNOWN and outcome_of_code("INTERNAL") == UNKNOWN
    with pytest.raises(ValueError):
        h.invoke("p1", "delete", "o1")
    assert final_holdings([("o1", ["a"])]) == {"o1": frozenset({"a"})}
    with pytest.raises(ValueError, match="twice"):
        final_holdings([("o1", ["a"]), ("o1", ["b"])])
    b = Builder()
    b.op("p1", ALLOCATE, "o1", 0, 1, OK, "a")
    b.op("p2", ALLOCATE, "o2", 2, 9, OK, "b")  # invoked before the fault, answered after it
    b.op("p3", ALLOCATE, "o3", 4, 6, OK, "c")
    b.op("p3", ALLOCATE, "o4", 6.5, 7, OK, "d")
    b.op("p1", ALLOCATE, "o5", 1.5, 2.5, OK, "e")
    assert windows(b.ops, fault_at=3) == {"first_ok": 3, "gap": 3.5}  # from 2.5 (before the fault) to 6
    assert windows(b.ops, fault_at=3, until=6.5)["gap"] == 3.5
    assert windows(b.ops, fault_at=10) == {"first_ok": INF, "gap": INF}


# -- simulated allocators (hypothesis) -----------------------------------------------------------


@dataclass
class Sim:
    ops: list[Op]
    final: dict[str, frozenset[str]]
    end: float
    faults: int  # faults the simulated server made (lost or doubled allocations)


def simulate(seed: int, *, processes: int, calls: int, unknown: float, cooldown: float, linger: float,
             fault: str = "", addresses: int = 8) -> Sim:
    """Clients (one task per group of owners, one call at a time) against a simulated allocator
    with a cooldown. Every call takes effect at one instant within its window (an unknown one
    perhaps never, perhaps up to ``linger`` after its client gave up). ``fault``: ``lose`` drops an
    acknowledged allocation right after its answer (its address quarantined), ``double`` hands out
    an address another owner holds."""
    rng = random.Random(seed)
    ops: list[Op] = []
    effects: list[tuple[float, int, bool]] = []  # (when, call, whether this attempt's answer is the call's)
    modes: dict[int, str] = {}
    for p in range(processes):
        owners = [f"p{p}o{i}" for i in range(rng.randint(1, 3))]
        t = rng.uniform(0, 3)
        for _ in range(rng.randint(1, calls)):
            kind = rng.choice((ALLOCATE, ALLOCATE, RELEASE, READ))
            duration = rng.uniform(0.01, 3)
            op = Op(f"p{p}", kind, rng.choice(owners), t, t + duration, index=len(ops))
            mode = "ok"
            if rng.random() < unknown:
                mode = rng.choice(("unknown-applied", "unknown-not-applied", "retried"))
            modes[op.index] = mode
            middle = (op.invoke + op.complete) / 2
            if mode == "ok":
                effects.append((rng.uniform(op.invoke, op.complete), op.index, True))
            elif mode == "unknown-applied":
                effects.append((rng.uniform(op.invoke, op.complete + linger), op.index, False))
            elif mode == "retried":  # a first attempt acted but lost its answer; the retry answered
                effects.append((rng.uniform(op.invoke, middle), op.index, False))
                effects.append((rng.uniform(middle, op.complete), op.index, True))
                op.attempts = ("UNAVAILABLE", "OK")
            ops.append(op)
            t = op.complete + rng.uniform(0, 1)
    held: dict[str, str] = {}
    freed_at: dict[str, float] = {}
    quarantined: set[str] = set()
    faults = 0
    loss_after: dict[int, str] = {}
    pool = [f"a{i}" for i in range(addresses)]
    for when, index, answers in sorted(effects):
        op = ops[index]
        result: frozenset[str] | None = None
        if op.kind == ALLOCATE:
            if op.owner in held:
                result = frozenset({held[op.owner]})
            else:
                taken = set(held.values()) | quarantined
                free = [a for a in pool if a not in taken and freed_at.get(a, -INF) + cooldown <= when]
                if fault == "double" and answers and not faults and held and rng.random() < 0.5:
                    free = [rng.choice(sorted(set(held.values())))]
                    faults += 1
                if free:
                    held[op.owner] = free[0]
                    result = frozenset({free[0]})
                    if fault == "lose" and answers and not faults and rng.random() < 0.5:
                        loss_after[index] = op.owner
                        faults += 1
        elif op.kind == RELEASE:
            address = held.pop(op.owner, None)
            if address is not None:
                freed_at[address] = when
            result = frozenset({address} if address else ())
        else:
            result = frozenset({held[op.owner]} if op.owner in held else ())
        if answers:
            if result is None:  # exhausted: a definite refusal
                op.outcome = FAIL
                op.error = "RESOURCE_EXHAUSTED"
            else:
                op.outcome, op.addresses = OK, result
        if index in loss_after:  # lost right after the answer: before the owner's next call
            quarantined.add(held.pop(loss_after[index]))
    for op in ops:
        if modes[op.index] in ("unknown-applied", "unknown-not-applied"):
            op.outcome, op.error = UNKNOWN, "DEADLINE_EXCEEDED"
    end = max([op.complete for op in ops] + [w for w, _, _ in effects]) + 1
    return Sim(ops, {o: frozenset({a}) for o, a in held.items()}, end, faults)


SIM = {"processes": st.integers(1, 4), "calls": st.integers(1, 10), "unknown": st.sampled_from([0.0, 0.2, 0.5]),
       "linger": st.sampled_from([0.0, 2.0])}


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), **SIM)
def test_correct_allocator_histories_pass(seed, processes, calls, unknown, linger):
    # The cooldown outlasts every run (at most 10 calls of up to 4 s per client): no reuse can overlap.
    sim = simulate(seed, processes=processes, calls=calls, unknown=unknown, cooldown=1000, linger=linger)
    check(sim.ops, sim.final, final_time=sim.end, cooldown=1000, linger=linger).assert_valid()
    check(sim.ops, sim.final, final_time=sim.end, cooldown=1000, linger=None).assert_valid()


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), cooldown=st.sampled_from([0.0, 0.5, 3.0]), **SIM)
def test_correct_allocator_with_a_short_cooldown_is_never_called_faulty(seed, processes, calls, unknown, linger,
                                                                       cooldown):
    # Addresses are reused soon after their release: an overlap of upper bounds proves nothing,
    # and the checker must say so rather than report a fault.
    sim = simulate(seed, processes=processes, calls=calls, unknown=unknown, cooldown=cooldown, linger=linger,
                   addresses=3)
    report = check(sim.ops, sim.final, final_time=sim.end, cooldown=cooldown, linger=linger)
    assert report.valid or report.inconclusive, report.violations


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), processes=st.integers(1, 4), calls=st.integers(1, 10))
def test_lost_acknowledged_allocation_is_found(seed, processes, calls):
    sim = simulate(seed, processes=processes, calls=calls, unknown=0.0, cooldown=1000, linger=0.0, fault="lose")
    report = check(sim.ops, sim.final, final_time=sim.end, cooldown=1000)
    assert (not report.valid) == bool(sim.faults), (sim.faults, report.violations)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), processes=st.integers(2, 4), calls=st.integers(2, 10))
def test_address_handed_out_twice_is_found(seed, processes, calls):
    sim = simulate(seed, processes=processes, calls=calls, unknown=0.0, cooldown=1000, linger=0.0, fault="double")
    report = check(sim.ops, sim.final, final_time=sim.end, cooldown=1000)
    assert (not report.valid) == bool(sim.faults), (sim.faults, report.violations)
    if sim.faults:
        assert any(v.startswith("address ") for v in report.violations), report.violations
