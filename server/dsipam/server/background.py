"""Errors of background work: logged at ERROR with the traceback and counted, never hidden.

The server's background tasks (the spare-block top-up, cooldown maintenance, the pool gauges,
the database health watch, the watch fan-out's listener) keep running after a failure, because the next round may succeed.
The project's rule for such a fallback: expected conditions (a database outage, a pool deleted
meanwhile, cancellation at shutdown) are caught by narrow ``except`` clauses and may stay quiet;
anything else goes through :func:`report`, which logs it at ERROR with ``exc_info`` and counts
it in ``dsipam_background_errors_total{task}``. Any non-zero value is a bug to report
(docs/operations.md); the tests fail when a server they ran counted one.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

TASKS = ("block-top-up", "maintenance", "pool-gauges", "db-health", "watch", "shutdown")
# Process-wide, like the fast path's counter: observability.Metrics registers it in its registry.
BACKGROUND_ERRORS = Counter(
    "dsipam_background_errors",
    "Unexpected exceptions in background tasks (not a database outage), by task; each was logged at ERROR "
    "with its traceback and the task went on. Any non-zero value is a bug to report (docs/operations.md).",
    ["task"], registry=None,
)
for _task in TASKS:
    BACKGROUND_ERRORS.labels(_task)  # zeros from the start


def report(logger: logging.Logger, task: str, message: str, *args: object) -> None:
    """Logs the exception being handled at ERROR (with its traceback) and counts it for ``task``.

    Call it from an ``except`` block."""
    if task not in TASKS:  # a label of its own would not be documented nor zero from the start
        raise ValueError(f"task: {task!r} is not one of {TASKS}")
    BACKGROUND_ERRORS.labels(task).inc()
    logger.error("background error (%s): " + message, task, *args, exc_info=True)
