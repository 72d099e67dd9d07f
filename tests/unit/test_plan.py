"""The family-policy plan of an Allocate: no database."""

import pytest

from dsipam.server.domain import Family, FamilyNotInPool, InvalidArgument, Policy, plan_allocation

V4, V6 = Family.IPV4, Family.IPV6


def plan(policy, families=(), addresses=(), pool=(V4, V6)):
    return plan_allocation(pool_families=pool, policy=policy, families=families, addresses=addresses)


def test_single_stack_defaults_to_the_pools_first_family():
    p = plan(Policy.SINGLE_STACK, pool=(V6, V4))
    assert p.wanted == (V6,) and p.required == {V6}


def test_single_stack_takes_the_first_listed_family():
    p = plan(Policy.SINGLE_STACK, families=[V6, V4])
    assert p.wanted == (V6,)


def test_require_dual_stack_orders_by_ip_families():
    p = plan(Policy.REQUIRE_DUAL_STACK, families=[V6])
    assert p.order[:2] == (V6, V4) and p.required == {V4, V6}


def test_require_dual_stack_on_a_single_family_pool_fails():
    with pytest.raises(FamilyNotInPool, match="ip_family_policy: .*no IPv6 range"):
        plan(Policy.REQUIRE_DUAL_STACK, pool=(V4,))


def test_prefer_dual_stack_wants_what_the_pool_has_and_requires_nothing():
    p = plan(Policy.PREFER_DUAL_STACK, pool=(V4,))
    assert p.wanted == (V4,) and p.required == frozenset()
    p = plan(Policy.PREFER_DUAL_STACK)
    assert p.wanted == (V4, V6)


def test_duplicate_family_in_addresses_is_refused():
    with pytest.raises(InvalidArgument, match=r"addresses\[1\]: a second IPv4 address"):
        plan(Policy.REQUIRE_DUAL_STACK, addresses=["198.18.0.5", "198.18.0.6"])


def test_duplicate_ip_family_is_refused():
    with pytest.raises(InvalidArgument, match=r"ip_families\[1\]: IPv4 is listed twice"):
        plan(Policy.REQUIRE_DUAL_STACK, families=[V4, V4])


def test_address_of_the_wrong_family_for_single_stack():
    with pytest.raises(InvalidArgument, match=r"addresses\[0\]: fd00::5 is IPv6 but ip_families asks for IPv4"):
        plan(Policy.SINGLE_STACK, families=[V4], addresses=["fd00::5"])


def test_single_stack_family_missing_from_pool():
    with pytest.raises(FamilyNotInPool, match="no IPv6 range"):
        plan(Policy.SINGLE_STACK, families=[V6], pool=(V4,))


def test_specific_address_picks_the_single_stack_family():
    p = plan(Policy.SINGLE_STACK, addresses=["fd00::9"])
    assert p.wanted == (V6,) and str(p.addresses[V6]) == "fd00::9"


def test_attribute_maps_are_bounded_in_count_and_bytes():
    from dsipam.server.domain import check_map

    assert check_map({"node": "n1"}, "attributes") == {"node": "n1"}
    with pytest.raises(InvalidArgument, match=r"attributes: 65 entries"):
        check_map({f"k{i}": "v" for i in range(65)}, "attributes")
    with pytest.raises(InvalidArgument, match=r"attributes: \d+ bytes in all is more than 16384"):
        check_map({f"k{i}": "é" * 500 for i in range(20)}, "attributes")
    with pytest.raises(InvalidArgument, match=r"value longer than 1024"):
        check_map({"k": "x" * 1025}, "attributes")
