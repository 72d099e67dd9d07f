"""Address families and the Kubernetes-style family policy."""

from __future__ import annotations

import enum


class Family(enum.IntEnum):
    """An IP family; the value is the IP version."""

    IPV4 = 4
    IPV6 = 6

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.IPV4 else "IPv6"

    @property
    def bits(self) -> int:
        return 32 if self is Family.IPV4 else 128

    def other(self) -> Family:
        return Family.IPV6 if self is Family.IPV4 else Family.IPV4


class Policy(enum.Enum):
    """As Kubernetes' ipFamilyPolicy."""

    SINGLE_STACK = "SingleStack"
    PREFER_DUAL_STACK = "PreferDualStack"
    REQUIRE_DUAL_STACK = "RequireDualStack"
