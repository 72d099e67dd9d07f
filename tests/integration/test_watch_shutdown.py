"""Stopping the watch fan-out hides nothing: the CancelledError of a task it cancelled itself is
the expected end, a listener connection the server already closed is only dropped, and anything
else (a task that had died with an exception) is logged at ERROR and counted in
dsipam_background_errors_total (server/dsipam/server/background.py)."""

from __future__ import annotations

import asyncio
import logging

from support import psql

from dsipam.server.background import BACKGROUND_ERRORS
from dsipam.server.store import Store, create_engine
from dsipam.server.store._watch import WatchHub, cancel_and_wait


def _count(task: str) -> float:
    return BACKGROUND_ERRORS.labels(task)._value.get()  # type: ignore[attr-defined]


def _errors(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def _hub(url: str) -> tuple[Store, WatchHub]:
    store = Store(create_engine(url, pool_size=2, max_overflow=0))
    hub = WatchHub(store, url, fallback=0.2)
    await hub.start()
    for _ in range(100):  # the listener connects
        if hub._conn is not None:
            break
        await asyncio.sleep(0.05)
    assert hub._conn is not None
    return store, hub


def test_a_clean_stop_reports_nothing(clean_db, caplog):
    async def main() -> None:
        store, hub = await _hub(clean_db)
        try:
            before = (_count("shutdown"), _count("watch"))
            await hub.stop()
            assert (_count("shutdown"), _count("watch")) == before
            assert hub._conn is None and hub._task is None and hub._ticker is None
        finally:
            await store.close()

    asyncio.run(main())
    assert _errors(caplog) == []


def test_a_listener_connection_the_server_closed_is_dropped_quietly(clean_db, caplog):
    async def main() -> None:
        store, hub = await _hub(clean_db)
        try:
            conn = hub._conn
            assert conn is not None
            hub._task.cancel()  # type: ignore[union-attr] - no reconnect meanwhile
            before = (_count("shutdown"), _count("watch"))
            psql(clean_db, f"SELECT pg_terminate_backend({conn.get_server_pid()})")
            await hub.stop()
            assert (_count("shutdown"), _count("watch")) == before
            assert conn.is_closed()
        finally:
            await store.close()

    asyncio.run(main())
    assert _errors(caplog) == []


def test_a_task_that_had_died_is_reported_at_stop(clean_db, caplog):
    async def main() -> None:
        store, hub = await _hub(clean_db)
        try:
            async def broken() -> None:
                raise RuntimeError("the ticker broke")

            ticker = hub._ticker
            assert ticker is not None
            await cancel_and_wait(ticker)  # the real one ends quietly
            hub._ticker = asyncio.create_task(broken(), name="dsipam-watch-bookmarks")
            await asyncio.sleep(0)
            before = _count("shutdown")
            await hub.stop()
            assert _count("shutdown") == before + 1
        finally:
            await store.close()

    asyncio.run(main())
    errors = _errors(caplog)
    assert len(errors) == 1 and "background error (shutdown)" in errors[0] and "dsipam-watch-bookmarks" in errors[0]


def test_a_stop_that_is_itself_cancelled_is_cancelled(clean_db):
    """cancel_and_wait swallows only the CancelledError of the task it cancelled: a caller being
    cancelled while it waits is cancelled."""

    async def main() -> None:
        async def stubborn() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(30)  # takes its time to end

        inner = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        outer = asyncio.create_task(cancel_and_wait(inner))
        await asyncio.sleep(0.05)
        outer.cancel()
        try:
            await outer
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the caller's cancellation was swallowed")
        assert outer.cancelled()
        inner.cancel()

    asyncio.run(main())
