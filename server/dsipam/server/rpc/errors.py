"""The one table from domain error to gRPC status, with google.rpc.ErrorInfo details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import domain

log = logging.getLogger("dsipam.rpc")

ERROR_DOMAIN = "dsipam.io"

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[domain.IpamError], grpc.StatusCode], ...] = (
    (domain.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (domain.NotFound, grpc.StatusCode.NOT_FOUND),
    (domain.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (domain.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (domain.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (domain.PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (domain.Conflict, grpc.StatusCode.ABORTED),
    (domain.DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: domain.IpamError) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for ``exc``; unknown errors become INTERNAL without internals."""
    if isinstance(exc, domain.IpamError):
        code = status_for(exc)
        status = to_grpc_status(code, exc.message, exc.reason, exc.metadata)
    else:
        log.exception("internal error", exc_info=exc)
        status = to_grpc_status(grpc.StatusCode.INTERNAL, "internal error; see the server log", "INTERNAL", {})
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
