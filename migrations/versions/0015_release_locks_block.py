"""The fast path's release without cooldown decides under the block's lock whether the address
is reserved.

``dsipam_release_batch`` (0011) checked ``ipam_reservations`` and only then updated the block.
ReserveAddresses locks the blocks, then reads what is held: a reservation with force of the
address being released that held the block while the function checked (or committed between the
check and the update) saw the allocation, left the bit alone, and was undone: the function then
cleared the bit of a reserved address (fsck: held but not marked taken; the address handed out
again). The block is now locked first; the check, a statement of its own, then sees a reservation
that committed while the function waited. Found by review
(tests/integration/test_reservations_held.py).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05

Online-safe: replaces one function.
"""

from __future__ import annotations

from importlib import import_module

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_V0011 = import_module("dsipam.migrations.versions.0011_fast_path_fixes")
RELEASE_BATCH_SIG = _V0011.RELEASE_BATCH_SIG

_COOL = """        IF v_cooldown > 0 THEN
            UPDATE ipam_blocks SET cooling = cooling + 1 WHERE id = v_block;"""
# The block locked first, by a statement of its own: the reservation check that follows (a new
# statement, a new snapshot) sees a reservation that committed while this one waited.
_LOCKED = """        IF v_cooldown = 0 THEN
            PERFORM 1 FROM ipam_blocks b WHERE b.id = v_block FOR UPDATE;
        END IF;
""" + _COOL
assert _V0011.RELEASE_BATCH.count(_COOL) == 1
RELEASE_BATCH = _V0011.RELEASE_BATCH.replace(_COOL, _LOCKED)


def _generic_plans() -> None:
    # As 0010: CREATE OR REPLACE FUNCTION drops a function's SET clauses, so set it again.
    op.execute(f"ALTER FUNCTION {RELEASE_BATCH_SIG} SET plan_cache_mode = force_generic_plan")


def upgrade() -> None:
    op.execute(RELEASE_BATCH)
    _generic_plans()


def downgrade() -> None:
    op.execute(_V0011.RELEASE_BATCH)
    _generic_plans()
