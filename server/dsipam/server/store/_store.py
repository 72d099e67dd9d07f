"""The Store: every SQL statement of the service, in two halves.

``_alloc.AllocationStore`` is the engine (allocate, release, cooldown, GC, reads, fsck);
``_admin.AdminStore`` manages pools (create, delete, update, reservations, ranges,
migration, the event outbox). ``_base.StoreBase`` holds transactions and layouts.
"""

from __future__ import annotations

from ._admin import AdminStore, Event, MigrationProgress
from ._alloc import AllocationStore
from ._base import StoredPool, StoredRange


class Store(AdminStore, AllocationStore):
    """The datastore. Every method runs its own transaction(s)."""


__all__ = ["Event", "MigrationProgress", "Store", "StoredPool", "StoredRange"]
