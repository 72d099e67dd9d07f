"""The schema, as SQLAlchemy Core tables. Alembic migrations in ``migrations/`` create it;
``alembic check`` proves the two agree."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.types import UserDefinedType


class XID8(UserDefinedType):  # type: ignore[type-arg]
    """PostgreSQL's 64-bit transaction id (pg_current_xact_id())."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


def _register_xid8() -> None:
    from sqlalchemy.dialects.postgresql import base

    base.ischema_names.setdefault("xid8", XID8)


_register_xid8()


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

pools = sa.Table(
    "ipam_pools",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("labels", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # How long a released address waits before it is handed out again.
    sa.Column("cooldown_ms", sa.Integer, nullable=False, server_default=sa.text("30000")),
    # Changed (to a random value) on every change of ranges or reservations: servers cache a
    # pool's layout by (id, create_time, version).
    sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
    # 1: borrow (take from another node's block when the node has none left), 2: strict.
    sa.Column("node_affinity", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
    # The address space (migration 0012): pools of one network never overlap; '' is the default.
    sa.Column("network", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.CheckConstraint("cooldown_ms >= 0", name="cooldown"),
    sa.CheckConstraint("node_affinity IN (1, 2)", name="node_affinity"),
    sa.UniqueConstraint("id", "network", name="uq_ipam_pools_id_network"),  # the target of ranges' network key
)

# One row per range. ``next_block`` is the base of the next block that lazy block
# creation considers; NULL once every block of the range exists or was skipped.
ranges = sa.Table(
    "ipam_ranges",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("pool_id", sa.Integer, sa.ForeignKey("ipam_pools.id", ondelete="CASCADE"), nullable=False),
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
    # The pool's network, kept equal to it by the foreign key below (ON UPDATE CASCADE), so
    # that one exclusion constraint refuses overlapping ranges of one network, even from
    # concurrent transactions (GiST over (network, cidr); btree_gist provides text equality).
    sa.Column("network", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.UniqueConstraint("pool_id", "position"),
    sa.CheckConstraint("family IN (4, 6) AND family(cidr) = family", name="family"),
    sa.ForeignKeyConstraint(
        ["pool_id", "network"], ["ipam_pools.id", "ipam_pools.network"], name="fk_ipam_ranges_pool_network",
        onupdate="CASCADE", ondelete="CASCADE",
    ),
    pg.ExcludeConstraint(
        (sa.column("network"), "="), (sa.column("cidr"), "&&"), name="ex_ipam_ranges_network_cidr", using="gist",
        ops={"cidr": "inet_ops"},
    ),
)

# Blocks are created lazily. Bit i of ``bitmap`` is set when address base+i is
# allocated or can never be handed out; ``free_count`` counts the zero bits and
# ``avail_count`` counts the bits that were zero when the block was created.
blocks = sa.Table(
    "ipam_blocks",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("pool_id", sa.Integer, nullable=False),
    sa.Column("range_id", sa.Integer, sa.ForeignKey("ipam_ranges.id", ondelete="CASCADE"), nullable=False),
    sa.Column("family", sa.SmallInteger, nullable=False),
    sa.Column("base", pg.CIDR, nullable=False),
    sa.Column("bitmap", pg.BIT(varying=True), nullable=False),
    sa.Column("free_count", sa.Integer, nullable=False),
    sa.Column("avail_count", sa.Integer, nullable=False),
    # Released addresses of this block in cooldown (their bits stay set until reclaimed).
    sa.Column("cooling", sa.Integer, nullable=False, server_default=sa.text("0")),
    # The node this block is affine to (claimed under a row lock: one node per block).
    sa.Column("node", sa.Text),
    # Only flips when the block fills up or gets a free bit back, so taking or freeing one bit
    # changes no indexed value and the update can be HOT (see migration 0006).
    sa.Column("has_free", sa.Boolean, sa.Computed("free_count > 0", persisted=True)),
    sa.UniqueConstraint("range_id", "base"),
    sa.CheckConstraint("free_count >= 0 AND free_count <= avail_count", name="counts"),
    sa.CheckConstraint("cooling >= 0", name="cooling"),
    sa.Index(
        "ix_ipam_blocks_free",
        "pool_id",
        "family",
        "id",
        postgresql_where=sa.text("has_free AND node IS NULL"),
    ),
    # The batch fast path's walk over blocks with room, lowest address first (migration 0009).
    sa.Index(
        "ix_ipam_blocks_free_base",
        "pool_id",
        "family",
        "base",
        postgresql_where=sa.text("has_free AND node IS NULL"),
    ),
    sa.Index("ix_ipam_blocks_node", "pool_id", "node", "family", "id", postgresql_where=sa.text("node IS NOT NULL")),
    postgresql_with={"fillfactor": 70},
)

# One row per (pool, owner), one column per family: the primary key is the
# "at most one address per family per owner" constraint, and the two unique
# constraints are the "(pool, address)" constraint that backs the engine up.
allocations = sa.Table(
    "ipam_allocations",
    metadata,
    sa.Column("pool_id", sa.Integer, sa.ForeignKey("ipam_pools.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("ipv4", pg.INET),
    sa.Column("ipv6", pg.INET),
    sa.Column("attributes", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("node", sa.Text),
    # An address came from another node's block (borrow mode).
    sa.Column("borrowed", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.UniqueConstraint("pool_id", "ipv4"),
    sa.UniqueConstraint("pool_id", "ipv6"),
    sa.CheckConstraint("ipv4 IS NOT NULL OR ipv6 IS NOT NULL", name="some_address"),
    sa.CheckConstraint("family(ipv4) = 4 AND family(ipv6) = 6", name="families"),
)

# Released addresses waiting out the pool's cooldown. Their block bits stay set
# until a reclaimer deletes the row and clears the bit, in one transaction.
cooldowns = sa.Table(
    "ipam_cooldowns",
    metadata,
    sa.Column("pool_id", sa.Integer, sa.ForeignKey("ipam_pools.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("address", pg.INET, primary_key=True),
    sa.Column("family", sa.SmallInteger, nullable=False),
    sa.Column("block_id", sa.BigInteger, sa.ForeignKey("ipam_blocks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_ipam_cooldowns_until", "until"),
    sa.Index("ix_ipam_cooldowns_pool_family_until", "pool_id", "family", "until"),
)

# Addresses or CIDRs reserved on a live pool.
reservations = sa.Table(
    "ipam_reservations",
    metadata,
    sa.Column("pool_id", sa.Integer, sa.ForeignKey("ipam_pools.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("cidr", pg.CIDR, primary_key=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# The outbox of allocate/release events that WatchAllocations streams. Events are
# delivered in (xid, id) order and only once every transaction with a smaller xid
# has ended, so a resumed watcher never misses one.
events = sa.Table(
    "ipam_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("pool_id", sa.Integer, sa.ForeignKey("ipam_pools.id", ondelete="CASCADE"), nullable=False),
    sa.Column("xid", XID8(), nullable=False, server_default=sa.text("pg_current_xact_id()")),
    sa.Column("type", sa.SmallInteger, nullable=False),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("ipv4", pg.INET),
    sa.Column("ipv6", pg.INET),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("ix_ipam_events_pool_id_xid_id", "pool_id", "xid", "id"),
    sa.Index("ix_ipam_events_time", "time"),
)


# Keys that authenticate page and resume tokens when none is configured (migration 0013): the
# newest rows are accepted, a row inserted with DEFAULT VALUES is a rotation (docs/security.md).
token_keys = sa.Table(
    "ipam_token_keys",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("key", sa.LargeBinary, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("octet_length(key) >= 32", name="key_length"),
)
