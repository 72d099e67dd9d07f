"""Settings from DSIPAM_* environment variables; flags override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_LISTEN = "127.0.0.1:50051"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name}: {value!r} is not an integer") from None


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
            shutdown_grace=float(os.environ.get("DSIPAM_SHUTDOWN_GRACE", "10") or 10),
            shutdown_delay=float(os.environ.get("DSIPAM_SHUTDOWN_DELAY", "1") or 1),
            data_dir=os.environ.get("DSIPAM_DATA_DIR", ""),
            migrate=os.environ.get("DSIPAM_MIGRATE", "") in ("1", "true", "yes"),
            uvloop=os.environ.get("DSIPAM_UVLOOP", "1") not in ("0", "false", "no"),
        )
