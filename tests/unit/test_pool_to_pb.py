"""convert.pool_to_pb keeps the spec's part of a Pool message (name, ranges, labels, network) per
spec object and copies it into each answer: the answer must be exactly what converting every field
anew gives, for any pool, and a new spec (a new layout) must never get an older spec's part."""

from __future__ import annotations

import datetime as dt
import gc
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.server import domain
from dsipam.server.domain._ranges import build_range
from dsipam.server.rpc import convert
from dsipam.server.store._base import StoredPool, StoredRange, pool_info, usage_of
from dsipam.v1 import ipam_pb2 as pb


def _reference(info: domain.PoolInfo) -> pb.Pool:
    """Every field converted anew (the conversion before the spec part was kept)."""
    spec = info.spec
    return pb.Pool(
        name=spec.name,
        ranges=[pb.IpRange(cidr=r.cidr, first=r.first_text(), last=r.last_text(),
                           gateway=str(r.gateway) if r.gateway else "", exclude=[str(x) for x in r.exclude],
                           block_size=r.block_size) for r in spec.ranges],
        labels=dict(spec.labels),
        usage=[pb.FamilyUsage(family=pb.IP_FAMILY_IPV4 if u.family is domain.Family.IPV4 else pb.IP_FAMILY_IPV6,
                              size=u.size, allocated=u.allocated, free=u.free, cooldown=u.cooldown,
                              reserved=u.reserved) for u in info.usage],
        create_time=convert._timestamp(info.create_time),  # noqa: SLF001
        cooldown={"seconds": info.cooldown_ms // 1000, "nanos": (info.cooldown_ms % 1000) * 1_000_000},
        reservations=list(info.reservations),
        node_affinity=pb.NODE_AFFINITY_STRICT if info.strict_affinity else pb.NODE_AFFINITY_BORROW,
        network=spec.network,
    )


def _pool(name: str, third: int, labels: dict[str, str], cooldown_ms: int, strict: bool, six: bool,
          excluded: bool, version: int = 1) -> StoredPool:
    ranges = [build_range(cidr=f"198.18.{third}.0/24", gateway=f"198.18.{third}.1",
                          exclude=[f"198.18.{third}.128/30"] if excluded else [])]
    if six:
        ranges.append(build_range(cidr=f"fd00:{third + 1:x}::/120", first=f"fd00:{third + 1:x}::10"))
    stored = tuple(StoredRange(i + 1, r, r.size) for i, r in enumerate(ranges))
    return StoredPool(1, name, labels, dt.datetime(2026, 12, 5, 14, 0, tzinfo=dt.UTC), cooldown_ms, version,
                      stored, (), strict)


def _rows(pool: StoredPool, used: int, cooling: int) -> list[dict[str, int]]:
    return [{"family": int(r.spec.family), "size": r.static_size, "used": used, "cooling": cooling}
            for r in pool.ranges]


names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
labels = st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(max_size=10), max_size=3)


@settings(max_examples=60, deadline=None)
@given(name=names, third=st.integers(0, 250), labels=labels, cooldown_ms=st.integers(0, 10**7),
       strict=st.booleans(), six=st.booleans(), excluded=st.booleans(), used=st.integers(0, 100),
       cooling=st.integers(0, 20))
def test_pool_answers_equal_a_conversion_of_every_field(name, third, labels, cooldown_ms, strict, six, excluded,
                                                       used, cooling):
    pool = _pool(name, third, labels, cooldown_ms, strict, six, excluded)
    for _ in range(2):  # the first answer builds the spec's part, the second copies it
        info = pool_info(pool, usage_of(pool, _rows(pool, used, cooling)))
        got = convert.pool_to_pb(info)
        assert got == _reference(info)
        assert got.HasField("cooldown") and got.HasField("create_time")
        used += 1


def test_a_new_layout_never_answers_with_the_old_layouts_ranges():
    old = _pool("p", 1, {"a": "1"}, 0, False, True, False)
    assert [r.cidr for r in convert.pool_to_pb(pool_info(old, ())).ranges] == ["198.18.1.0/24", "fd00:2::/120"]
    # Each new layout of the same pool (another version: a range gone, labels changed) is made after
    # the previous one is dropped, so its spec's id() may be the dead one's: the answer must still be
    # the new layout's.
    del old
    for i in range(50):
        new = _pool("p", 1, {"a": str(i)}, 0, False, False, True, version=2 + i)
        answer = convert.pool_to_pb(pool_info(new, ()))
        assert [r.cidr for r in answer.ranges] == ["198.18.1.0/24"]
        assert list(answer.ranges[0].exclude) == ["198.18.1.128/30"]
        assert dict(answer.labels) == {"a": str(i)}
        del new, answer


def test_one_layout_converts_its_ranges_once():
    pool = _pool("p", 3, {}, 0, False, True, False)
    assert pool.spec is pool.spec  # one spec per cached layout: the key of the kept part
    first = convert.pool_to_pb(pool_info(pool, ()))
    kept = convert._SPEC_PARTS[id(pool.spec)]  # noqa: SLF001
    assert convert.pool_to_pb(pool_info(pool, ())) == first
    assert convert._SPEC_PARTS[id(pool.spec)] is kept  # noqa: SLF001


def test_a_kept_part_never_keeps_its_layout_alive():
    """A superseded layout (every Reserve, label change or range edit makes one) is freed as soon as
    nothing else holds it, and its part goes with it: the kept parts are the live specs' only."""
    before = len(convert._SPEC_PARTS)  # noqa: SLF001
    pools = [_pool(f"p{i}", i % 250, {}, 0, False, True, False) for i in range(300)]
    refs = [weakref.ref(p.spec.ranges[0]) for p in pools]
    for p in pools:
        assert convert.pool_to_pb(pool_info(p, ())).name == p.name
    assert len(convert._SPEC_PARTS) == before + 300  # noqa: SLF001
    del pools, p
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(convert._SPEC_PARTS) == before  # noqa: SLF001
