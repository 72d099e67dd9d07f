"""Engine creation, database URLs and the translation of driver errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import sqlalchemy.exc
from prometheus_client import Counter
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..dburl import normalise_multihost
from ..domain import DatabaseUnavailable

ENV_DATABASE_URL = "DSIPAM_DATABASE_URL"
# Set to 1 when the database URL points at PgBouncer in transaction (or statement) pooling mode.
ENV_DB_PGBOUNCER = "DSIPAM_DB_PGBOUNCER"

# SQLSTATEs that mean "run the transaction again".
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
# Classes that mean the server is gone or refusing: 08 connection, 57P admin shutdown/cannot connect, 53 resources.
_UNAVAILABLE_PREFIXES = ("08", "57P", "53", "3D000", "25006")  # 3D000: the database was dropped
# "cannot execute ... in a read-only transaction": the connection reaches a server that no longer
# takes writes (a demoted primary behind a pooler or a virtual IP, a standby). Nothing was written.
READ_ONLY_SQLSTATE = "25006"
# After these the connection is dropped, and with it every other connection of its pool (they were
# made to the same server): read-only, and the admin shutdown (57P01), crash shutdown (57P02) and
# "cannot connect now" (57P03) that PostgreSQL sends when it stops or restarts, as Patroni does to
# demote a primary.
DROP_SQLSTATES = frozenset({READ_ONLY_SQLSTATE, "57P01", "57P02", "57P03"})

READ_ONLY_MESSAGE = ("database: the server reached takes no writes (a standby, or a primary being demoted); "
                     "try again later")

RECONNECT_PATHS = ("full", "fast", "health")
RECONNECT_REASONS = ("read-only", "ended-while-idle")
# Process-wide, like the fast path's counters: observability.Metrics registers it in its registry.
RECONNECTS = Counter(
    "dsipam_db_reconnects",
    "Statements run again on a new connection because their connection could not have written anything: "
    "it reached a read-only server (a demoted primary, a standby: SQLSTATE 25006) or PostgreSQL had ended it "
    "while it was idle. Expected after a failover or switchover (logged at WARNING); by path (full, fast, "
    "health) and reason.",
    ["path", "reason"], registry=None,
)
for _path in RECONNECT_PATHS:
    for _reason in RECONNECT_REASONS:
        RECONNECTS.labels(_path, _reason)  # zeros from the start


class LogEvery:
    """At most one log line per ``seconds`` for a condition that may repeat on every call (a
    read-only server after a failover): ``due()`` says whether to log now and how many
    occurrences the line stands for."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self._last = -seconds
        self._held = 0

    def due(self) -> int:
        """0 when this occurrence is not to be logged; else the occurrences since the last line, this one included."""
        import time

        self._held += 1
        now = time.monotonic()
        if now - self._last < self.seconds:
            return 0
        self._last, held, self._held = now, self._held, 0
        return held


def database_url_from_env() -> str:
    url = os.environ.get(ENV_DATABASE_URL, "")
    if not url:
        raise SystemExit(f"{ENV_DATABASE_URL} is not set (expected postgresql://user@host:port/db)")
    return url


# libpq's URL parameters (as psql and pg_dump read them) that dsipam accepts, and what becomes of them:
# asyncpg's own DSN parser reads these (TLS, which server of a multi-host list, Kerberos) ...
DSN_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword", "sslnegotiation",
                  "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs", "passfile",
                  "krbsrvname", "gsslib", "user", "password", "dbname")
# The values asyncpg checks only when it connects (a ClientConfigurationError at the first
# connection, after ``dsipam serve`` started): checked here, as libpq checks them, so that a typo
# such as ``sslmode=requir`` (or an empty ``sslmode=``, which asyncpg reads as no parameter, so
# ``prefer``) is refused up front naming the parameter and its allowed values.
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
DSN_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "sslnegotiation": ("postgres", "direct"),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
}
# ... these become arguments of the connection (connect_timeout: seconds; application_name and
# options: sent to the server at start-up, options as libpq's "-c name=value" list) ...
SESSION_PARAMETERS = ("connect_timeout", "application_name", "options")
# ... and these are the multi-host list itself (normalise_multihost).
_ADDRESS_PARAMETERS = ("host", "port")


@dataclass(frozen=True)
class DatabaseURL:
    """A database URL taken apart for the drivers: ``base`` (scheme, user, password, hosts,
    database), the parameters asyncpg's DSN parser reads (``dsn_query``), and the connection's
    ``timeout`` and start-up ``server_settings``."""

    base: str
    dsn_query: tuple[tuple[str, str], ...]
    timeout: float | None
    server_settings: dict[str, str]

    def asyncpg_dsn(self) -> str:
        from urllib.parse import urlencode

        parts = urlsplit(self.base)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)] + list(self.dsn_query)
        return _unsplit("postgresql", parts.netloc, parts.path, urlencode(query, safe=","), parts.fragment)


def parse_database_url(url: str, *, field: str = "database URL") -> DatabaseURL:
    """Reads the URL's libpq parameters. One that dsipam cannot honour is refused here, with its
    name, rather than by the driver at the first connection (asyncpg's ``TypeError`` for
    ``sslmode=``, or PostgreSQL's "unrecognized configuration parameter")."""
    from urllib.parse import urlencode

    parts = urlsplit(normalise_multihost(url))
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"{field}: unsupported scheme {parts.scheme!r} (expected postgresql://)")
    address: list[tuple[str, str]] = []
    dsn: list[tuple[str, str]] = []
    timeout: float | None = None
    settings: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _ADDRESS_PARAMETERS:
            address.append((key, value))
        elif key in DSN_PARAMETERS:
            choices = DSN_CHOICES.get(key)
            if choices is not None and value not in choices:
                raise ValueError(f"{field}: {key}={value!r} is not one of {', '.join(choices)}")
            dsn.append((key, value))
        elif key == "connect_timeout":
            try:
                timeout = float(value)
            except ValueError:
                raise ValueError(f"{field}: connect_timeout={value!r} is not a number of seconds") from None
            if not 0 < timeout <= 3600:
                raise ValueError(f"{field}: connect_timeout={value!r} must be above 0 and at most 3600 seconds")
        elif key == "application_name":
            settings["application_name"] = value
        elif key == "options":
            settings.update(_libpq_options(value, field))
        else:
            allowed = ", ".join((*DSN_PARAMETERS, *SESSION_PARAMETERS, *_ADDRESS_PARAMETERS))
            raise ValueError(f"{field}: parameter {key!r} is not supported (supported: {allowed})")
    chosen = dict(dsn)
    if chosen.get("sslnegotiation") == "direct" and chosen.get("sslmode", "prefer") not in (
            "require", "verify-ca", "verify-full"):
        raise ValueError(f"{field}: sslnegotiation=direct needs sslmode=require, verify-ca or verify-full "
                         f"(libpq's rule; got sslmode={chosen.get('sslmode', 'prefer')!r})")
    base = _unsplit("postgresql", parts.netloc, parts.path, urlencode(address, safe=","), parts.fragment)
    return DatabaseURL(base, tuple(dsn), timeout, settings)


def _unsplit(scheme: str, netloc: str, path: str, query: str, fragment: str) -> str:
    """urlunsplit that keeps the ``//`` of an empty authority: ``postgresql:///db?host=/run/pg`` (libpq's
    form for a Unix socket or the default host), which urlunsplit turns into ``postgresql:/db``, a URL
    SQLAlchemy cannot parse."""
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _libpq_options(value: str, field: str) -> dict[str, str]:
    """libpq's ``options`` (``-c name=value`` or ``--name=value``, space-separated) as settings."""
    out: dict[str, str] = {}
    words = value.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            item, i = words[i + 1], i + 2
        elif word.startswith("-c") and len(word) > 2:
            item, i = word[2:], i + 1
        elif word.startswith("--"):
            item, i = word[2:], i + 1
        else:
            raise ValueError(f"{field}: options={value!r}: only '-c name=value' settings are supported")
        name, eq, setting = item.partition("=")
        if not eq or not name:
            raise ValueError(f"{field}: options={value!r}: {item!r} is not name=value")
        out[name.replace("-", "_")] = setting
    return out


def to_sqlalchemy_url(url: str) -> str:
    """Turns a libpq-style ``postgresql://`` URL into SQLAlchemy's asyncpg form (hosts, user,
    database; the libpq parameters go to the driver through :func:`create_engine`'s arguments)."""
    parts = urlsplit(parse_database_url(url).base)
    return _unsplit("postgresql+asyncpg", parts.netloc, parts.path, parts.query, parts.fragment)


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
    parsed = parse_database_url(url)
    connect_args: dict[str, object] = {
        "timeout": parsed.timeout or 5, "server_settings": {"application_name": "dsipam", **parsed.server_settings}}
    if parsed.dsn_query:
        # TLS and the other parameters asyncpg reads from a DSN: a DSN of only those (the hosts,
        # user and database that SQLAlchemy passes as arguments take precedence over its empty ones).
        from urllib.parse import urlencode

        connect_args["dsn"] = "postgresql:///?" + urlencode(parsed.dsn_query)
    if pgbouncer is None:
        pgbouncer = pgbouncer_from_env()
    if pgbouncer:
        connect_args.update(pgbouncer_connect_args())
    engine = create_async_engine(
        to_sqlalchemy_url(url),
        # Every transaction BEGINs at READ COMMITTED whatever the database's or role's
        # default_transaction_isolation: the store relies on each statement seeing what committed
        # while an earlier one waited for a lock (a range's layout version read after its lock,
        # _alloc._layout_current); under REPEATABLE READ an Allocate queued behind a ReserveAddresses would
        # hand out the address just reserved. fsck sets REPEATABLE READ for its own transaction.
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=False,
        connect_args=connect_args,
    )
    drop_stale_connections(engine)
    return engine


def drop_stale_connections(engine: AsyncEngine) -> None:
    """Makes the engine's pool let go of connections that cannot write any more, without a ping
    per checkout (``pool_pre_ping`` costs a round trip on every call):

    - at checkout, a connection that asyncpg already knows to be closed (PostgreSQL ended it while
      it sat idle: a restart, Patroni demoting the primary) is discarded and another one taken;
    - an error in :data:`DROP_SQLSTATES` (read-only, admin shutdown) counts as a disconnect:
      SQLAlchemy invalidates the connection and every other connection of the pool, which were
      made to the same server, so that the next ones are made anew (with
      ``target_session_attrs=read-write``, to the new primary).
    """
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "handle_error")
    def _drop(ctx):  # type: ignore[no-untyped-def]
        if not ctx.is_disconnect and ctx.original_exception is not None and (
            sqlstate(ctx.sqlalchemy_exception or ctx.original_exception) in DROP_SQLSTATES
        ):
            ctx.is_disconnect = True

    @event.listens_for(sync_engine.pool, "checkout")
    def _closed(dbapi_connection, record, proxy):  # type: ignore[no-untyped-def]
        raw = getattr(dbapi_connection, "_connection", None)  # the asyncpg connection
        if raw is not None and raw.is_closed():
            raise sqlalchemy.exc.DisconnectionError("the pooled connection was closed while it was idle")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``__cause__``, SQLAlchemy's ``orig``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or getattr(current, "orig", None)


def is_read_only(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is PostgreSQL's "cannot execute ... in a read-only
    transaction" (SQLSTATE 25006): the statement was refused, nothing was written."""
    return any(sqlstate(e) == READ_ONLY_SQLSTATE for e in _chain(exc))


# asyncpg's message when a statement starts on a connection whose session PostgreSQL has ended
# (a FATAL ErrorResponse read while no operation waited on it); see _fast.ended_while_idle.
_ENDED_WHILE_IDLE = re.compile(r"cannot switch to state \d+; another operation \(2\) is in progress")


def is_ended_while_idle(exc: BaseException) -> bool:
    """True when ``exc`` wraps asyncpg's refusal to start a statement on a connection whose session
    PostgreSQL had already ended: nothing of that statement was sent, and the session's open
    transaction (if any) ended with it, uncommitted."""
    return any(type(e).__name__ == "InternalClientError" and _ENDED_WHILE_IDLE.search(str(e)) for e in _chain(exc))


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
        if is_read_only(exc):
            raise DatabaseUnavailable(READ_ONLY_MESSAGE) from exc
        if is_unavailable(exc):
            raise DatabaseUnavailable("database: unreachable, try again later") from exc
        raise
