"""Validation of names, owners, labels and attributes, and the allocation plan."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._errors import FamilyNotInPool, InvalidArgument
from ._family import Family, Policy
from ._ranges import IPAddress, family_of, parse_address

_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")  # \Z: "$" also matches before a final newline
_NETWORK_NAME = re.compile(r"^[a-z0-9]([-.a-z0-9]{0,126}[a-z0-9])?\Z")
MAX_OWNER = 253
MAX_ATTRIBUTES = 64
MAX_KEY = 253
MAX_VALUE = 1024
MAX_MAP_BYTES = 16 * 1024  # all keys and values of one map, in UTF-8


def _printable_ascii_no_space(value: str) -> bool:
    """Every character in 0x21-0x7E (string methods in C: this runs on every Allocate)."""
    return value.isascii() and value.isprintable() and " " not in value


def check_pool_name(name: str, where: str = "pool") -> str:
    if not name:
        raise InvalidArgument(f"{where}: required", field=where)
    if len(name) > 63 or not _POOL_NAME.match(name):
        raise InvalidArgument(
            f"{where}: {name[:80]!r} is not a lowercase DNS label (1-63 of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit)",
            field=where,
        )
    return name


def check_network(network: str, where: str = "pool.network") -> str:
    """An address space: "" (the default network) or 1-128 of a-z, 0-9, '-' and '.', starting and
    ending with a letter or digit. Pools in one network never overlap."""
    if network and (len(network) > 128 or not _NETWORK_NAME.match(network)):
        raise InvalidArgument(
            f"{where}: {network[:80]!r} is not a network name (empty for the default network, or 1-128 of "
            "a-z, 0-9, '-' and '.', starting and ending with a letter or digit)",
            field=where,
        )
    if network == "default":
        # Written out, "default" would be a network of its own beside the default network "", and
        # an operator who means the default would get overlapping pools.
        raise InvalidArgument(
            f"{where}: 'default' is reserved; leave the network empty for the default network",
            field=where,
        )
    return network


def check_owner(owner: str, where: str = "owner") -> str:
    if not owner:
        raise InvalidArgument(f"{where}: required", field=where)
    if len(owner) > MAX_OWNER:
        raise InvalidArgument(f"{where}: {len(owner)} characters is longer than {MAX_OWNER}", field=where)
    if not _printable_ascii_no_space(owner):
        raise InvalidArgument(f"{where}: must be printable ASCII without spaces", field=where)
    return owner


def check_node(node: str, where: str = "node") -> str:
    """A node name: empty (no affinity) or 1-253 printable ASCII characters without spaces."""
    if len(node) > 253:
        raise InvalidArgument(f"{where}: {len(node)} characters is longer than 253", field=where)
    if node and not _printable_ascii_no_space(node):
        raise InvalidArgument(f"{where}: must be printable ASCII without spaces", field=where)
    return node


def check_map(values: Mapping[str, str], where: str) -> dict[str, str]:
    if len(values) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"{where}: {len(values)} entries is more than {MAX_ATTRIBUTES}", field=where)
    for key, value in values.items():
        if not key or len(key) > MAX_KEY:
            raise InvalidArgument(f"{where}: key {key[:40]!r} must be 1-{MAX_KEY} characters", field=where)
        if len(value) > MAX_VALUE:
            raise InvalidArgument(f"{where}[{key!r}]: value longer than {MAX_VALUE} characters", field=where)
        if "\x00" in key or "\x00" in value:
            raise InvalidArgument(f"{where}[{key!r}]: NUL characters are not allowed", field=where)
    total = sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
                for k, v in values.items())
    if total > MAX_MAP_BYTES:
        raise InvalidArgument(f"{where}: {total} bytes in all is more than {MAX_MAP_BYTES}", field=where)
    return dict(values)


@dataclass(frozen=True)
class AllocationPlan:
    """What an Allocate asks for, before looking at what the owner holds."""

    order: tuple[Family, ...]  # families in response order (primary first)
    required: frozenset[Family]  # must be given, or the call fails
    wanted: tuple[Family, ...]  # families to hold afterwards, in order
    addresses: dict[Family, IPAddress]  # specific addresses asked for


def plan_allocation(
    *,
    pool_families: Sequence[Family],
    policy: Policy,
    families: Sequence[Family],
    addresses: Sequence[str],
) -> AllocationPlan:
    """Turns policy, families and specific addresses into an :class:`AllocationPlan`.

    ``pool_families`` is the pool's families in range order (first range first).
    """
    seen: set[Family] = set()
    for i, fam in enumerate(families):
        if fam in seen:
            raise InvalidArgument(f"ip_families[{i}]: {fam.label} is listed twice", field=f"ip_families[{i}]")
        seen.add(fam)

    specific: dict[Family, IPAddress] = {}
    for i, text in enumerate(addresses):
        addr = parse_address(text, f"addresses[{i}]")
        fam = family_of(addr)
        if fam in specific:
            raise InvalidArgument(
                f"addresses[{i}]: a second {fam.label} address ({addr}); at most one per family",
                field=f"addresses[{i}]",
            )
        if families and fam not in families and policy is Policy.SINGLE_STACK:
            raise InvalidArgument(
                f"addresses[{i}]: {addr} is {fam.label} but ip_families asks for {families[0].label}",
                field=f"addresses[{i}]",
            )
        specific[fam] = addr

    if families:
        order = list(families)
    elif specific and policy is Policy.SINGLE_STACK:
        order = list(specific)
    else:
        order = list(pool_families)
    for fam in specific:
        if fam not in order:
            order.append(fam)
    for fam in pool_families:
        if fam not in order:
            order.append(fam)
    if not order:
        raise FamilyNotInPool("pool: has no ranges", field="pool")

    if policy is Policy.SINGLE_STACK:
        primary = order[0]
        if len(specific) > 1:
            raise InvalidArgument(
                "addresses: SINGLE_STACK takes one address, but one per family was given", field="addresses"
            )
        for i, fam in enumerate(specific):
            if fam is not primary:
                raise InvalidArgument(
                    f"addresses[{i}]: {specific[fam]} is {fam.label} but the single family is {primary.label}",
                    field=f"addresses[{i}]",
                )
        if primary not in pool_families:
            raise FamilyNotInPool(f"ip_families[0]: the pool has no {primary.label} range", field="ip_families")
        return AllocationPlan(tuple(order), frozenset({primary}), (primary,), specific)

    both = tuple(f for f in order if f in (Family.IPV4, Family.IPV6))[:2]
    if policy is Policy.REQUIRE_DUAL_STACK:
        for fam in (Family.IPV4, Family.IPV6):
            if fam not in pool_families:
                raise FamilyNotInPool(
                    f"ip_family_policy: REQUIRE_DUAL_STACK but the pool has no {fam.label} range",
                    field="ip_family_policy",
                )
        return AllocationPlan(tuple(order), frozenset(both), both, specific)

    # PREFER_DUAL_STACK: every family the pool has; specific addresses are required.
    wanted = tuple(f for f in both if f in pool_families)
    for fam in specific:
        if fam not in pool_families:
            raise FamilyNotInPool(f"addresses: the pool has no {fam.label} range", field="addresses")
    return AllocationPlan(tuple(order), frozenset(specific), wanted, specific)
