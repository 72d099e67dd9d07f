"""The exception hierarchy of the SDK and the one table that maps a gRPC status to it.

Every error the service reports carries a ``google.rpc.ErrorInfo`` detail (domain
``dsipam.io``) with a stable ``reason``. :func:`error_from_status` picks the class
registered for ``(status code, reason)``; when the reason is unknown (a newer server)
or missing (a channel failure) it falls back on the class registered for the status
code alone, and finally on :class:`IpamError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "dsipam.io"
"""The ``ErrorInfo.domain`` of the errors the dsipam service reports."""

_DETAILS_KEY = "grpc-status-details-bin"


class IpamError(Exception):
    """Base of every error the SDK raises.

    Attributes:
        message: the server's message (it names the field or resource at fault), or the
            SDK's own message for errors found before a call is made.
        code: the gRPC status code.
        reason: the stable ``ErrorInfo.reason`` such as ``"POOL_NOT_FOUND"``; empty when the
            status carried no ``ErrorInfo`` (for example a channel failure).
        domain: the ``ErrorInfo.domain`` (``"dsipam.io"``), or empty.
        metadata: the ``ErrorInfo.metadata``, such as ``{"field": "pool", "pool": "pods"}``.
        attempts: how many times the call was tried (retries included); 0 when the error was
            found before calling the server.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    """The status code this class stands for (instances carry the actual one)."""
    reason: str = ""
    """The ``ErrorInfo.reason`` this class stands for (instances carry the actual one)."""
    retryable: bool = False
    """Whether the SDK retries a call that failed with this error."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.attempts = attempts

    @property
    def field(self) -> str | None:
        """The request field at fault, when the server named one (``ErrorInfo.metadata["field"]``)."""
        return self.metadata.get("field")

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


class InvalidArgument(IpamError, ValueError):
    """The request is malformed: a bad name, owner, CIDR, address or option (never retried)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class RangeNotAllowed(InvalidArgument):
    """A range the server's range policy does not allow (the message says which rule, such as
    a range outside the allowed prefixes or one too large)."""

    reason = "RANGE_NOT_ALLOWED"


class NotFound(IpamError):
    """Something named in the request does not exist (never retried)."""

    code = grpc.StatusCode.NOT_FOUND


class PoolNotFound(NotFound):
    """The pool does not exist."""

    reason = "POOL_NOT_FOUND"


class AllocationNotFound(NotFound):
    """The owner holds nothing in the pool."""

    reason = "ALLOCATION_NOT_FOUND"


class RangeNotFound(NotFound):
    """The pool has no range with that CIDR."""

    reason = "RANGE_NOT_FOUND"


class AlreadyExists(IpamError):
    """Something the request would create exists already (never retried)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PoolAlreadyExists(AlreadyExists):
    """A pool of that name exists already."""

    reason = "POOL_ALREADY_EXISTS"


class AddressInUse(AlreadyExists):
    """The specific address asked for is held by another owner."""

    reason = "ADDRESS_IN_USE"


class FailedPrecondition(IpamError):
    """The request is valid but the current state refuses it (never retried)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PoolHasAllocations(FailedPrecondition):
    """The pool still holds allocations; delete it with ``force=True`` to release them too."""

    reason = "POOL_HAS_ALLOCATIONS"


class FamilyNotInPool(FailedPrecondition):
    """A family was asked for that the pool has no range of."""

    reason = "FAMILY_NOT_IN_POOL"


class OwnerHoldsOtherAddress(FailedPrecondition):
    """The owner already holds a different address of that family than the one asked for."""

    reason = "OWNER_HOLDS_OTHER_ADDRESS"


class AddressInCooldown(FailedPrecondition):
    """The address was released recently and waits for the pool's cooldown to pass."""

    reason = "ADDRESS_IN_COOLDOWN"


class AddressAllocated(FailedPrecondition):
    """A reservation or a range removal would hit addresses that are allocated."""

    reason = "ADDRESS_ALLOCATED"


class ResumeTokenExpired(FailedPrecondition):
    """A watch's resume token is older than the events the server keeps; list and watch anew."""

    reason = "RESUME_TOKEN_EXPIRED"


class PoolsOverlap(FailedPrecondition):
    """A range overlaps a range of another pool in the same network (``metadata["pool"]`` and
    ``metadata["cidr"]`` name it): give the pool another range, or another network."""

    reason = "POOLS_OVERLAP"


class ResourceExhausted(IpamError):
    """A resource ran out (never retried: retrying does not free anything)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PoolExhausted(ResourceExhausted):
    """The pool has no free address of a family that the request requires."""

    reason = "POOL_EXHAUSTED"


class LimitExceeded(ResourceExhausted):
    """A per-pool bound set by the operator would be passed (``metadata["limit"]`` names the
    setting, such as DSIPAM_MAX_EXCLUDES_PER_POOL); nothing was changed."""

    reason = "LIMIT_EXCEEDED"


class TooManyWatchStreams(ResourceExhausted):
    """The server already serves as many watch streams as it may, in all or for this caller
    (``metadata["bound"]`` names the setting, DSIPAM_MAX_WATCH_STREAMS or
    DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY, and ``metadata["limit"]`` its value). Not retried by
    the SDK, like every RESOURCE_EXHAUSTED: close streams you no longer read, or retry later or
    on another replica."""

    reason = "TOO_MANY_WATCH_STREAMS"


class Aborted(IpamError):
    """The operation lost a race; the SDK retries it."""

    code = grpc.StatusCode.ABORTED
    retryable = True


class Conflict(Aborted):
    """The server's transaction lost a race with concurrent writers too many times."""

    reason = "CONFLICT"


class ServiceUnavailable(IpamError):
    """The service cannot be reached or cannot reach its database; the SDK retries it."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DatabaseUnavailable(ServiceUnavailable):
    """The server is up but its database is unreachable."""

    reason = "DATABASE_UNAVAILABLE"


class Overloaded(ServiceUnavailable):
    """The server has as many calls in flight as it takes (its max_concurrent_rpcs,
    ``metadata["limit"]``); the SDK retries with backoff."""

    reason = "OVERLOADED"


class TokenReviewBusy(ServiceUnavailable):
    """The server reviews new Kubernetes tokens at a bounded rate and this one has to wait its
    turn (kubernetes.reviewsPerSecond); the SDK retries with backoff."""

    reason = "TOKEN_REVIEW_BUSY"


class TokenReviewFailed(ServiceUnavailable):
    """The Kubernetes API server did not answer the server's TokenReview of this token; the
    SDK retries with backoff."""

    reason = "TOKEN_REVIEW_FAILED"


class DeadlineExceeded(IpamError):
    """The call did not finish before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestReadTimeout(DeadlineExceeded):
    """The server did not receive the call's request message within its request_read_seconds
    (a client that opened the call and stalled)."""

    reason = "REQUEST_READ_TIMEOUT"


class Cancelled(IpamError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(IpamError):
    """The server did not accept the credentials (token or client certificate)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(IpamError):
    """The caller is known but its role does not allow this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unimplemented(IpamError):
    """The server does not know this RPC (it is older than the SDK)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(IpamError):
    """The server failed unexpectedly; its log says why."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


ErrorClass = type[IpamError]

# The one table. A row of (status code, reason, class); reason None is the fallback for
# the code. Extend it (or call register_error) when the service gains reasons or codes.
_S = grpc.StatusCode
ERROR_TABLE: tuple[tuple[grpc.StatusCode, str | None, ErrorClass], ...] = (
    (_S.INVALID_ARGUMENT, None, InvalidArgument),
    (_S.INVALID_ARGUMENT, "INVALID_ARGUMENT", InvalidArgument),
    (_S.INVALID_ARGUMENT, "RANGE_NOT_ALLOWED", RangeNotAllowed),
    (_S.NOT_FOUND, None, NotFound),
    (_S.NOT_FOUND, "POOL_NOT_FOUND", PoolNotFound),
    (_S.NOT_FOUND, "ALLOCATION_NOT_FOUND", AllocationNotFound),
    (_S.NOT_FOUND, "RANGE_NOT_FOUND", RangeNotFound),
    (_S.ALREADY_EXISTS, None, AlreadyExists),
    (_S.ALREADY_EXISTS, "POOL_ALREADY_EXISTS", PoolAlreadyExists),
    (_S.ALREADY_EXISTS, "ADDRESS_IN_USE", AddressInUse),
    (_S.FAILED_PRECONDITION, None, FailedPrecondition),
    (_S.FAILED_PRECONDITION, "POOL_HAS_ALLOCATIONS", PoolHasAllocations),
    (_S.FAILED_PRECONDITION, "FAMILY_NOT_IN_POOL", FamilyNotInPool),
    (_S.FAILED_PRECONDITION, "OWNER_HOLDS_OTHER_ADDRESS", OwnerHoldsOtherAddress),
    (_S.FAILED_PRECONDITION, "ADDRESS_IN_COOLDOWN", AddressInCooldown),
    (_S.FAILED_PRECONDITION, "ADDRESS_ALLOCATED", AddressAllocated),
    (_S.FAILED_PRECONDITION, "RESUME_TOKEN_EXPIRED", ResumeTokenExpired),
    (_S.FAILED_PRECONDITION, "POOLS_OVERLAP", PoolsOverlap),
    (_S.RESOURCE_EXHAUSTED, None, ResourceExhausted),
    (_S.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", PoolExhausted),
    (_S.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", LimitExceeded),
    (_S.RESOURCE_EXHAUSTED, "TOO_MANY_WATCH_STREAMS", TooManyWatchStreams),
    (_S.ABORTED, None, Aborted),
    (_S.ABORTED, "CONFLICT", Conflict),
    (_S.UNAVAILABLE, None, ServiceUnavailable),
    (_S.UNAVAILABLE, "DATABASE_UNAVAILABLE", DatabaseUnavailable),
    (_S.UNAVAILABLE, "OVERLOADED", Overloaded),
    (_S.UNAVAILABLE, "TOKEN_REVIEW_BUSY", TokenReviewBusy),
    (_S.UNAVAILABLE, "TOKEN_REVIEW_FAILED", TokenReviewFailed),
    (_S.DEADLINE_EXCEEDED, None, DeadlineExceeded),
    (_S.DEADLINE_EXCEEDED, "REQUEST_READ_TIMEOUT", RequestReadTimeout),
    (_S.CANCELLED, None, Cancelled),
    (_S.UNAUTHENTICATED, None, Unauthenticated),
    (_S.UNAUTHENTICATED, "UNAUTHENTICATED", Unauthenticated),
    (_S.PERMISSION_DENIED, None, PermissionDenied),
    (_S.PERMISSION_DENIED, "PERMISSION_DENIED", PermissionDenied),
    (_S.UNIMPLEMENTED, None, Unimplemented),
    (_S.INTERNAL, None, InternalError),
    (_S.INTERNAL, "INTERNAL", InternalError),
)

"""The mapping, one row per (status code, reason); a reason of None is the code's fallback."""

_LOOKUP: dict[tuple[grpc.StatusCode, str | None], ErrorClass] = {(c, r): cls for c, r, cls in ERROR_TABLE}


def register_error(code: grpc.StatusCode, reason: str | None, cls: ErrorClass) -> None:
    """Adds a row to the table: statuses with ``code`` and ``reason`` become ``cls``."""
    _LOOKUP[(code, reason)] = cls


def error_class(code: grpc.StatusCode, reason: str | None) -> ErrorClass:
    """The class for a status: by ``(code, reason)``, else by ``code``, else :class:`IpamError`."""
    if reason:
        cls = _LOOKUP.get((code, reason))
        if cls is not None:
            return cls
    return _LOOKUP.get((code, None), IpamError)


def _error_info(trailing_metadata: Iterable[Any] | None) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:  # a garbled trailer (bytes that are not a Status, or an ErrorInfo that does not parse) is no detail
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):  # False when the detail is of another type
                    return info
        except DecodeError:
            return None
    return None


def error_from_status(
    code: grpc.StatusCode,
    details: str | None,
    trailing_metadata: Iterable[Any] | None,
    *,
    attempts: int = 1,
) -> IpamError:
    """Builds the exception for a failed call from its status code, message and trailers."""
    info = _error_info(trailing_metadata)
    reason = info.reason if info is not None else ""
    cls = error_class(code, reason)
    message = details or code.name
    return cls(
        message,
        code=code,
        reason=reason,
        domain=info.domain if info is not None else "",
        metadata=dict(info.metadata) if info is not None else {},
        attempts=attempts,
    )


def error_from_rpc(exc: grpc.RpcError, *, attempts: int = 1) -> IpamError:
    """Builds the exception for a :class:`grpc.RpcError` (sync or ``grpc.aio``)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    return error_from_status(code, details, trailers, attempts=attempts)
