"""Engine creation, database URLs and the translation of driver errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..domain import DatabaseUnavailable

ENV_DATABASE_URL = "DSIPAM_DATABASE_URL"
# Set to 1 when the database URL points at PgBouncer in transaction (or statement) pooling mode.
ENV_DB_PGBOUNCER = "DSIPAM_DB_PGBOUNCER"

# SQLSTATEs that mean "run the transaction again".
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
# Classes that mean the server is gone or refusing: 08 connection, 57P admin shutdown/cannot connect, 53 resources.
_UNAVAILABLE_PREFIXES = ("08", "57P", "53", "3D000")  # 3D000: the database was dropped


def database_url_from_env() -> str:
    url = os.environ.get(ENV_DATABASE_URL, "")
    if not url:
        raise SystemExit(f"{ENV_DATABASE_URL} is not set (expected postgresql://user@host:port/db)")
    return url


def normalise_multihost(url: str) -> str:
    """Gives every multi-host form one shape: ``?host=h1,h2&port=p1,p2`` with an empty netloc host.

    libpq accepts ``postgresql://u@h1:p1,h2:p2/db`` and ``?host=h1&host=h2``-style lists; SQLAlchemy and
    asyncpg agree only on the comma-separated query form, which libpq (psql, pg_dump) also reads."""
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    hosts = [v for k, v in query if k == "host"]
    ports = [v for k, v in query if k == "port"]
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if "," in hostport:  # libpq's h1:p1,h2:p2 in the authority
        for item in hostport.split(","):
            h, _, p = item.rpartition(":") if ":" in item and not item.endswith("]") else (item, "", "")
            hosts.append(h or item)
            ports.append(p or "5432")
        hostport = ""
    elif len(hosts) > 1 or any("," in h for h in hosts):
        flat = [x for h in hosts for x in h.split(",")]
        hosts, split_ports = [], []
        for item in flat:
            if ":" in item and not item.startswith("/"):
                h, _, p = item.rpartition(":")
                hosts.append(h)
                split_ports.append(p)
            else:
                hosts.append(item)
                split_ports.append("")
        given = [x for p in ports for x in p.split(",")] if ports else []
        ports = [sp or (given[i] if i < len(given) else (given[0] if given else "5432"))
                 for i, sp in enumerate(split_ports)]
    else:
        return url
    rest = [(k, v) for k, v in query if k not in ("host", "port")]
    rest += [("host", ",".join(hosts)), ("port", ",".join(ports))]
    netloc = (userinfo + "@" if userinfo else "") + hostport
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(rest, safe=","), parts.fragment))


def to_sqlalchemy_url(url: str) -> str:
    """Turns a libpq-style ``postgresql://`` URL into SQLAlchemy's asyncpg form."""
    parts = urlsplit(normalise_multihost(url))
    scheme = parts.scheme
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+asyncpg"
    elif scheme != "postgresql+asyncpg":
        raise ValueError(f"database URL: unsupported scheme {parts.scheme!r} (expected postgresql://)")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def pgbouncer_from_env() -> bool:
    """True when ``DSIPAM_DB_PGBOUNCER`` is 1/true/yes."""
    return os.environ.get(ENV_DB_PGBOUNCER, "").strip().lower() in ("1", "true", "yes")


def pgbouncer_connect_args() -> dict[str, object]:
    """Driver arguments that make asyncpg safe behind PgBouncer in transaction pooling mode.

    A transaction-mode pooler hands each transaction to any server connection, so a
    named prepared statement made on one may be missing (or taken) on the next. With
    these, no named statement is ever created: asyncpg's statement cache is off, the
    SQLAlchemy dialect's cache is off, and the dialect prepares each statement as the
    unnamed statement, which asyncpg parses again in the same round trip that runs it.
    """
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": _unnamed_statement,
    }


def _unnamed_statement() -> str:
    return ""


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    pool_timeout: float = 10.0,
    pgbouncer: bool | None = None,
) -> AsyncEngine:
    """The engine for ``url``; ``pgbouncer`` (default: ``DSIPAM_DB_PGBOUNCER``) turns off prepared statements."""
    connect_args: dict[str, object] = {"timeout": 5, "server_settings": {"application_name": "dsipam"}}
    if pgbouncer is None:
        pgbouncer = pgbouncer_from_env()
    if pgbouncer:
        connect_args.update(pgbouncer_connect_args())
    return create_async_engine(
        to_sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=False,
        connect_args=connect_args,
    )


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None), exc):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OSError | asyncio.TimeoutError | ConnectionError):
        return True
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # pool checkout timed out
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = sqlstate(exc)
        if code and code.startswith(_UNAVAILABLE_PREFIXES):
            return True
        orig = exc.orig
        cause = getattr(orig, "__cause__", None)
        if isinstance(cause, OSError | ConnectionError | asyncio.TimeoutError):
            return True
        name = type(cause).__name__ if cause is not None else ""
        if name in ("ConnectionDoesNotExistError", "InterfaceError", "CannotConnectNowError", "ConnectionFailureError",
                    "TargetServerAttributeNotMatched", "InternalClientError"):
            return True
    return False


@contextlib.contextmanager
def unavailable_on_disconnect() -> Iterator[None]:
    """Turns connection failures into :class:`DatabaseUnavailable`."""
    try:
        yield
    except (TimeoutError, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable("database: unreachable, try again later") from exc
        raise
