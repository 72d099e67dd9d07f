"""The LoadBalancer Services' pure decisions (clients/kubernetes/dsipam/kube/_lbplan.py): which Services,
which families under each ipFamilyPolicy, what to release and take, the ingress order, and the strict
parsing of the annotations a Service's or namespace's editor controls."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.client import Family
from dsipam.kube._lbplan import (
    MAX_ANNOTATION,
    Problem,
    Want,
    changes,
    ingress,
    is_ours,
    owner_of,
    parse_pool_name,
    parse_requested,
    plan,
    pool_choice,
    service_families,
    uid_of_owner,
)

V4, V6 = Family.IPV4, Family.IPV6
BOTH = (V4, V6)
A4 = ipaddress.ip_address("198.18.0.7")
B4 = ipaddress.ip_address("198.18.0.8")
A6 = ipaddress.ip_address("fd00::7")


# -- which Services -----------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "default", "ours"), [
    ({"type": "LoadBalancer", "loadBalancerClass": "ipam.dsipam.io/lb"}, False, True),
    ({"type": "LoadBalancer", "loadBalancerClass": "metallb.io/metallb"}, True, False),
    ({"type": "LoadBalancer"}, False, False),
    ({"type": "LoadBalancer"}, True, True),
    ({"type": "ClusterIP"}, True, False),
    ({"type": "NodePort", "loadBalancerClass": "ipam.dsipam.io/lb"}, False, False),
])
def test_which_services(spec: dict, default: bool, ours: bool) -> None:
    assert is_ours(spec, "ipam.dsipam.io/lb", default) is ours


def test_owner_key_round_trip() -> None:
    owner = owner_of("web", "front", "0b7c9a6e-1f6d-4f0e-9d51-3c1f6f0b8a11")
    assert owner == "svc/web/front/0b7c9a6e-1f6d-4f0e-9d51-3c1f6f0b8a11"
    assert uid_of_owner(owner) == "0b7c9a6e-1f6d-4f0e-9d51-3c1f6f0b8a11"
    assert uid_of_owner("c0ffee/eth0") is None
    assert uid_of_owner("svc/web/front") is None
    assert uid_of_owner("svc/web//x") is None


# -- families, exactly as Kubernetes defines them -------------------------------------------------

@pytest.mark.parametrize(("policy", "families", "pool", "order", "optional"), [
    ("SingleStack", (V4,), BOTH, (V4,), set()),
    ("SingleStack", (V6,), BOTH, (V6,), set()),
    ("SingleStack", (V6,), (V6,), (V6,), set()),
    ("PreferDualStack", (V4, V6), BOTH, (V4, V6), {V6}),
    ("PreferDualStack", (V6, V4), BOTH, (V6, V4), {V4}),
    ("PreferDualStack", (V6, V4), (V6,), (V6,), set()),  # the pool has one family: the primary
    ("PreferDualStack", (V4,), BOTH, (V4,), set()),  # a single-stack cluster
    ("RequireDualStack", (V4, V6), BOTH, (V4, V6), set()),
    ("RequireDualStack", (V6, V4), (V6, V4), (V6, V4), set()),
])
def test_plan_families(policy: str, families: tuple, pool: tuple, order: tuple, optional: set) -> None:
    want = plan(policy, families, "lb", pool, {})
    assert want.order == order and want.optional == optional and want.primary is order[0]


@pytest.mark.parametrize(("policy", "families", "pool", "reason"), [
    ("SingleStack", (V6,), (V4,), "FamilyNotInPool"),
    ("PreferDualStack", (V6, V4), (V4,), "FamilyNotInPool"),  # never the secondary alone
    ("RequireDualStack", (V4, V6), (V4,), "FamilyNotInPool"),
    ("RequireDualStack", (V4,), BOTH, "InvalidSpec"),
])
def test_plan_refuses(policy: str, families: tuple, pool: tuple, reason: str) -> None:
    with pytest.raises(Problem) as info:
        plan(policy, families, "lb", pool, {})
    assert info.value.reason == reason
    assert "lb" in info.value.message or reason == "InvalidSpec"


def test_requested_addresses_must_fit_the_families() -> None:
    assert plan("SingleStack", (V4,), "lb", BOTH, {V4: A4}).addresses == {V4: A4}
    with pytest.raises(Problem, match="SingleStack IPv4") as info:
        plan("SingleStack", (V4,), "lb", BOTH, {V6: A6})
    assert info.value.reason == "InvalidAddress"
    # PreferDualStack: a requested secondary is required, not optional
    want = plan("PreferDualStack", (V4, V6), "lb", BOTH, {V6: A6})
    assert want.optional == frozenset() and want.addresses == {V6: A6}
    with pytest.raises(Problem, match="no IPv6 range"):
        plan("PreferDualStack", (V4, V6), "lb", (V4,), {V6: A6})


def test_service_families_reads_the_stored_spec() -> None:
    assert service_families({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"]}) == (
        "RequireDualStack", (V6, V4))
    assert service_families({"ipFamilies": ["IPv4"]}) == ("SingleStack", (V4,))
    for bad in ({"ipFamilies": []}, {"ipFamilies": ["IPv4", "IPv4"]}, {"ipFamilies": ["IPv5"]},
                {"ipFamilyPolicy": "Whatever", "ipFamilies": ["IPv4"]}, {"ipFamilies": "IPv4"}):
        with pytest.raises(Problem) as info:
            service_families(bad)
        assert info.value.reason == "InvalidSpec"


# -- changes: upgrade in place, downgrade, requested address --------------------------------------

def test_upgrade_keeps_the_primary_and_adds_the_secondary() -> None:
    ch = changes(Want((V4, V6)), {V4: A4})
    assert ch.release == () and ch.allocate == (V6,)


def test_downgrade_releases_the_secondary_only() -> None:
    ch = changes(Want((V4,)), {V4: A4, V6: A6})
    assert ch.release == (V6,) and ch.allocate == ()


def test_requested_address_change_releases_that_family() -> None:
    ch = changes(Want((V4, V6), addresses={V4: B4}), {V4: A4, V6: A6})
    assert ch.release == (V4,) and ch.allocate == (V4,)
    assert changes(Want((V4, V6), addresses={V4: A4}), {V4: A4, V6: A6}) == changes(Want((V4, V6)), {V4: A4, V6: A6})


def test_ingress_in_ip_families_order() -> None:
    assert ingress((V6, V4), {V4: A4, V6: A6}) == [{"ip": "fd00::7", "ipMode": "VIP"},
                                                  {"ip": "198.18.0.7", "ipMode": "VIP"}]
    assert ingress((V4, V6), {V4: A4}) == [{"ip": "198.18.0.7", "ipMode": "VIP"}]


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(["SingleStack", "PreferDualStack", "RequireDualStack"]),
       families=st.sampled_from([(V4,), (V6,), (V4, V6), (V6, V4)]),
       pool=st.sampled_from([(V4,), (V6,), (V4, V6), (V6, V4)]),
       held=st.dictionaries(st.sampled_from([V4, V6]), st.sampled_from([A4, B4, A6]), max_size=2)
       .map(lambda d: {f: a for f, a in d.items() if Family.of(a) is f}))
def test_plan_and_changes_agree_with_kubernetes(policy: str, families: tuple, pool: tuple, held: dict) -> None:
    """For every policy, family order and pool: the primary comes first, only the families the
    policy allows, nothing the pool lacks; after the changes the owner holds exactly want.order."""
    try:
        want = plan(policy, families, "lb", pool, {})
    except Problem as p:
        assert p.reason in ("FamilyNotInPool", "InvalidSpec")
        assert families[0] not in pool or (policy == "RequireDualStack" and (len(families) == 1 or
                                                                            not set(families) <= set(pool)))
        return
    assert want.order[0] is families[0]
    assert set(want.order) <= set(pool) and set(want.order) <= set(families)
    if policy == "SingleStack":
        assert want.order == families[:1]
    if policy == "RequireDualStack":
        assert want.order == families
    if policy == "PreferDualStack":
        assert want.order == tuple(f for f in families if f in pool)
    ch = changes(want, held)
    after = {f: a for f, a in held.items() if f not in ch.release}
    assert set(after) | set(ch.allocate) == set(want.order)
    assert not set(after) & set(ch.allocate)
    if want.primary in held:  # the primary is never touched
        assert want.primary not in ch.release


# -- annotations: attacker-controlled, parsed strictly at bounded cost ----------------------------

def test_requested_addresses_parsing() -> None:
    assert parse_requested("198.18.0.7", None) == {V4: A4}
    assert parse_requested(" 198.18.0.7 , fd00::7", None) == {V4: A4, V6: A6}
    assert parse_requested(None, "198.18.0.7") == {V4: A4}
    assert parse_requested("fd00::7", "198.18.0.8") == {V6: A6}  # the annotation wins
    assert parse_requested(None, None) == {} and parse_requested(None, "") == {}
    for bad, reason in (("198.18.0.7,198.18.0.8", "two IPv4"), ("a,b,c", "at most two"), ("", "empty entry"),
                        ("198.18.0.7,", "empty entry"), ("198.18.0.07", "not an IP"), ("198.18.0.0/24", "not an IP"),
                        ("fe80::1%eth0", "not an IP"), ("::ffff:198.18.0.7", "IPv4-mapped"),
                        ("x" * (MAX_ANNOTATION + 1), "longer than")):
        with pytest.raises(Problem, match=reason):
            parse_requested(bad, None)


def test_pool_choice_order_and_names() -> None:
    assert pool_choice("svc-pool", "ns-pool", "default", "web") == ("svc-pool", "annotation")
    assert pool_choice(None, "ns-pool", "default", "web") == ("ns-pool", "namespace")
    assert pool_choice(None, None, "default", "web") == ("default", "default")
    with pytest.raises(Problem) as info:
        pool_choice(None, None, None, "web")
    assert info.value.reason == "NoPool" and info.value.retry
    with pytest.raises(Problem, match="namespace web's annotation"):
        pool_choice(None, "Bad_Pool", "default", "web")
    for bad in ("", "UPPER", "-x", "x-", "a" * 64, "a.b", "pool\n", "p\x00"):
        with pytest.raises(Problem) as info:
            parse_pool_name(bad, "annotation ipam.dsipam.io/pool")
        assert info.value.reason == "InvalidAnnotation"
        assert "\n" not in info.value.message and "\x00" not in info.value.message


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.text(max_size=120),
                      st.lists(st.one_of(st.ip_addresses().map(str), st.text(alphabet="0123456789abcdef.:/%, ",
                                                                               max_size=40)),
                               max_size=4).map(",".join)))
def test_requested_addresses_parsing_is_total(text: str) -> None:
    """Any annotation value: a verdict (a Problem naming the annotation) or at most one address per
    family, each an address that round-trips; never another exception."""
    try:
        got = parse_requested(text, None)
    except Problem as p:
        assert p.reason in ("InvalidAnnotation", "InvalidAddress")
        assert "ipam.dsipam.io/load-balancer-ips" in p.message
        assert len(p.message) < 400
        return
    assert 1 <= len(got) <= 2
    for fam, addr in got.items():
        assert Family.of(addr) is fam
        assert ipaddress.ip_address(str(addr)) == addr


@settings(max_examples=1000, deadline=None)
@given(text=st.text(max_size=100))
def test_pool_name_parsing_is_total(text: str) -> None:
    try:
        name = parse_pool_name(text, "annotation ipam.dsipam.io/pool")
    except Problem as p:
        assert p.reason == "InvalidAnnotation" and len(p.message) < 400
        assert all(c.isprintable() for c in p.message)
    else:
        assert name == text and 1 <= len(name) <= 63 and name == name.lower()


def test_huge_values_are_refused_on_their_length() -> None:
    """A huge annotation is refused on its length (not split into 100,000 entries), and the
    message quotes a bounded piece of it."""
    huge = "198.18.0.7," * 100_000
    with pytest.raises(Problem, match=f"1100000 characters is longer than {MAX_ANNOTATION}") as info:
        parse_requested(huge, None)
    assert len(info.value.message) < 200
    with pytest.raises(Problem, match="longer than"):
        parse_requested(None, huge)
    with pytest.raises(Problem) as info:
        parse_pool_name(huge, "annotation ipam.dsipam.io/pool")
    assert len(info.value.message) < 300
