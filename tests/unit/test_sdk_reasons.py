"""Every ErrorInfo reason the server can report has its SDK class (docs/sdk.md, "Errors"), and
the ones the server sends with UNAVAILABLE are retried by the SDK's default policy.

The reasons are read from the server's source, so a reason added anywhere (a domain error class,
``reason=`` of an error, or the reason argument of a status the RPC layer or the authorizers
build) fails this test until the SDK knows it."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

import dsipam.client as sdk
from dsipam.client import RETRY_CODES, RetryPolicy

SERVER = Path(__file__).resolve().parents[2] / "server" / "dsipam" / "server"
_CLASS_OR_KEYWORD = re.compile(r'\breason\s*(?::\s*str\s*)?=\s*"([A-Z][A-Z_]+)"')
# The reason argument of a status built by the RPC layer (_abort, to_grpc_status) or an
# authorizer (KubeAuthError, AuthError): a quoted upper-case word right after the message.
_STATUS_CALL = re.compile(r'\b(?:_abort|to_grpc_status|KubeAuthError|AuthError)\((.*?)\)\s*(?:$|\n)', re.S)
_WORD = re.compile(r'"([A-Z][A-Z_]{3,})"')
GENERIC = {"NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"}  # the class of their code


def server_reasons() -> set[str]:
    found: set[str] = set()
    for path in SERVER.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found.update(_CLASS_OR_KEYWORD.findall(text))
        for call in _STATUS_CALL.findall(text):
            found.update(w for w in _WORD.findall(call) if not w.startswith("DSIPAM_"))
    return found


def test_the_scan_finds_the_reasons_of_every_layer():
    reasons = server_reasons()
    # One of each source: domain classes, reason= keyword, the RPC layer, the authorizers, the watch hub.
    assert {"POOL_NOT_FOUND", "RANGE_NOT_ALLOWED", "OVERLOADED", "TOKEN_REVIEW_BUSY", "UNAUTHENTICATED",
            "TOO_MANY_WATCH_STREAMS"} <= reasons


def test_every_reason_has_its_class():
    known = {(code, reason): cls for code, reason, cls in sdk.ERROR_TABLE}
    by_reason = {reason: cls for (_, reason), cls in known.items() if reason}
    missing = sorted(server_reasons() - GENERIC - set(by_reason))
    assert missing == [], f"reasons the server reports without an SDK class: {missing}"
    for reason, cls in by_reason.items():
        assert cls.reason == reason and sdk.error_class(cls.code, reason) is cls
        assert getattr(sdk, cls.__name__) is cls and cls.__name__ in sdk.__all__


def test_unavailable_reasons_are_retried():
    policy = RetryPolicy()
    for reason in ("DATABASE_UNAVAILABLE", "OVERLOADED", "TOKEN_REVIEW_BUSY", "TOKEN_REVIEW_FAILED"):
        cls = sdk.error_class(grpc.StatusCode.UNAVAILABLE, reason)
        assert cls.reason == reason and issubclass(cls, sdk.ServiceUnavailable) and cls.retryable
        assert cls.code in RETRY_CODES and policy.should_retry(cls.code, 1)
    too_many = sdk.error_class(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCH_STREAMS")
    assert too_many is sdk.TooManyWatchStreams and issubclass(too_many, sdk.ResourceExhausted)
    assert not too_many.retryable and not policy.should_retry(too_many.code, 1)
    assert sdk.error_class(grpc.StatusCode.INVALID_ARGUMENT, "RANGE_NOT_ALLOWED") is sdk.RangeNotAllowed
