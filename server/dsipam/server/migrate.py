"""Applies the Alembic migrations shipped in the dsipam.migrations package, and tells whether a
database's schema is the one this code needs (``dsipam serve`` checks before it serves)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


def alembic_config(database_url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    ini = resources.files("dsipam.migrations") / "alembic.ini"
    cfg = Config(str(ini))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("script_location", str(resources.files("dsipam.migrations")))
    cfg.set_main_option("version_locations", str(resources.files("dsipam.migrations") / "versions"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrates the database to ``revision``. Must not run inside an event loop."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Fails when the models and the migrated schema disagree (``alembic check``)."""
    from alembic import command

    command.check(alembic_config(database_url))


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's revision (None: never migrated)
    head: str  # the newest revision this code ships
    known: bool  # ``current`` is one of this code's revisions (False: a newer server migrated it)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def behind(self) -> bool:
        """The database needs ``dsipam migrate`` before this code can use it."""
        return self.current is None or (self.known and self.current != self.head)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def schema_state(database_url: str) -> SchemaState:
    """Reads the database's Alembic revision. Must not run inside an event loop; raises what
    connecting raises (DatabaseUnavailable when the server cannot be reached)."""
    import asyncio

    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from .store.db import create_engine, unavailable_on_disconnect

    async def read() -> str | None:
        engine = create_engine(database_url, pool_size=1, max_overflow=0)
        try:
            with unavailable_on_disconnect():
                async with engine.connect() as conn:
                    return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
        finally:
            await engine.dispose()

    current = asyncio.run(read())
    script = ScriptDirectory.from_config(alembic_config(database_url))
    head = script.get_current_head()
    assert head is not None
    known = True
    if current is not None:
        try:
            known = script.get_revision(current) is not None
        except CommandError:
            known = False
    return SchemaState(current, head, known)
