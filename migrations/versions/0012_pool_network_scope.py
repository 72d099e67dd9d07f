"""Pool networks (address spaces): pools of one network never overlap.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

Adds ``network`` (text, '' = the default network) to ``ipam_pools`` and, kept equal to its
pool's by a foreign key with ON UPDATE CASCADE, to ``ipam_ranges``; an exclusion constraint
(GiST, btree_gist for the text equality) then refuses two ranges of one network that overlap,
even from two concurrent transactions.

Databases made before this revision may hold pools that overlap (nothing refused it). Nothing
is lost: the pools are taken in creation order (id), a pool that overlaps one kept in the
default network before it moves to a network of its own, ``migrated-<pool>``, with its ranges,
blocks and allocations unchanged, and each move is logged (WARNING, logger ``dsipam.migrate``;
``dsipam migrate`` prints it on stderr). Ranges that the range policy now refuses (loopback,
multicast, ...) are also reported; they keep working.

Online: the new columns have a constant default (no table rewrite); the constraint's index is
built over ipam_ranges, which has one row per range (small). Needs the btree_gist extension
(in PostgreSQL's contrib, trusted: a database owner may create it).
"""

from __future__ import annotations

import bisect
import ipaddress
import logging

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

log = logging.getLogger("dsipam.migrate")


def _separate_overlapping_pools(conn: sa.engine.Connection) -> list[tuple[str, str, str, str, str]]:
    """Moves every pool that overlaps an earlier pool to ``migrated-<name>``.

    Returns (pool, its range, other pool, other range, new network) per moved pool.
    """
    rows = conn.execute(
        sa.text(
            "SELECT p.id, p.name, host(r.cidr) || '/' || masklen(r.cidr) AS cidr FROM ipam_pools p "
            "JOIN ipam_ranges r ON r.pool_id = p.id ORDER BY p.id, r.position"
        )
    ).all()
    pools: dict[int, tuple[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]] = {}
    for pool_id, name, cidr in rows:
        pools.setdefault(pool_id, (name, []))[1].append(ipaddress.ip_network(cidr))
    # The default network's ranges so far, per family: disjoint intervals sorted by start.
    starts: dict[int, list[int]] = {4: [], 6: []}
    kept: dict[int, list[tuple[int, int, str, str]]] = {4: [], 6: []}
    moved = []
    for pool_id in sorted(pools):
        name, nets = pools[pool_id]
        clash = None
        for net in nets:
            lo, hi = int(net.network_address), int(net.broadcast_address)
            i = bisect.bisect_right(starts[net.version], hi) - 1
            if i >= 0 and kept[net.version][i][1] >= lo:
                clash = (str(net), kept[net.version][i][2], kept[net.version][i][3])
                break
        if clash is None:
            for net in nets:
                lo, hi = int(net.network_address), int(net.broadcast_address)
                i = bisect.bisect_right(starts[net.version], lo)
                starts[net.version].insert(i, lo)
                kept[net.version].insert(i, (lo, hi, name, str(net)))
            continue
        network = f"migrated-{name}"
        conn.execute(
            sa.text("UPDATE ipam_pools SET network = :n, version = floor(random() * 9e18)::bigint WHERE id = :p"),
            {"n": network, "p": pool_id},
        )
        conn.execute(sa.text("UPDATE ipam_ranges SET network = :n WHERE pool_id = :p"), {"n": network, "p": pool_id})
        moved.append((name, clash[0], clash[1], clash[2], network))
        log.warning(
            "migration 0012: pool %r overlaps pool %r (%s overlaps %s); moved pool %r to network %r with its "
            "ranges and allocations unchanged",
            name, clash[1], clash[0], clash[2], name, network,
        )
    return moved


def _report_refused_ranges(conn: sa.engine.Connection) -> None:
    from dsipam.server.domain._ranges import range_policy_violation

    rows = conn.execute(
        sa.text(
            "SELECT p.name, host(r.cidr) || '/' || masklen(r.cidr) AS cidr FROM ipam_pools p "
            "JOIN ipam_ranges r ON r.pool_id = p.id ORDER BY p.name, r.position"
        )
    ).all()
    for name, cidr in rows:
        reason = range_policy_violation(ipaddress.ip_network(cidr))
        if reason is not None:
            log.warning("migration 0012: pool %r has a range the range policy now refuses: %s. It keeps working; "
                        "new pools and ranges like it are refused", name, reason)


def upgrade() -> None:
    op.add_column("ipam_pools", sa.Column("network", sa.Text, nullable=False, server_default=sa.text("''")))
    op.add_column("ipam_ranges", sa.Column("network", sa.Text, nullable=False, server_default=sa.text("''")))
    conn = op.get_bind()
    _separate_overlapping_pools(conn)
    _report_refused_ranges(conn)
    op.create_unique_constraint("uq_ipam_pools_id_network", "ipam_pools", ["id", "network"])
    op.create_foreign_key(
        "fk_ipam_ranges_pool_network", "ipam_ranges", "ipam_pools", ["pool_id", "network"], ["id", "network"],
        onupdate="CASCADE", ondelete="CASCADE",
    )
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    op.create_exclude_constraint(
        "ex_ipam_ranges_network_cidr", "ipam_ranges", (sa.column("network"), "="), (sa.column("cidr"), "&&"),
        using="gist", ops={"cidr": "inet_ops"},
    )


def downgrade() -> None:
    op.drop_constraint("ex_ipam_ranges_network_cidr", "ipam_ranges")
    op.drop_constraint("fk_ipam_ranges_pool_network", "ipam_ranges", type_="foreignkey")
    op.drop_constraint("uq_ipam_pools_id_network", "ipam_pools", type_="unique")
    op.drop_column("ipam_ranges", "network")
    op.drop_column("ipam_pools", "network")

