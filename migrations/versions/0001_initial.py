"""Initial schema: pools, ranges, lazily created blocks, allocations.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ipam_pools",
        sa.Column("id", sa.Integer, sa.Identity(), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("labels", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_ipam_pools"),
        sa.UniqueConstraint("name", name="uq_ipam_pools_name"),
    )
    op.create_table(
        "ipam_ranges",
        sa.Column("id", sa.Integer, sa.Identity(), nullable=False),
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("position", sa.SmallInteger, nullable=False),
        sa.Column("family", sa.SmallInteger, nullable=False),
        sa.Column("cidr", pg.CIDR, nullable=False),
        sa.Column("first_ip", pg.INET),
        sa.Column("last_ip", pg.INET),
        sa.Column("gateway", pg.INET),
        sa.Column("exclude", pg.ARRAY(pg.CIDR), nullable=False, server_default=sa.text("'{}'::cidr[]")),
        sa.Column("block_prefix", sa.SmallInteger, nullable=False),
        sa.Column("size", sa.Numeric(40, 0), nullable=False),
        sa.Column("next_block", pg.INET),
        sa.PrimaryKeyConstraint("id", name="pk_ipam_ranges"),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["ipam_pools.id"], name="fk_ipam_ranges_pool_id_ipam_pools", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("pool_id", "position", name="uq_ipam_ranges_pool_id_position"),
        sa.CheckConstraint("family IN (4, 6) AND family(cidr) = family", name="ck_ipam_ranges_family"),
    )
    op.create_table(
        "ipam_blocks",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("range_id", sa.Integer, nullable=False),
        sa.Column("family", sa.SmallInteger, nullable=False),
        sa.Column("base", pg.CIDR, nullable=False),
        sa.Column("bitmap", pg.BIT(varying=True), nullable=False),
        sa.Column("free_count", sa.Integer, nullable=False),
        sa.Column("avail_count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ipam_blocks"),
        sa.ForeignKeyConstraint(
            ["range_id"], ["ipam_ranges.id"], name="fk_ipam_blocks_range_id_ipam_ranges", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("range_id", "base", name="uq_ipam_blocks_range_id_base"),
        sa.CheckConstraint("free_count >= 0 AND free_count <= avail_count", name="ck_ipam_blocks_counts"),
    )
    op.create_index(
        "ix_ipam_blocks_free",
        "ipam_blocks",
        ["pool_id", "family", "id"],
        postgresql_where=sa.text("free_count > 0"),
    )
    op.create_table(
        "ipam_allocations",
        sa.Column("pool_id", sa.Integer, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("ipv4", pg.INET),
        sa.Column("ipv6", pg.INET),
        sa.Column("attributes", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("pool_id", "owner", name="pk_ipam_allocations"),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["ipam_pools.id"], name="fk_ipam_allocations_pool_id_ipam_pools", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("pool_id", "ipv4", name="uq_ipam_allocations_pool_id_ipv4"),
        sa.UniqueConstraint("pool_id", "ipv6", name="uq_ipam_allocations_pool_id_ipv6"),
        sa.CheckConstraint("ipv4 IS NOT NULL OR ipv6 IS NOT NULL", name="ck_ipam_allocations_some_address"),
        sa.CheckConstraint("family(ipv4) = 4 AND family(ipv6) = 6", name="ck_ipam_allocations_families"),
    )


def downgrade() -> None:
    op.drop_table("ipam_allocations")
    op.drop_index("ix_ipam_blocks_free", table_name="ipam_blocks")
    op.drop_table("ipam_blocks")
    op.drop_table("ipam_ranges")
    op.drop_table("ipam_pools")
