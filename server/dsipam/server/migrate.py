"""Applies the Alembic migrations shipped in the dsipam.migrations package."""

from __future__ import annotations

from importlib import resources


def alembic_config(database_url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    ini = resources.files("dsipam.migrations") / "alembic.ini"
    cfg = Config(str(ini))
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
