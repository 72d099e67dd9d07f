"""Background work never hides an exception: the spare-block top-up (it used to log failures at
INFO) logs an unexpected one at ERROR with its traceback and counts it in
``dsipam_background_errors_total{task="block-top-up"}``; the expected conditions (a pool deleted
meanwhile) stay quiet and are not counted. The failure is a real one: a PostgreSQL trigger that
refuses new blocks of the pool.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from support import psql

from dsipam.server.background import BACKGROUND_ERRORS, report
from dsipam.server.domain import Family, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine


def _count(task: str) -> float:
    return BACKGROUND_ERRORS.labels(task)._value.get()  # type: ignore[attr-defined]


async def _top_up(store: Store, name: str) -> None:
    async with store.engine.connect() as conn:
        stored = await store._load_pool(conn, name)
    store._schedule_top_up(stored, [Family.IPV4])
    for _ in range(500):
        await asyncio.sleep(0.01)
        if stored.id not in store._topping_up:
            return
    raise AssertionError("the top-up did not finish in 5 s")


def test_a_failed_top_up_is_logged_at_error_and_counted(clean_db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dsipam.store")
    psql(clean_db, """
        CREATE OR REPLACE FUNCTION test_refuse_blocks() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'test: no new blocks for this pool'; END $$;
        CREATE TRIGGER test_refuse_blocks BEFORE INSERT ON ipam_blocks FOR EACH ROW EXECUTE FUNCTION test_refuse_blocks();
    """)

    async def main() -> None:
        store = Store(create_engine(clean_db, pool_size=2, max_overflow=2))
        try:
            await store.create_pool(build_pool_spec("topup", [RangeInput("198.18.0.0/24")], {}, 0))
            before = _count("block-top-up")
            await _top_up(store, "topup")
            assert _count("block-top-up") == before + 1
            errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "dsipam.store"]
            assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in caplog.records]
            assert "block-top-up" in errors[0].getMessage() and "'topup'" in errors[0].getMessage()
            assert "no new blocks" in str(errors[0].exc_info[1])
        finally:
            await store.engine.dispose()

    try:
        asyncio.run(main())
    finally:
        psql(clean_db, "DROP TRIGGER IF EXISTS test_refuse_blocks ON ipam_blocks; DROP FUNCTION IF EXISTS test_refuse_blocks()")


def test_a_top_up_of_a_deleted_pool_is_quiet(clean_db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dsipam")

    async def main() -> None:
        store = Store(create_engine(clean_db, pool_size=2, max_overflow=2))
        try:
            await store.create_pool(build_pool_spec("gone", [RangeInput("198.18.1.0/24")], {}, 0))
            async with store.engine.connect() as conn:
                stored = await store._load_pool(conn, "gone")
            await store.delete_pool("gone", False)
            before = _count("block-top-up")
            store._schedule_top_up(stored, [Family.IPV4])
            for _ in range(500):
                await asyncio.sleep(0.01)
                if stored.id not in store._topping_up:
                    break
            assert _count("block-top-up") == before
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        finally:
            await store.engine.dispose()

    asyncio.run(main())


def test_report_names_only_known_tasks() -> None:
    log = logging.getLogger("test")
    with pytest.raises(ValueError, match="task"):
        try:
            raise RuntimeError("x")
        except RuntimeError:
            report(log, "no-such-task", "x")
