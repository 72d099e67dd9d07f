"""A new watch's resume tokens carry what it must skip (the transactions above its position that had
committed before it started: its snapshot's xmax and running xids): round trip, size bound, and
refusal of a malformed field."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.server import domain
from dsipam.server.store import _base, _watch

xids = st.integers(1, _watch._MAX_XID - 1)  # noqa: SLF001


@pytest.fixture(autouse=True)
def _keys():
    saved = (_base.TOKEN_KEYS.__dict__.copy())
    _base.TOKEN_KEYS.use([b"k" * 32])
    yield
    _base.TOKEN_KEYS.__dict__.clear()
    _base.TOKEN_KEYS.__dict__.update(saved)


@settings(max_examples=300, deadline=None)
@given(xmax=st.integers(2, _watch._MAX_XID - 1), running=st.sets(st.integers(1, 10**6), max_size=60),  # noqa: SLF001
       offset=st.integers(-5, 5), seed=st.randoms())
def test_a_token_carries_its_skip_while_below_it_and_within_the_bound(xmax, running, offset, seed):
    running = {x for x in running if x < xmax}
    skip = _watch.Skip(xmax, frozenset(running))
    xid = max(1, min(_watch._MAX_XID, (seed.choice(sorted(running)) if running else xmax) + offset))  # noqa: SLF001
    pos = (xid, 3)
    token = _watch.encode_position(7, pos, time.time(), skip)
    assert len(token) <= _base.MAX_TOKEN_CHARS
    pool_id, got_pos, _, got = _watch.decode_position(token)
    assert (pool_id, got_pos) == (7, pos)
    relevant = sorted(x for x in running if x >= xid)
    if xid >= xmax:
        assert got is None
        return
    laters = [x for x in [*relevant, xid, xid + 1, xmax - 1, xmax, xmax + 1, *range(xid, xid + 60)] if x >= xid]
    if len(relevant) <= _watch.MAX_TOKEN_SKIP:
        assert got == _watch.Skip(xmax, frozenset(relevant))
        # every event after the position is judged as the stream judged it
        assert all(got.skips(later) == skip.skips(later) for later in laters)
    else:
        # cut short at the first running xid left out: it skips less, never what the stream sends
        cut = relevant[_watch.MAX_TOKEN_SKIP]
        assert got == _watch.Skip(cut, frozenset(relevant[:_watch.MAX_TOKEN_SKIP]))
        assert all(skip.skips(later) for later in laters if got.skips(later))
        assert all(got.skips(later) == skip.skips(later) for later in laters if later < cut)


def test_the_largest_token_fits():
    skip = _watch.Skip(_watch._MAX_XID, frozenset(range(_watch._MAX_XID - 30, _watch._MAX_XID)))  # noqa: SLF001
    token = _watch.encode_position(2**31 - 1, (_watch._MAX_XID - 24, 2**62), time.time(), skip)  # noqa: SLF001
    assert len(token) <= _base.MAX_TOKEN_CHARS
    assert _watch.decode_position(token)[3] == _watch.Skip(_watch._MAX_XID, frozenset(  # noqa: SLF001
        range(_watch._MAX_XID - 24, _watch._MAX_XID)))  # noqa: SLF001
    many = _watch.Skip(_watch._MAX_XID, frozenset(range(_watch._MAX_XID - 100, _watch._MAX_XID)))  # noqa: SLF001
    token = _watch.encode_position(2**31 - 1, (_watch._MAX_XID - 100, 2**62), time.time(), many)  # noqa: SLF001
    assert len(token) <= _base.MAX_TOKEN_CHARS


@settings(max_examples=200, deadline=None)
@given(bad=st.one_of(st.just([]), st.lists(st.text(max_size=25), min_size=1, max_size=3),
                     st.lists(st.integers(), min_size=1, max_size=3), st.text(max_size=5), st.integers(),
                     st.lists(st.just("1"), min_size=_watch.MAX_TOKEN_SKIP + 2, max_size=_watch.MAX_TOKEN_SKIP + 2),
                     st.just([str(_watch._MAX_XID + 1)])))  # noqa: SLF001
def test_a_malformed_skip_is_refused_naming_the_field(bad):
    if isinstance(bad, list) and bad and all(isinstance(v, str) and v.isdigit() and len(v) <= 20
                                             and int(v) <= _watch._MAX_XID for v in bad) \
            and len(bad) <= _watch.MAX_TOKEN_SKIP + 1:  # noqa: SLF001
        return  # a well-formed list (hypothesis may draw one)
    token = _base.encode_token({"k": "watch", "p": 7, "x": "10", "i": 0, "t": time.time(), "s": bad})
    with pytest.raises(domain.InvalidArgument) as err:
        _watch.decode_position(token)
    assert "resume_token" in str(err.value)
