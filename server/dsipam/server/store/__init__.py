"""The datastore: every SQL statement, transaction and row lock of the service."""

from ._models import allocations, blocks, cooldowns, events, metadata, pools, ranges, reservations
from ._store import Event, MigrationProgress, Store, StoredPool, StoredRange
from .db import create_engine, database_url_from_env

__all__ = [
    "Event",
    "MigrationProgress",
    "Store",
    "StoredPool",
    "StoredRange",
    "allocations",
    "blocks",
    "cooldowns",
    "create_engine",
    "database_url_from_env",
    "events",
    "metadata",
    "pools",
    "ranges",
    "reservations",
]
