"""The ``dsipam`` command: serve, migrate and fsck (admin commands build on the SDK)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .settings import Settings


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def _run_loop(coro, use_uvloop: bool):  # type: ignore[no-untyped-def]
    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.listen:
        settings.listen = args.listen
    if args.database_url:
        settings.database_url = args.database_url
    if args.log_level:
        settings.log_level = args.log_level.upper()
    if args.db_pool_size is not None:
        settings.db_pool_size = args.db_pool_size
    if args.db_max_overflow is not None:
        settings.db_max_overflow = args.db_max_overflow
    if args.data_dir:
        settings.data_dir = args.data_dir
    if args.db_pgbouncer:
        settings.db_pgbouncer = True
    if settings.db_pgbouncer:  # every engine of this process (store, migrations) reads it
        _use_pgbouncer()
    _setup_logging(settings.log_level)
    embedded = None
    if not settings.database_url:
        from .embedded import start_embedded

        embedded = start_embedded(settings.data_dir)
        settings.database_url = embedded.url
        settings.migrate = True
        print(
            f"dsipam: started a private PostgreSQL ({embedded.bindir}) on 127.0.0.1:{embedded.port}; "
            f"data in {embedded.pgdata}",
            flush=True,
        )
    try:
        if settings.migrate or args.migrate:
            from .migrate import upgrade

            upgrade(settings.database_url)
            print("dsipam: database migrated to head", flush=True)
        from .app import serve

        _run_loop(serve(settings), settings.uvloop)
    finally:
        if embedded is not None:
            embedded.stop()
            print("dsipam: private PostgreSQL stopped", flush=True)
    return 0


def _use_pgbouncer() -> None:
    import os

    from .store.db import ENV_DB_PGBOUNCER

    os.environ[ENV_DB_PGBOUNCER] = "1"


def _database_url(args: argparse.Namespace) -> str:
    from .store.db import database_url_from_env

    return args.database_url or database_url_from_env()


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import check, upgrade

    _setup_logging("WARNING")
    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)
    if args.check:
        check(url)
        print("dsipam: schema matches the models")
    else:
        upgrade(url, args.revision)
        print(f"dsipam: database migrated to {args.revision}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from .store import Store, create_engine

    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)

    async def run() -> list[str]:
        store = Store(create_engine(url, pool_size=1, max_overflow=0))
        try:
            return await store.fsck(args.pool)
        finally:
            await store.close()

    problems = asyncio.run(run())
    for p in problems:
        print(p)
    print(f"fsck {args.pool}: {'clean' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


_PGBOUNCER_HELP = "the URL is PgBouncer in transaction mode: no prepared statements (env DSIPAM_DB_PGBOUNCER=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsipam", description="Dual-stack IP address management.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", action="append", help="host:port or unix:///path (repeatable; env DSIPAM_LISTEN)")
    serve.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    serve.add_argument("--db-pool-size", type=int, help="database connections kept open (env DSIPAM_DB_POOL_SIZE)")
    serve.add_argument("--db-max-overflow", type=int, help="extra connections under load (env DSIPAM_DB_MAX_OVERFLOW)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env DSIPAM_LOG_LEVEL)")
    serve.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    serve.add_argument("--data-dir", help="data directory of the private PostgreSQL (env DSIPAM_DATA_DIR)")
    serve.add_argument("--migrate", action="store_true", help="apply migrations before serving (env DSIPAM_MIGRATE=1)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    migrate.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--check", action="store_true", help="fail when models and schema disagree")
    migrate.set_defaults(func=cmd_migrate)

    fsck = sub.add_parser("fsck", help="check that a pool's blocks and allocations agree")
    fsck.add_argument("pool")
    fsck.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    fsck.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    fsck.set_defaults(func=cmd_fsck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
