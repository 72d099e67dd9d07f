"""LoadBalancer Services: the pure decisions (no I/O), unit-tested on their own.

Which Services are dsipam's, how annotations are read (strictly, at bounded cost: every annotation
is written by whoever may edit the Service or its namespace), which families a Service gets from
a pool under Kubernetes' ``ipFamilyPolicy`` rules, what to release and allocate to get from what
the owner holds to that, and the ``status.loadBalancer.ingress`` that says so.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from dsipam.client import Family

LB_CLASS = "ipam.dsipam.io/lb"
POOL_ANNOTATION = "ipam.dsipam.io/pool"
IPS_ANNOTATION = "ipam.dsipam.io/load-balancer-ips"
MOVE_ANNOTATION = "ipam.dsipam.io/allow-pool-change"  # "true": a change of pool moves the Service
SERVICE_FINALIZER = "ipam.dsipam.io/load-balancer"
CONDITION = "ipam.dsipam.io/AddressesAllocated"
POOL_SERVICES_LABEL = "ipam.dsipam.io/services"  # on a dsipam pool: "allowed" or "default"
OWNER_PREFIX = "svc/"
KIND_ATTRIBUTE = "k8s.kind"
KIND_SERVICE = "Service"
CLUSTER_ATTRIBUTE = "k8s.cluster"  # the id of the cluster whose controller made the allocation
ANNOTATIONS = (POOL_ANNOTATION, IPS_ANNOTATION, MOVE_ANNOTATION)
MAX_ANNOTATION = 256  # longer values are refused without being parsed

_POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IP_CHARS = re.compile(r"[0-9a-fA-F.:]{2,45}")
POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")
FAMILY_OF_NAME = {"IPv4": Family.IPV4, "IPv6": Family.IPV6}
NAME_OF_FAMILY = {Family.IPV4: "IPv4", Family.IPV6: "IPv6"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Problem(Exception):  # noqa: N818 - a verdict about a Service, not a failure of the controller
    """Why a Service cannot get (all) its addresses: an Event and the condition's reason and message.

    ``retry``: it may pass without any change to the Service (an address freed, a pool created)."""

    def __init__(self, reason: str, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


def _shown(value: str, limit: int = 64) -> str:
    """A value quoted for a message: bounded, and without control characters."""
    text = value[:limit]
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text) + ("..." if len(value) > limit else "")


def is_ours(spec: dict, lb_class: str, default_implementation: bool) -> bool:
    """A LoadBalancer Service of dsipam's class, or of no class when dsipam is the cluster's default."""
    if spec.get("type") != "LoadBalancer":
        return False
    cls = spec.get("loadBalancerClass")
    return cls == lb_class if cls else default_implementation


def owner_of(namespace: str, name: str, uid: str) -> str:
    return f"{OWNER_PREFIX}{namespace}/{name}/{uid}"


def uid_of_owner(owner: str) -> str | None:
    """The Service UID of an owner key ``svc/<namespace>/<name>/<uid>``, or None for any other owner."""
    if not owner.startswith(OWNER_PREFIX):
        return None
    parts = owner[len(OWNER_PREFIX):].split("/")
    return parts[2] if len(parts) == 3 and all(parts) else None


def parse_pool_name(value: str, where: str) -> str:
    if len(value) > 63 or not _POOL_NAME.fullmatch(value):
        raise Problem("InvalidAnnotation", f"{where}: {_shown(value)} is not a pool name (a lowercase DNS label "
                                           "of 1-63 characters: a-z, 0-9 and '-')")
    return value


def parse_ip(text: str, where: str) -> IPAddress:
    """One address, strictly: no prefix, zone, IPv4-mapped IPv6 or leading zeros."""
    if not _IP_CHARS.fullmatch(text):
        raise Problem("InvalidAddress", f"{where}: {_shown(text)} is not an IP address")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise Problem("InvalidAddress", f"{where}: {_shown(text)} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise Problem("InvalidAddress", f"{where}: {text} is an IPv4-mapped IPv6 address; write the IPv4 "
                                        "address itself")
    return addr


def parse_requested(annotation: str | None, load_balancer_ip: str | None) -> dict[Family, IPAddress]:
    """The addresses a Service asks for, by family: the annotation ``ipam.dsipam.io/load-balancer-ips``
    ("a" or "a,b", one per family), else the deprecated ``spec.loadBalancerIP`` (one address)."""
    if annotation is not None:
        where = f"annotation {IPS_ANNOTATION}"
        if len(annotation) > MAX_ANNOTATION:
            raise Problem("InvalidAnnotation", f"{where}: {len(annotation)} characters is longer than "
                                               f"{MAX_ANNOTATION}")
        parts = [p.strip() for p in annotation.split(",")]
        if len(parts) > 2:
            raise Problem("InvalidAnnotation", f"{where}: {len(parts)} addresses; at most two (one per family)")
        if not all(parts):
            raise Problem("InvalidAnnotation", f"{where}: {_shown(annotation)} has an empty entry")
    elif load_balancer_ip:
        where = "spec.loadBalancerIP"
        if len(load_balancer_ip) > MAX_ANNOTATION:
            raise Problem("InvalidAddress", f"{where}: {len(load_balancer_ip)} characters is longer than "
                                            f"{MAX_ANNOTATION}")
        parts = [load_balancer_ip.strip()]
    else:
        return {}
    out: dict[Family, IPAddress] = {}
    for i, text in enumerate(parts):
        addr = parse_ip(text, f"{where}[{i}]" if len(parts) > 1 else where)
        fam = Family.of(addr)
        if fam in out:
            raise Problem("InvalidAnnotation", f"{where}: two {fam.label} addresses ({out[fam]}, {addr}); "
                                               "at most one per family")
        out[fam] = addr
    return out


def service_families(spec: dict) -> tuple[str, tuple[Family, ...]]:
    """``spec.ipFamilyPolicy`` and ``spec.ipFamilies`` as the API server stored them."""
    policy = spec.get("ipFamilyPolicy") or "SingleStack"
    if policy not in POLICIES:
        raise Problem("InvalidSpec", f"spec.ipFamilyPolicy: {_shown(str(policy))} is not one of {', '.join(POLICIES)}")
    names = spec.get("ipFamilies") or ()
    if not isinstance(names, list) or not 1 <= len(names) <= 2:
        raise Problem("InvalidSpec", "spec.ipFamilies: the API server lists one or two families; got "
                                     f"{_shown(str(names))}")
    fams: list[Family] = []
    for n in names:
        if n not in FAMILY_OF_NAME or FAMILY_OF_NAME[n] in fams:
            raise Problem("InvalidSpec", f"spec.ipFamilies: {_shown(str(names))} is not IPv4 and/or IPv6, each once")
        fams.append(FAMILY_OF_NAME[n])
    return policy, tuple(fams)


@dataclass(frozen=True)
class Want:
    """What a Service should hold in its pool."""

    order: tuple[Family, ...]  # the families, in ipFamilies order (primary first)
    optional: frozenset[Family] = frozenset()  # PreferDualStack's secondary: held when free
    addresses: dict[Family, IPAddress] = field(default_factory=dict)  # asked for by the Service

    @property
    def primary(self) -> Family:
        return self.order[0]


def plan(policy: str, families: tuple[Family, ...], pool: str, pool_families: tuple[Family, ...],
         requested: dict[Family, IPAddress]) -> Want:
    """The families a Service gets from a pool, as Kubernetes defines them for ClusterIPs:

    - SingleStack: the primary family (``ipFamilies[0]``) only;
    - PreferDualStack: both families where the pool has both (the secondary while one is free),
      else the primary;
    - RequireDualStack: both families, or nothing.

    A requested address must be of a family the Service gets; it makes that family required."""
    primary = families[0]
    for fam, addr in requested.items():
        allowed = families[:1] if policy == "SingleStack" else families
        if fam not in allowed:
            what = (f"the Service is SingleStack {primary.label}" if policy == "SingleStack"
                    else f"spec.ipFamilies is {', '.join(f.label for f in families)}")
            raise Problem("InvalidAddress", f"requested address {addr} is {fam.label}, but {what}")
    if primary not in pool_families:
        raise Problem("FamilyNotInPool", f"pool {pool} has no {primary.label} range (the Service's primary family)",
                      retry=True)
    if policy == "SingleStack" or len(families) == 1:
        if policy == "RequireDualStack":
            raise Problem("InvalidSpec", "spec.ipFamilies: RequireDualStack with one family")
        return Want((primary,), frozenset(), dict(requested))
    secondary = families[1]
    if secondary not in pool_families:
        if policy == "RequireDualStack":
            raise Problem("FamilyNotInPool", f"pool {pool} has no {secondary.label} range, and the Service is "
                                             "RequireDualStack", retry=True)
        if secondary in requested:
            raise Problem("FamilyNotInPool", f"pool {pool} has no {secondary.label} range for the requested address "
                                             f"{requested[secondary]}", retry=True)
        return Want((primary,), frozenset(), dict(requested))
    optional = frozenset({secondary}) if policy == "PreferDualStack" and secondary not in requested else frozenset()
    return Want((primary, secondary), optional, dict(requested))


@dataclass(frozen=True)
class Changes:
    release: tuple[Family, ...]  # families the owner holds and must give back first
    allocate: tuple[Family, ...]  # families to take (in the Service's order)


def changes(want: Want, held: dict[Family, IPAddress]) -> Changes:
    """From what the owner holds in its pool to ``want``: families the Service no longer has (a
    downgrade to SingleStack) and addresses other than the requested ones are released; the
    families it lacks are taken. The primary address is never touched while it is wanted."""
    release = [f for f in sorted(held) if f not in want.order
               or (f in want.addresses and want.addresses[f] != held[f])]
    allocate = [f for f in want.order if f not in held or f in release]
    return Changes(tuple(release), tuple(allocate))


def ingress(want_order: tuple[Family, ...], held: dict[Family, IPAddress]) -> list[dict[str, str]]:
    """``status.loadBalancer.ingress``: the held addresses in ipFamilies order, primary first."""
    return [{"ip": str(held[f]), "ipMode": "VIP"} for f in want_order if f in held]


def pool_choice(svc_annotation: str | None, ns_annotation: str | None, default_pool: str | None,
                namespace: str) -> tuple[str, str]:
    """(pool, where it came from): the Service's annotation, else its namespace's, else the default."""
    if svc_annotation is not None:
        return parse_pool_name(svc_annotation, f"annotation {POOL_ANNOTATION}"), "annotation"
    if ns_annotation is not None:
        return parse_pool_name(ns_annotation, f"namespace {namespace}'s annotation {POOL_ANNOTATION}"), "namespace"
    if default_pool:
        return default_pool, "default"
    raise Problem("NoPool", f"no pool: annotate the Service or its namespace with {POOL_ANNOTATION}, or mark an IPPool "
                            "spec.services: Default", retry=True)


def truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"
