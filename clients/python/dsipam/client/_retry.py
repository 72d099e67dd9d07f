"""Retry policy: which failures are retried, and how long to wait between attempts."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
"""Status codes that are retried by default. INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION and RESOURCE_EXHAUSTED never are."""

_MIN_ATTEMPT_SECONDS = 0.02  # no attempt is started with less time than this left


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by the call's deadline.

    Attempt ``n`` (from 1) that fails with a code in ``codes`` is followed by a pause of
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``, of which the fraction
    ``jitter`` is random, then attempt ``n + 1``, until the call's deadline leaves no time
    or ``max_attempts`` (None: no limit but the deadline) were made.

    Every RPC is retried: Allocate and Release are idempotent per (pool, owner);
    a retried DeletePool that finds the pool gone, and a retried CreatePool that finds the
    same pool already there, report success.
    """

    max_attempts: int | None = None
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    codes: frozenset[grpc.StatusCode] = field(default=RETRY_CODES)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts} is less than 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter: {self.jitter} is not between 0 and 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("initial_backoff and max_backoff must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (from 1)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return cap * (1.0 - self.jitter) + random.uniform(0.0, cap * self.jitter)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a failure with ``code`` on attempt ``attempt`` may be tried again."""
        if code not in self.codes:
            return False
        return self.max_attempts is None or attempt < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)
"""A policy that never retries."""


class Deadline:
    """The end of a call: every attempt and pause fits in it (None: no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left, or None without a deadline."""
        return None if self.end is None else self.end - time.monotonic()

    def pause(self, wanted: float) -> float | None:
        """The pause to take before another attempt, or None when the deadline leaves no room."""
        left = self.remaining()
        if left is None:
            return wanted
        if left - wanted < _MIN_ATTEMPT_SECONDS:
            return None
        return wanted
