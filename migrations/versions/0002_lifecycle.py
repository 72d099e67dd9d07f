"""Lifecycle: cooldown, reservations, pool versions, the event outbox and the utilisation view.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Online-safe: only new tables, new columns with constant defaults (no rewrite on PostgreSQL 11+) and a view.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from dsipam.server.store._models import XID8

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTILISATION_VIEW = """
CREATE VIEW ipam_utilisation AS
SELECT p.name AS pool, r.family,
       sum(r.size) AS size,
       coalesce(sum(b.used), 0) AS allocated,
       coalesce(sum(b.cooling), 0) AS cooldown
  FROM ipam_pools p
  JOIN ipam_ranges r ON r.pool_id = p.id
  LEFT JOIN (SELECT range_id, sum(avail_count - free_count - cooling) AS used, sum(cooling) AS cooling
               FROM ipam_blocks GROUP BY range_id) b ON b.range_id = r.id
 GROUP BY p.name, r.family
"""


def upgrade() -> None:
    op.add_column("ipam_pools", sa.Column("cooldown_ms", sa.Integer, nullable=False, server_default=sa.text("30000")))
    op.add_column("ipam_pools", sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")))
    op.create_check_constraint("ck_ipam_pools_cooldown", "ipam_pools", "cooldown_ms >= 0")
    op.add_column("ipam_blocks", sa.Column("cooling", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.create_check_constraint("ck_ipam_blocks_cooling", "ipam_blocks", "cooling >= 0")
    op.create_table(
        "ipam_cooldowns",
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("address", pg.INET, nullable=False),
        sa.Column("family", sa.SmallInteger, nullable=False),
        sa.Column("block_id", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "address", name="pk_ipam_cooldowns"),
        sa.ForeignKeyConstraint(["pool_id"], ["ipam_pools.id"], name="fk_ipam_cooldowns_pool_id_ipam_pools",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["block_id"], ["ipam_blocks.id"], name="fk_ipam_cooldowns_block_id_ipam_blocks",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_ipam_cooldowns_until", "ipam_cooldowns", ["until"])
    op.create_index("ix_ipam_cooldowns_pool_family_until", "ipam_cooldowns", ["pool_id", "family", "until"])
    op.create_table(
        "ipam_reservations",
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("cidr", pg.CIDR, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("pool_id", "cidr", name="pk_ipam_reservations"),
        sa.ForeignKeyConstraint(["pool_id"], ["ipam_pools.id"], name="fk_ipam_reservations_pool_id_ipam_pools",
                                ondelete="CASCADE"),
    )
    op.create_table(
        "ipam_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("xid", XID8(), nullable=False, server_default=sa.text("pg_current_xact_id()")),
        sa.Column("type", sa.SmallInteger, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("ipv4", pg.INET),
        sa.Column("ipv6", pg.INET),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_ipam_events"),
        sa.ForeignKeyConstraint(["pool_id"], ["ipam_pools.id"], name="fk_ipam_events_pool_id_ipam_pools",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_ipam_events_pool_id_xid_id", "ipam_events", ["pool_id", "xid", "id"])
    op.create_index("ix_ipam_events_time", "ipam_events", ["time"])
    op.execute(UTILISATION_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW ipam_utilisation")
    op.drop_table("ipam_events")
    op.drop_table("ipam_reservations")
    op.drop_table("ipam_cooldowns")
    op.drop_constraint("ck_ipam_blocks_cooling", "ipam_blocks")
    op.drop_column("ipam_blocks", "cooling")
    op.drop_constraint("ck_ipam_pools_cooldown", "ipam_pools")
    op.drop_column("ipam_pools", "version")
    op.drop_column("ipam_pools", "cooldown_ms")
