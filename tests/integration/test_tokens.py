"""Page and resume tokens cannot be forged: every token field of every call answers a forged,
damaged or foreign token with INVALID_ARGUMENT naming the field, never INTERNAL; tokens are
authenticated with a per-deployment key that all replicas share and that can be rotated."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time

import grpc
import pytest
from grpc_helpers import REQUIRE, expect_error, pool
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import psql, running_server, scratch_database

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode

_SETTINGS = settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def js(value: object) -> str:
    """A token the way the old service made them: base64 of JSON."""
    return b64(json.dumps(value, allow_nan=True).encode())


def setup_pool(stub) -> None:  # type: ignore[no-untyped-def]
    stub.CreatePool(pool("tok", "198.18.0.0/24", "fd00::/120"))
    for i in range(3):
        stub.Allocate(pb.AllocateRequest(pool="tok", owner=f"o{i}", ip_family_policy=REQUIRE))


def watch_status(stub, token: str) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status a watch from ``token`` ends with (OK when it starts streaming)."""
    call = stub.WatchAllocations(pb.WatchAllocationsRequest(pool="tok", resume_token=token), timeout=10)
    try:
        next(call)
        return C.OK
    except grpc.RpcError as err:
        assert "Traceback" not in (err.details() or ""), err.details()
        return err.code()
    finally:
        call.cancel()


def calls(stub):  # type: ignore[no-untyped-def]
    """Every request field that carries a token: (name, call with a token -> status code)."""
    def unary(fn):  # type: ignore[no-untyped-def]
        def run(token: str) -> grpc.StatusCode:
            try:
                fn(token)
                return C.OK
            except grpc.RpcError as err:
                assert "Traceback" not in (err.details() or ""), err.details()
                return err.code()
        return run

    return [
        ("ListAllocations.page_token",
         unary(lambda t: stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=t, page_size=1),
                                              timeout=10))),
        ("ListBlocks.page_token",
         unary(lambda t: stub.ListBlocks(pb.ListBlocksRequest(pool="tok", page_token=t, page_size=1), timeout=10))),
        ("ListPools.page_token",
         unary(lambda t: stub.ListPools(pb.ListPoolsRequest(page_token=t, page_size=1), timeout=10))),
        ("WatchAllocations.resume_token", lambda t: watch_status(stub, t)),
    ]


def resume_token(stub) -> str:  # type: ignore[no-untyped-def]
    call = stub.WatchAllocations(pb.WatchAllocationsRequest(pool="tok"), timeout=10)
    first = next(call)
    call.cancel()
    return first.resume_token


# -- the findings: each of these was INTERNAL (or accepted) before -------------------------------


NOW = time.time()  # a token time within the retention: the old service then used every other field

FORGED = {
    "nul in a string": js({"a": "\u0000"}),
    "lone surrogate": b64(b'{"a": "\\ud800"}'),
    "deep nesting": b64(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "not an object": js([1, 2, 3]),
    "huge xid": js({"p": 1, "x": str(10**30), "i": 0, "t": NOW}),
    "negative xid": js({"p": 1, "x": "-1", "i": 0, "t": NOW}),
    "float xid": js({"p": 1, "x": 1.5e300, "i": 0, "t": NOW}),
    "huge id": js({"p": 1, "x": "5", "i": 10**30, "t": NOW}),
    "never expires (NaN)": js({"p": 1, "x": "5", "i": 0, "t": math.nan}),
    "never expires (Infinity)": js({"p": 1, "x": "5", "i": 0, "t": math.inf}),
    "owner as block id": js({"a": "not-a-number"}),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_tokens_are_invalid_argument_on_every_call(stub, case):
    setup_pool(stub)
    for name, run in calls(stub):
        assert run(FORGED[case]) == C.INVALID_ARGUMENT, (name, case)


def test_a_token_of_another_call_is_refused(stub):
    setup_pool(stub)
    page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
    assert page
    # A real ListAllocations token (an owner name inside) handed to ListBlocks, ListPools, a watch.
    err = expect_error(lambda r: stub.ListBlocks(pb.ListBlocksRequest(pool="tok", page_token=page)), None,
                       C.INVALID_ARGUMENT, None, "page_token")
    assert "Traceback" not in err.details()
    expect_error(lambda r: stub.ListPools(pb.ListPoolsRequest(page_token=page)), None, C.INVALID_ARGUMENT, None,
                 "page_token")
    assert watch_status(stub, page) == C.INVALID_ARGUMENT
    # And a resume token as a page token.
    expect_error(lambda r: stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=resume_token(stub))),
                 None, C.INVALID_ARGUMENT, None, "page_token")


def test_a_changed_token_is_refused(stub):
    """Editing any byte of a real token (here: the position inside) makes it invalid."""
    setup_pool(stub)
    page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
    assert stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1, page_token=page)).allocations
    raw = bytearray(base64.urlsafe_b64decode(page + "=" * (-len(page) % 4)))
    for i in range(len(raw)):
        changed = bytearray(raw)
        changed[i] ^= 0x01
        token = base64.urlsafe_b64encode(bytes(changed)).decode().rstrip("=")
        expect_error(lambda r, t=token: stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=t)),
                     None, C.INVALID_ARGUMENT, None, "page_token")
    token = resume_token(stub)
    assert watch_status(stub, token) == C.OK
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 0x80
    assert watch_status(stub, base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")) == C.INVALID_ARGUMENT


# -- hypothesis: arbitrary bytes and arbitrary JSON through every token field ----------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from("apxitk") | st.text(max_size=3),
                                                                inner, max_size=6),
    max_leaves=20,
)
_token = st.one_of(
    st.binary(min_size=1, max_size=300).map(b64),
    st.binary(min_size=1, max_size=300).map(lambda b: b64(b).rstrip("=")),
    _json.map(js),
    st.fixed_dictionaries({"p": _json, "x": _json, "i": _json, "t": _json}).map(js),
    st.fixed_dictionaries({  # shaped like a resume token of the test's pool, any values
        "p": st.integers(1, 3), "x": st.integers(-(10**30), 10**30).map(str) | st.floats() | st.integers(-5, 10**25),
        "i": st.integers(-(10**30), 10**30) | st.floats(), "t": st.just(NOW) | st.floats(),
    }).map(js),
    st.fixed_dictionaries({"a": _json}).map(js),
    st.text(min_size=1, max_size=200),
)


@_SETTINGS
@given(token=_token)
@example(token=FORGED["huge xid"])
@example(token=FORGED["nul in a string"])
@example(token=FORGED["deep nesting"])
@example(token=FORGED["never expires (NaN)"])
def test_any_token_is_invalid_argument_never_internal(stub, token):
    if not stub.ListPools(pb.ListPoolsRequest()).pools:
        setup_pool(stub)
    for name, run in calls(stub):
        code = run(token)
        assert code == C.INVALID_ARGUMENT, (name, code, token[:200])


# -- keys: shared by replicas, configurable, rotatable -------------------------------------------


def test_replicas_share_the_database_key(stub, db_url, tmp_path):
    """Two servers on one database accept each other's tokens (the key is in the database)."""
    setup_pool(stub)
    page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
    assert int(psql(db_url, "SELECT count(*) FROM ipam_token_keys")) >= 1
    with running_server(db_url, tmp_path) as other, grpc.insecure_channel(other.target) as ch:
        stub2 = ipam_pb2_grpc.IpamServiceStub(ch)
        got = stub2.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1, page_token=page))
        assert [a.owner for a in got.allocations] == ["o1"]
        token = resume_token(stub2)
    assert watch_status(stub, token) == C.OK


def test_configured_keys_rotate_without_breaking_pages(clean_db, tmp_path):
    old, new = "k" * 40, "n" * 40
    with running_server(clean_db, tmp_path, extra_env={"DSIPAM_TOKEN_KEY": old}) as s, \
            grpc.insecure_channel(s.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        setup_pool(stub)
        page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
    # Rotation: the new key signs, the previous one is still accepted.
    with running_server(clean_db, tmp_path, extra_env={"DSIPAM_TOKEN_KEY": f"{new},{old}"}) as s, \
            grpc.insecure_channel(s.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        got = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1, page_token=page))
        assert [a.owner for a in got.allocations] == ["o1"]
    # Once the old key is dropped its tokens are refused; the database key does not accept them either.
    for env in ({"DSIPAM_TOKEN_KEY": new}, {}):
        with running_server(clean_db, tmp_path, extra_env=env) as s, grpc.insecure_channel(s.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            expect_error(lambda r, st=stub: st.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=page)),
                         None, C.INVALID_ARGUMENT, None, "page_token")


def signing_key_id(token: str) -> str:
    """The id of the key that signed ``token`` (hex): bytes 1-4 of the token."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[1:5].hex()


def key_ids(db_url: str) -> dict[str, str]:
    """Each key row (hex) -> its key id (hex), as the server computes it."""
    out = {}
    for line in psql(db_url, "SELECT encode(key, 'hex') FROM ipam_token_keys ORDER BY id").split():
        out[line] = hashlib.sha256(b"dsipam-token-key-id\x00" + bytes.fromhex(line)).digest()[:4].hex()
    return out


def test_rotating_several_times_within_the_delay_keeps_pages_working(tmp_path):
    """Three keys inserted within KEY_ACTIVATION_SECONDS (90 s): the key every replica has had
    time to load still signs and is still accepted, though it is no longer among the newest three."""
    with scratch_database() as url:
        psql(url, "DELETE FROM ipam_token_keys; "
                  "INSERT INTO ipam_token_keys (key, create_time) VALUES (decode(repeat('aa', 32), 'hex'), now() - interval '1 hour')")
        kid = {k[:2]: v for k, v in key_ids(url).items()}
        with running_server(url, tmp_path) as s, grpc.insecure_channel(s.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            setup_pool(stub)
            page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
        assert signing_key_id(page) == kid["aa"]
        # Three rotations within the delay.
        psql(url, "INSERT INTO ipam_token_keys (key, create_time) VALUES "
                  "(decode(repeat('bb', 32), 'hex'), now() - interval '30 seconds'), "
                  "(decode(repeat('cc', 32), 'hex'), now() - interval '20 seconds'), "
                  "(decode(repeat('dd', 32), 'hex'), now() - interval '10 seconds')")
        kid = {k[:2]: v for k, v in key_ids(url).items()}
        with running_server(url, tmp_path) as s, grpc.insecure_channel(s.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            got = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1, page_token=page))
            assert [a.owner for a in got.allocations] == ["o1"]
            assert signing_key_id(got.next_page_token) == kid["aa"]  # not bb, which other replicas may lack
        # Once bb is older than the delay it signs, and aa (neither signing nor among the newest
        # three) is no longer accepted.
        psql(url, "UPDATE ipam_token_keys SET create_time = now() - interval '100 seconds' "
                  "WHERE key = decode(repeat('bb', 32), 'hex')")
        with running_server(url, tmp_path) as s, grpc.insecure_channel(s.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            got = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1))
            assert signing_key_id(got.next_page_token) == kid["bb"]
            expect_error(lambda r: stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=page)),
                         None, C.INVALID_ARGUMENT, None, "page_token: not a token returned")


def test_a_new_deployment_signs_with_its_oldest_key(tmp_path):
    """No key is older than the delay yet: the oldest row signs (the one every replica started with)."""
    with scratch_database() as url:
        psql(url, "DELETE FROM ipam_token_keys; INSERT INTO ipam_token_keys (key, create_time) VALUES "
                  "(decode(repeat('a1', 32), 'hex'), now() - interval '50 seconds'), "
                  "(decode(repeat('b2', 32), 'hex'), now() - interval '40 seconds'), "
                  "(decode(repeat('c3', 32), 'hex'), now() - interval '30 seconds'), "
                  "(decode(repeat('d4', 32), 'hex'), now() - interval '20 seconds')")
        kid = {k[:2]: v for k, v in key_ids(url).items()}
        with running_server(url, tmp_path) as s, grpc.insecure_channel(s.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            setup_pool(stub)
            page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1)).next_page_token
            assert signing_key_id(page) == kid["a1"]
            assert stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=page)).allocations


# -- page tokens are bound to their request: the pool and every filter ---------------------------


def setup_two_pools(stub) -> None:  # type: ignore[no-untyped-def]
    """Pools tok and tok2, each with owners c0-c3, n0 (node-a), n1 (node-b); c3 holds only IPv6;
    c0, c2, n0 have app=a, the others app=b; all have tier=x."""
    for name, v4, v6 in (("tok", "198.18.0.0/24", "fd00::/120"), ("tok2", "198.18.1.0/24", "fd00::100/120")):
        stub.CreatePool(pool(name, v4, v6))
        for owner, node, app in (("c0", "", "a"), ("c1", "", "b"), ("c2", "", "a"), ("c3", "", "b"),
                                 ("n0", "node-a", "a"), ("n1", "node-b", "b")):
            v6_only = owner == "c3"
            stub.Allocate(pb.AllocateRequest(
                pool=name, owner=owner, node=node, attributes={"app": app, "tier": "x"},
                ip_family_policy=pb.IP_FAMILY_POLICY_SINGLE_STACK if v6_only else REQUIRE,
                ip_families=[pb.IP_FAMILY_IPV6] if v6_only else []))


_OTHER = "page_token: belongs to another request (pool or filters differ)"


def expect_other_request(fn) -> None:  # type: ignore[no-untyped-def]
    err = expect_error(lambda r: fn(), None, C.INVALID_ARGUMENT, None, "page_token")
    assert err.details() == _OTHER, err.details()


def test_a_page_token_works_only_for_its_pool_and_filters(stub):
    setup_two_pools(stub)
    page = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=2)).next_page_token
    assert page
    # The same request goes on.
    got = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=2, page_token=page))
    assert [a.owner for a in got.allocations] == ["c2", "c3"]
    # Another pool, or any other filter, is refused (a different page size is fine).
    assert [a.owner for a in stub.ListAllocations(
        pb.ListAllocationsRequest(pool="tok", page_size=5, page_token=page)).allocations][:1] == ["c2"]
    for other in (
        pb.ListAllocationsRequest(pool="tok2", page_token=page),
        pb.ListAllocationsRequest(pool="tok", page_token=page, attribute_selector={"app": "a"}),
        pb.ListAllocationsRequest(pool="tok", page_token=page, ip_family=pb.IP_FAMILY_IPV4),
        pb.ListAllocationsRequest(pool="tok", page_token=page, ip_family=pb.IP_FAMILY_IPV6),
    ):
        expect_other_request(lambda o=other: stub.ListAllocations(o))
    # A filtered listing's token needs the same filter (and the same pool).
    sel = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_size=1, attribute_selector={"app": "a"},
                                                         ip_family=pb.IP_FAMILY_IPV4)).next_page_token
    assert sel
    got = stub.ListAllocations(pb.ListAllocationsRequest(pool="tok", page_token=sel, attribute_selector={"app": "a"},
                                                         ip_family=pb.IP_FAMILY_IPV4))
    assert [a.owner for a in got.allocations] == ["c2", "n0"]
    for other in (
        pb.ListAllocationsRequest(pool="tok", page_token=sel),
        pb.ListAllocationsRequest(pool="tok", page_token=sel, attribute_selector={"app": "a"}),
        pb.ListAllocationsRequest(pool="tok", page_token=sel, attribute_selector={"app": "b"},
                                  ip_family=pb.IP_FAMILY_IPV4),
        pb.ListAllocationsRequest(pool="tok", page_token=sel, attribute_selector={"app": "a", "x": "y"},
                                  ip_family=pb.IP_FAMILY_IPV4),
        pb.ListAllocationsRequest(pool="tok2", page_token=sel, attribute_selector={"app": "a"},
                                  ip_family=pb.IP_FAMILY_IPV4),
    ):
        expect_other_request(lambda o=other: stub.ListAllocations(o))


def test_a_block_page_token_works_only_for_its_pool_and_node(stub):
    setup_two_pools(stub)
    for node in ("", "node-a"):
        page = stub.ListBlocks(pb.ListBlocksRequest(pool="tok", node=node, page_size=1)).next_page_token
        assert page, node
        assert stub.ListBlocks(pb.ListBlocksRequest(pool="tok", node=node, page_size=1, page_token=page)).blocks
        for pool_name, other_node in (("tok2", node), ("tok", "node-b" if node else "node-a")):
            expect_other_request(lambda p=pool_name, n=other_node, t=page: stub.ListBlocks(
                pb.ListBlocksRequest(pool=p, node=n, page_token=t)))


_selector = st.fixed_dictionaries({}, optional={"app": st.sampled_from(["a", "b"]), "tier": st.just("x")})
_family = st.sampled_from([pb.IP_FAMILY_UNSPECIFIED, pb.IP_FAMILY_IPV4, pb.IP_FAMILY_IPV6])
_request = st.tuples(st.sampled_from(["tok", "tok2"]), _selector, _family)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=_request, then=_request)
@example(first=("tok", {}, pb.IP_FAMILY_UNSPECIFIED), then=("tok2", {}, pb.IP_FAMILY_UNSPECIFIED))
@example(first=("tok", {"app": "a"}, pb.IP_FAMILY_IPV6), then=("tok", {"app": "a"}, pb.IP_FAMILY_IPV6))
def test_any_other_pool_or_filter_is_refused(stub, first, then):
    """A page token is accepted exactly when the next request names the same pool and filters
    (every drawn request matches at least two owners, so its first page of one has a token)."""
    if not stub.ListPools(pb.ListPoolsRequest()).pools:
        setup_two_pools(stub)
    page = stub.ListAllocations(pb.ListAllocationsRequest(pool=first[0], page_size=1, attribute_selector=first[1],
                                                          ip_family=first[2])).next_page_token
    assert page
    request = pb.ListAllocationsRequest(pool=then[0], page_token=page, attribute_selector=then[1], ip_family=then[2])
    if then == first:
        assert stub.ListAllocations(request).allocations
    else:
        expect_other_request(lambda: stub.ListAllocations(request))
