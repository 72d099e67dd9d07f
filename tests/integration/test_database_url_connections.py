"""libpq's URL parameters reach PostgreSQL through every connection dsipam makes: the engine
(SQLAlchemy's asyncpg dialect), the fast path's pool and the watch listener (asyncpg)."""

import asyncio

from sqlalchemy import text

from dsipam.server.store import create_engine
from dsipam.server.store._fast import FastPath, asyncpg_dsn, session_args

PARAMS = "sslmode=prefer&connect_timeout=4&application_name=dsipam-url-test&options=-c%20statement_timeout%3D4321"


def test_url_parameters_reach_every_connection(clean_db: str) -> None:
    url = clean_db + "?" + PARAMS

    async def main() -> None:
        engine = create_engine(url, pool_size=1, max_overflow=0)
        fast = FastPath(url, pool_size=1)
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(text(
                    "SELECT current_setting('application_name'), current_setting('statement_timeout')"))).one()
            assert tuple(row) == ("dsipam-url-test", "4321ms")
            rows = await fast.fetch("SELECT current_setting('application_name') AS a, "
                                    "current_setting('statement_timeout') AS t")
            assert (rows[0]["a"], rows[0]["t"]) == ("dsipam-url-test", "4321ms")
            import asyncpg  # the watch listener connects as this does

            conn = await asyncpg.connect(asyncpg_dsn(url), **session_args(url, "dsipam-watch", 10))
            try:
                assert await conn.fetchval("SHOW statement_timeout") == "4321ms"
                assert session_args(url, "dsipam-watch", 10)["timeout"] == 4.0
            finally:
                await conn.close()
        finally:
            await fast.close()
            await engine.dispose()

    asyncio.run(main())


def test_sslmode_require_fails_on_every_connection_and_says_why(clean_db, caplog):
    """This PostgreSQL has SSL off: sslmode=require must reach, and fail, every connection (not
    fall back to plain TCP), and `dsipam serve`'s start-up line must say why (it said only
    'unreachable at start-up', the cause of a misconfiguration nowhere on that line)."""
    import logging

    import asyncpg
    import pytest

    from dsipam.server.cli import _prepare_schema
    from dsipam.server.domain import DatabaseUnavailable

    url = clean_db + "?sslmode=require&connect_timeout=3"

    async def main() -> None:
        engine = create_engine(url, pool_size=1, max_overflow=0)
        fast = FastPath(url, pool_size=1)
        try:
            from dsipam.server.store.db import unavailable_on_disconnect

            with pytest.raises(DatabaseUnavailable) as caught:
                with unavailable_on_disconnect():
                    async with engine.connect():
                        pass
            assert "rejected SSL upgrade" in str(caught.value.__cause__)
            with pytest.raises(DatabaseUnavailable) as caught:
                await fast.fetch("SELECT 1")
            assert "rejected SSL upgrade" in str(caught.value.__cause__)
            with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
                await asyncpg.connect(asyncpg_dsn(url), **session_args(url, "dsipam-watch", 10))
        finally:
            await fast.close()
            await engine.dispose()

    asyncio.run(main())
    with caplog.at_level(logging.ERROR, logger="dsipam.server"):
        _prepare_schema(url, migrate=False)
    assert any("unreachable at start-up" in r.getMessage() and "rejected SSL upgrade" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
