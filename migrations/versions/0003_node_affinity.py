"""Node affinity: blocks affine to a node, per-pool affinity mode, node and borrowed per allocation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Not fully online-safe: the new columns are (nullable or constant defaults, no rewrite), but the
free-block index is dropped and rebuilt inside the migration's transaction, so ipam_blocks is
locked (ACCESS EXCLUSIVE, then SHARE) until it commits and allocations wait meanwhile. It is quick
while blocks are few; on a large database run it in a quiet window (see docs/operations.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ipam_pools", sa.Column("node_affinity", sa.SmallInteger, nullable=False,
                                          server_default=sa.text("1")))
    op.create_check_constraint("ck_ipam_pools_node_affinity", "ipam_pools", "node_affinity IN (1, 2)")
    op.add_column("ipam_blocks", sa.Column("node", sa.Text))
    op.drop_index("ix_ipam_blocks_free", table_name="ipam_blocks")
    op.create_index("ix_ipam_blocks_free", "ipam_blocks", ["pool_id", "family", "id"],
                    postgresql_where=sa.text("free_count > 0 AND node IS NULL"))
    op.create_index("ix_ipam_blocks_node", "ipam_blocks", ["pool_id", "node", "family", "id"],
                    postgresql_where=sa.text("node IS NOT NULL"))
    op.add_column("ipam_allocations", sa.Column("node", sa.Text))
    op.add_column("ipam_allocations", sa.Column("borrowed", sa.Boolean, nullable=False,
                                                server_default=sa.text("false")))


def downgrade() -> None:
    op.drop_column("ipam_allocations", "borrowed")
    op.drop_column("ipam_allocations", "node")
    op.drop_index("ix_ipam_blocks_node", table_name="ipam_blocks")
    op.drop_index("ix_ipam_blocks_free", table_name="ipam_blocks")
    op.create_index("ix_ipam_blocks_free", "ipam_blocks", ["pool_id", "family", "id"],
                    postgresql_where=sa.text("free_count > 0"))
    op.drop_column("ipam_blocks", "node")
    op.drop_constraint("ck_ipam_pools_node_affinity", "ipam_pools")
    op.drop_column("ipam_pools", "node_affinity")
