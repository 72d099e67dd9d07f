"""The datastore: every SQL statement, transaction and row lock of the service."""

from ._models import allocations, blocks, metadata, pools, ranges
from ._store import Store, StoredPool, StoredRange
from .db import create_engine, database_url_from_env

__all__ = [
    "Store",
    "StoredPool",
    "StoredRange",
    "allocations",
    "blocks",
    "create_engine",
    "database_url_from_env",
    "metadata",
    "pools",
    "ranges",
]
