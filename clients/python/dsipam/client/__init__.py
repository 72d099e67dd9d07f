"""The Python SDK of dsipam: :class:`IpamClient` (blocking) and :class:`AsyncIpamClient` (asyncio).

>>> from dsipam.client import IpamClient
>>> with IpamClient("127.0.0.1:50051") as ipam:
...     pair = ipam.allocate("pods", "c1/eth0", policy="require").allocation
...     print(pair.ipv4, pair.ipv6)

Arguments are plain Python values (strings or :mod:`ipaddress` objects); results are frozen
dataclasses. Failures raise subclasses of :class:`IpamError` built from the gRPC status code
and the ``google.rpc.ErrorInfo`` reason. UNAVAILABLE and ABORTED are retried with backoff
within the call's deadline. The streaming RPCs (``migrate_pool``, ``watch_allocations``) return
iterators (:class:`Stream`, :class:`WatchStream`; async iterators for :class:`AsyncIpamClient`)
whose start is retried; ``follow_allocations`` is a watch that resumes by itself.

Names are imported on first use, so that ``import dsipam.client`` (and the ``dsipam`` command)
stays fast; gRPC is loaded when a client or an error class is first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._aio import AsyncIpamClient
    from ._base import DEFAULT_TIMEOUT, env_settings
    from ._channel import DEFAULT_TARGET, TlsConfig
    from ._client import IpamClient
    from ._errors import (
        ERROR_DOMAIN,
        ERROR_TABLE,
        Aborted,
        AddressAllocated,
        AddressInCooldown,
        AddressInUse,
        AllocationNotFound,
        AlreadyExists,
        Cancelled,
        Conflict,
        DatabaseUnavailable,
        DeadlineExceeded,
        FailedPrecondition,
        FamilyNotInPool,
        InternalError,
        InvalidArgument,
        IpamError,
        LimitExceeded,
        NotFound,
        Overloaded,
        OwnerHoldsOtherAddress,
        PermissionDenied,
        PoolAlreadyExists,
        PoolExhausted,
        PoolHasAllocations,
        PoolNotFound,
        PoolsOverlap,
        RangeNotAllowed,
        RangeNotFound,
        RequestReadTimeout,
        ResourceExhausted,
        ResumeTokenExpired,
        ServiceUnavailable,
        TokenReviewBusy,
        TokenReviewFailed,
        TooManyWatchStreams,
        Unauthenticated,
        Unimplemented,
        error_class,
        error_from_status,
        register_error,
    )
    from ._retry import NO_RETRY, RETRY_CODES, RetryPolicy
    from ._stream import AsyncStream, AsyncWatchStream, Stream, WatchStream
    from ._types import (
        DEFAULT_COOLDOWN,
        Address,
        AllocateResult,
        Allocation,
        Block,
        EventType,
        Family,
        FamilyUsage,
        MigrationProgress,
        NodeAffinity,
        Page,
        Policy,
        Pool,
        Range,
        ReleaseNodeResult,
        WatchEvent,
    )

_WHERE = {
    "._aio": ("AsyncIpamClient",),
    "._base": ("DEFAULT_TIMEOUT", "env_settings"),
    "._channel": ("DEFAULT_TARGET", "TlsConfig"),
    "._client": ("IpamClient",),
    "._errors": (
        "Aborted",
        "AddressAllocated",
        "AddressInCooldown",
        "AddressInUse",
        "AllocationNotFound",
        "AlreadyExists",
        "Cancelled",
        "Conflict",
        "DatabaseUnavailable",
        "DeadlineExceeded",
        "ERROR_DOMAIN",
        "ERROR_TABLE",
        "FailedPrecondition",
        "FamilyNotInPool",
        "InternalError",
        "InvalidArgument",
        "IpamError",
        "LimitExceeded",
        "NotFound",
        "OwnerHoldsOtherAddress",
        "Overloaded",
        "PermissionDenied",
        "PoolAlreadyExists",
        "PoolExhausted",
        "PoolHasAllocations",
        "PoolNotFound",
        "PoolsOverlap",
        "RangeNotFound",
        "RangeNotAllowed",
        "RequestReadTimeout",
        "ResourceExhausted",
        "ResumeTokenExpired",
        "ServiceUnavailable",
        "TokenReviewBusy",
        "TokenReviewFailed",
        "TooManyWatchStreams",
        "Unauthenticated",
        "Unimplemented",
        "error_class",
        "error_from_status",
        "register_error",
    ),
    "._retry": ("NO_RETRY", "RETRY_CODES", "RetryPolicy"),
    "._stream": ("AsyncStream", "AsyncWatchStream", "Stream", "WatchStream"),
    "._types": (
        "Address",
        "AllocateResult",
        "Allocation",
        "Block",
        "DEFAULT_COOLDOWN",
        "EventType",
        "Family",
        "FamilyUsage",
        "MigrationProgress",
        "NodeAffinity",
        "Page",
        "Policy",
        "Pool",
        "Range",
        "ReleaseNodeResult",
        "WatchEvent",
    ),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "Aborted",
    "Address",
    "AddressAllocated",
    "AddressInCooldown",
    "AddressInUse",
    "AllocateResult",
    "Allocation",
    "AllocationNotFound",
    "AlreadyExists",
    "AsyncIpamClient",
    "AsyncStream",
    "AsyncWatchStream",
    "Block",
    "Cancelled",
    "Conflict",
    "DEFAULT_COOLDOWN",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "ERROR_DOMAIN",
    "ERROR_TABLE",
    "EventType",
    "FailedPrecondition",
    "Family",
    "FamilyNotInPool",
    "FamilyUsage",
    "InternalError",
    "InvalidArgument",
    "IpamClient",
    "IpamError",
    "LimitExceeded",
    "MigrationProgress",
    "NO_RETRY",
    "NodeAffinity",
    "NotFound",
    "OwnerHoldsOtherAddress",
    "Overloaded",
    "Page",
    "PermissionDenied",
    "Policy",
    "Pool",
    "PoolAlreadyExists",
    "PoolExhausted",
    "PoolHasAllocations",
    "PoolNotFound",
    "PoolsOverlap",
    "RETRY_CODES",
    "Range",
    "RangeNotFound",
    "RangeNotAllowed",
    "ReleaseNodeResult",
    "RequestReadTimeout",
    "ResourceExhausted",
    "ResumeTokenExpired",
    "RetryPolicy",
    "ServiceUnavailable",
    "TokenReviewBusy",
    "TokenReviewFailed",
    "TooManyWatchStreams",
    "Stream",
    "TlsConfig",
    "Unauthenticated",
    "Unimplemented",
    "WatchEvent",
    "WatchStream",
    "env_settings",
    "error_class",
    "error_from_status",
    "register_error",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
