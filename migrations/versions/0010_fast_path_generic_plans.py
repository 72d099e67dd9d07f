"""The fast-path functions plan their statements generically (plan_cache_mode = force_generic_plan).

A custom plan of the owner lookup ``pool_id = <this pool> AND owner = …`` in a pool created
since ipam_allocations was last analyzed estimates one row for the pool and may walk one of
the address keys (which also start with pool_id) with a filter on owner: measured, one lookup
in dsipam_allocate_many scanned 93,226 rows (1.0 s) for a pool created during a benchmark. A
generic plan estimates the pool's rows from the number of distinct pools instead, and the
primary key (pool_id, owner) wins. Reordering the address keys to lead with the address was
tried and dropped: inserts into every pool but the highest-addressed one then split leaf
pages in the middle, and those keys grew to 50% leaf density (283 bytes per pair instead of
230 at 1,000,000 pairs).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29

Online-safe: only changes function settings.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

FUNCTIONS = (
    "dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[])",
    "dsipam_allocate_batch(text, bigint, text[], boolean[], boolean[], jsonb[], text[])",
    "dsipam_release_batch(text, bigint, text[], boolean[], boolean[])",
)


def upgrade() -> None:
    for fn in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {fn} SET plan_cache_mode = force_generic_plan")


def downgrade() -> None:
    for fn in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {fn} RESET plan_cache_mode")
