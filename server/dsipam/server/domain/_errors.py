"""Domain errors.

Each error has a stable ``reason`` (sent as ``google.rpc.ErrorInfo.reason``) and a
message that names the field or resource at fault. The one table that maps these
classes to gRPC status codes is ``dsipam.server.rpc.errors``.
"""

from __future__ import annotations


class IpamError(Exception):
    """Base of every error the service reports to a caller."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(IpamError):
    reason = "INVALID_ARGUMENT"


class NotFound(IpamError):
    reason = "NOT_FOUND"


class PoolNotFound(NotFound):
    reason = "POOL_NOT_FOUND"


class AllocationNotFound(NotFound):
    reason = "ALLOCATION_NOT_FOUND"


class AlreadyExists(IpamError):
    reason = "ALREADY_EXISTS"


class PoolAlreadyExists(AlreadyExists):
    reason = "POOL_ALREADY_EXISTS"


class AddressInUse(AlreadyExists):
    reason = "ADDRESS_IN_USE"


class FailedPrecondition(IpamError):
    reason = "FAILED_PRECONDITION"


class PoolHasAllocations(FailedPrecondition):
    reason = "POOL_HAS_ALLOCATIONS"


class FamilyNotInPool(FailedPrecondition):
    reason = "FAMILY_NOT_IN_POOL"


class OwnerHoldsOtherAddress(FailedPrecondition):
    reason = "OWNER_HOLDS_OTHER_ADDRESS"


class AddressInCooldown(FailedPrecondition):
    reason = "ADDRESS_IN_COOLDOWN"


class AddressAllocated(FailedPrecondition):
    """A reservation or range removal would hit allocated addresses."""

    reason = "ADDRESS_ALLOCATED"


class PoolsOverlap(FailedPrecondition):
    """A range overlaps a range of another pool in the same network."""

    reason = "POOLS_OVERLAP"


class RangeNotFound(NotFound):
    reason = "RANGE_NOT_FOUND"


class ResumeTokenExpired(FailedPrecondition):
    reason = "RESUME_TOKEN_EXPIRED"


class PermissionDenied(IpamError):
    """The caller's identity may call the method, but not on this object (a shim and another
    node's allocation). The message names no other caller's owner or node."""

    reason = "PERMISSION_DENIED"


class PoolExhausted(IpamError):
    reason = "POOL_EXHAUSTED"


class LimitExceeded(IpamError):
    """A per-pool bound set by the operator (excludes, reservations) would be passed: nothing
    was changed. The message and ``metadata["limit"]`` name the setting."""

    reason = "LIMIT_EXCEEDED"


class Conflict(IpamError):
    """A transaction lost a race too many times; the caller may retry."""

    reason = "CONFLICT"


class DatabaseUnavailable(IpamError):
    reason = "DATABASE_UNAVAILABLE"
