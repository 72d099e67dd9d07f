"""The one table from domain error to gRPC status, with google.rpc.ErrorInfo details.

Every status the service sends is built by :func:`to_grpc_status`, which bounds what it
carries: a message may echo the caller's input (an address, an owner), and gRPC refuses
response metadata past its limit (the client would see RESOURCE_EXHAUSTED "received metadata
size exceeds hard limit" instead of the real answer). A word longer than
:data:`MAX_ECHO_CHARS` is cut and its length given; the whole message is cut at
:data:`MAX_MESSAGE_BYTES` UTF-8 bytes; the ErrorInfo keeps at most :data:`MAX_METADATA_ENTRIES`
entries of bounded keys and values. The status message travels twice (``grpc-message``,
percent-encoded, and inside ``grpc-status-details-bin``, base64), so both stay far below the
8 KiB default metadata limit of gRPC clients.
"""

from __future__ import annotations

import logging
import re

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import domain

log = logging.getLogger("dsipam.rpc")

ERROR_DOMAIN = "dsipam.io"

MAX_ECHO_CHARS = 96
"""A run of non-blank characters (an echoed value) longer than this is cut to its start and its length."""
MAX_MESSAGE_BYTES = 1024
"""The most UTF-8 bytes of a status message."""
MAX_METADATA_ENTRIES = 16
MAX_METADATA_CHARS = 128
"""ErrorInfo metadata: at most this many entries; keys and values cut like echoed values."""

_LONG_WORD = re.compile(r"\S{" + str(MAX_ECHO_CHARS + 1) + ",}")
_KEEP = 40  # characters kept of a cut value


def _cut_word(match: re.Match[str]) -> str:
    word = match.group(0)
    return f"{word[:_KEEP]}...[{len(word)} characters]"


def bound_text(text: str, max_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` with every over-long word cut (its length given) and at most ``max_bytes`` UTF-8 bytes."""
    if len(text) > MAX_ECHO_CHARS:
        text = _LONG_WORD.sub(_cut_word, text)
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return text
    suffix = f"... [message cut: {len(raw)} bytes]"
    head = raw[: max_bytes - len(suffix)].decode("utf-8", "ignore")
    return head + suffix


def bound_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """At most :data:`MAX_METADATA_ENTRIES` entries, keys and values cut at :data:`MAX_METADATA_CHARS`."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if len(out) >= MAX_METADATA_ENTRIES:
            out["truncated"] = f"{len(metadata)} entries"
            break
        out[bound_text(str(key), MAX_METADATA_CHARS)] = bound_text(str(value), MAX_METADATA_CHARS)
    return out

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[domain.IpamError], grpc.StatusCode], ...] = (
    (domain.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (domain.NotFound, grpc.StatusCode.NOT_FOUND),
    (domain.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (domain.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (domain.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (domain.PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (domain.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (domain.Conflict, grpc.StatusCode.ABORTED),
    (domain.DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: domain.IpamError) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> grpc.Status:
    """The status, with an ErrorInfo detail, bounded (see the module's doc)."""
    message = bound_text(message)
    info = error_details_pb2.ErrorInfo(reason=bound_text(reason, MAX_METADATA_CHARS), domain=ERROR_DOMAIN,
                                       metadata=bound_metadata(metadata) if metadata else metadata)
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
