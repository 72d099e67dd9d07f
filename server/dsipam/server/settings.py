"""Settings from DSIPAM_* environment variables; flags override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T", int, float)

DEFAULT_LISTEN = "127.0.0.1:50051"


class SettingError(SystemExit):
    """A setting (a flag or a DSIPAM_* variable) is wrong. ``dsipam`` prints ``dsipam: MESSAGE``
    and exits 2; elsewhere it ends the process like any SystemExit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _env_int(name: str, default: int, minimum: int | None = None) -> int:
    value = os.environ.get(name, "")
    try:
        out = int(value) if value else default
    except ValueError:
        raise SettingError(f"{name}: {value!r} is not an integer") from None
    return _at_least(name, out, minimum)


def _env_float(name: str, default: float, minimum: float | None = None) -> float:
    value = os.environ.get(name, "")
    try:
        out = float(value) if value else default
    except ValueError:
        raise SettingError(f"{name}: {value!r} is not a number") from None
    return _at_least(name, out, minimum)


def _at_least(name: str, value: T, minimum: T | None) -> T:
    if minimum is not None and value < minimum:
        raise SettingError(f"{name}: {value} is less than {minimum}")
    return value


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_mode(value: str, where: str) -> int:
    """A file mode in octal, such as 660 or 0o660."""
    try:
        mode = int(value.removeprefix("0o"), 8)
    except ValueError:
        raise SettingError(f"{where}: {value!r} is not an octal file mode such as 660") from None
    if not 0 <= mode <= 0o777:
        raise SettingError(f"{where}: {value!r} is not an octal file mode such as 660")
    return mode


def _env_mode(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return parse_mode(value, name) if value else default


def pool_limits_from_env() -> tuple[int, int]:
    """DSIPAM_MAX_EXCLUDES_PER_POOL and DSIPAM_MAX_RESERVATIONS_PER_POOL (default 50,000 each); the
    store reads them when it is made."""
    return (_env_int("DSIPAM_MAX_EXCLUDES_PER_POOL", 50_000, minimum=0),
            _env_int("DSIPAM_MAX_RESERVATIONS_PER_POOL", 50_000, minimum=0))


@dataclass
class Settings:
    database_url: str = ""
    listen: list[str] = field(default_factory=list)
    db_pool_size: int = 10
    db_max_overflow: int = 10
    db_pgbouncer: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_grace: float = 10.0
    shutdown_delay: float = 1.0
    data_dir: str = ""
    migrate: bool = False
    uvloop: bool = True
    # Coalesce concurrent Allocates into batched calls of dsipam_allocate_batch (DSIPAM_FAST_PATH=0 turns it off).
    fast_path: bool = True
    # Server processes sharing the listen port (SO_REUSEPORT); reuse_port is set in each of them.
    workers: int = 1
    reuse_port: bool = False
    db_fast_pool_size: int = 4
    # Fast-path batching: batches of one pool in flight at once, and how long a batch waits for
    # more requests while another is in flight (docs/performance.md).
    fast_inflight: int = 2
    fast_linger_ms: float = 3.0
    # Security (see docs/security.md): an auth config switches authentication on; without one the
    # server refuses to start unless insecure is set.
    insecure: bool = False
    auth_config: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    unix_socket_mode: int = 0o660
    # Resource bounds (docs/security.md#resource-bounds): the largest request, calls in flight,
    # HTTP/2 streams per connection, connections, and connection idle/age/keepalive times.
    max_message_bytes: int = 512 * 1024
    max_concurrent_rpcs: int = 4096
    request_read_seconds: float = 10.0  # an authenticated call's request must arrive within this
    max_streams_per_connection: int = 4096
    max_connections: int = 4096
    connection_idle_seconds: float = 300.0
    connection_age_seconds: float = 0.0
    connection_age_grace_seconds: float = 300.0
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    min_ping_interval_seconds: float = 10.0
    handshake_timeout_seconds: float = 10.0
    # Per-pool bounds (docs/lifecycle.md#excludes-and-reservations-bounds-and-cost): excludes over
    # all of a pool's ranges, and reservations; past one, RESOURCE_EXHAUSTED naming it.
    max_excludes_per_pool: int = 50_000
    max_reservations_per_pool: int = 50_000
    # Watch streams (docs/lifecycle.md#watch): bounds per process and per caller identity, and how
    # many events one stream may lag before it catches up on its own.
    max_watch_streams: int = 1000
    max_watch_streams_per_identity: int = 200
    watch_buffer: int = 1000
    watch_fallback_seconds: float = 5.0  # a read of the outbox without a wake-up (NOTIFY lost)
    # Keys of page and resume tokens (docs/security.md): none set, the database's are used.
    token_key: str = ""
    token_key_file: str = ""
    # Observability: Prometheus on its own host:port (off when empty); database health pings.
    metrics_listen: str = ""
    metrics_pool_interval: float = 15.0
    db_health_interval: float = 3.0

    @classmethod
    def from_env(cls) -> Settings:
        listen = [x.strip() for x in os.environ.get("DSIPAM_LISTEN", "").split(",") if x.strip()]
        return cls(
            database_url=os.environ.get("DSIPAM_DATABASE_URL", ""),
            listen=listen,
            db_pool_size=_env_int("DSIPAM_DB_POOL_SIZE", 10),
            db_max_overflow=_env_int("DSIPAM_DB_MAX_OVERFLOW", 10),
            db_pgbouncer=os.environ.get("DSIPAM_DB_PGBOUNCER", "").strip().lower() in ("1", "true", "yes"),
            log_level=os.environ.get("DSIPAM_LOG_LEVEL", "INFO").upper(),
            log_format=os.environ.get("DSIPAM_LOG_FORMAT", "text"),
            shutdown_grace=_env_float("DSIPAM_SHUTDOWN_GRACE", 10.0, minimum=0.0),
            shutdown_delay=_env_float("DSIPAM_SHUTDOWN_DELAY", 1.0, minimum=0.0),
            data_dir=os.environ.get("DSIPAM_DATA_DIR", ""),
            migrate=os.environ.get("DSIPAM_MIGRATE", "") in ("1", "true", "yes"),
            uvloop=os.environ.get("DSIPAM_UVLOOP", "1") not in ("0", "false", "no"),
            fast_path=os.environ.get("DSIPAM_FAST_PATH", "1") not in ("0", "false", "no"),
            workers=_env_int("DSIPAM_WORKERS", 1),
            reuse_port=os.environ.get("DSIPAM_REUSE_PORT", "") in ("1", "true", "yes"),
            db_fast_pool_size=_env_int("DSIPAM_DB_FAST_POOL_SIZE", 4),
            fast_inflight=_env_int("DSIPAM_FAST_INFLIGHT", 2, minimum=1),
            fast_linger_ms=_env_float("DSIPAM_FAST_LINGER_MS", 3.0, minimum=0.0),
            insecure=_env_bool("DSIPAM_INSECURE"),
            auth_config=os.environ.get("DSIPAM_AUTH_CONFIG", ""),
            tls_cert=os.environ.get("DSIPAM_TLS_CERT", ""),
            tls_key=os.environ.get("DSIPAM_TLS_KEY", ""),
            tls_client_ca=os.environ.get("DSIPAM_TLS_CLIENT_CA", ""),
            unix_socket_mode=_env_mode("DSIPAM_UNIX_SOCKET_MODE", 0o660),
            max_message_bytes=_env_int("DSIPAM_MAX_MESSAGE_BYTES", 512 * 1024, minimum=64 * 1024),
            max_concurrent_rpcs=_env_int("DSIPAM_MAX_CONCURRENT_RPCS", 4096, minimum=1),
            request_read_seconds=_env_float("DSIPAM_REQUEST_READ_SECONDS", 10.0, minimum=0.1),
            max_streams_per_connection=_env_int("DSIPAM_MAX_STREAMS_PER_CONNECTION", 4096, minimum=1),
            max_connections=_env_int("DSIPAM_MAX_CONNECTIONS", 4096, minimum=1),
            connection_idle_seconds=_env_float("DSIPAM_CONNECTION_IDLE_SECONDS", 300.0, minimum=0.0),
            connection_age_seconds=_env_float("DSIPAM_CONNECTION_AGE_SECONDS", 0.0, minimum=0.0),
            connection_age_grace_seconds=_env_float("DSIPAM_CONNECTION_AGE_GRACE_SECONDS", 300.0, minimum=0.0),
            keepalive_seconds=_env_float("DSIPAM_KEEPALIVE_SECONDS", 60.0, minimum=1.0),
            keepalive_timeout_seconds=_env_float("DSIPAM_KEEPALIVE_TIMEOUT_SECONDS", 20.0, minimum=1.0),
            min_ping_interval_seconds=_env_float("DSIPAM_MIN_PING_INTERVAL_SECONDS", 10.0, minimum=0.0),
            handshake_timeout_seconds=_env_float("DSIPAM_HANDSHAKE_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            max_excludes_per_pool=pool_limits_from_env()[0],
            max_reservations_per_pool=pool_limits_from_env()[1],
            max_watch_streams=_env_int("DSIPAM_MAX_WATCH_STREAMS", 1000, minimum=0),
            max_watch_streams_per_identity=_env_int("DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY", 200, minimum=0),
            watch_buffer=_env_int("DSIPAM_WATCH_BUFFER", 1000, minimum=1),
            watch_fallback_seconds=_env_float("DSIPAM_WATCH_FALLBACK_SECONDS", 5.0, minimum=0.1),
            token_key=os.environ.get("DSIPAM_TOKEN_KEY", ""),
            token_key_file=os.environ.get("DSIPAM_TOKEN_KEY_FILE", ""),
            metrics_listen=os.environ.get("DSIPAM_METRICS_LISTEN", ""),
            metrics_pool_interval=_env_float("DSIPAM_METRICS_POOL_INTERVAL", 15.0),
            db_health_interval=_env_float("DSIPAM_DB_HEALTH_INTERVAL", 3.0),
        )
