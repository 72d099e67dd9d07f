"""HOT block updates and deadlock-free batched releases.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

* ``ipam_blocks.has_free`` (generated: ``free_count > 0``) replaces ``free_count > 0`` in the
  free-block index predicate. An update that takes or frees one bit now changes no indexed value
  (``has_free`` only flips when a block fills up or gets its first free bit back), so PostgreSQL
  can update the row in place (HOT) instead of writing into every index; ``fillfactor = 70``
  leaves the room on each page that HOT needs.
* ``dsipam_release_batch`` locks the batch's owner rows in owner order, then gives addresses
  back in (family, address) order: concurrent release batches take block locks in one global
  order and cannot deadlock.

Not online-safe: adding a stored generated column rewrites ``ipam_blocks`` (one row per block,
small next to the allocations), and the index is rebuilt; run it in a quiet window.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TAKE = r"""
CREATE OR REPLACE FUNCTION dsipam_take(p_pool integer, p_family smallint, p_node text,
                                       OUT block_id bigint, OUT pos integer, OUT ip inet)
LANGUAGE plpgsql AS $$
BEGIN
    -- The first free bit of an existing block that no other transaction holds: the
    -- node's own blocks, or blocks of no node. NULL when none (the caller falls back to
    -- the full path, which creates and claims blocks and waits for locked ones).
    IF p_node IS NULL THEN
        WITH b AS (
            SELECT k.id, position(B'0' IN k.bitmap) - 1 AS pos
              FROM ipam_blocks k
             WHERE k.pool_id = p_pool AND k.family = p_family AND k.has_free AND k.node IS NULL
             ORDER BY k.id LIMIT 1
               FOR UPDATE SKIP LOCKED)
        UPDATE ipam_blocks k SET bitmap = set_bit(k.bitmap, b.pos, 1), free_count = k.free_count - 1
          FROM b WHERE k.id = b.id
        RETURNING k.id, b.pos, set_masklen(k.base + b.pos, CASE WHEN p_family = 4 THEN 32 ELSE 128 END)
          INTO block_id, pos, ip;
    ELSE
        WITH b AS (
            SELECT k.id, position(B'0' IN k.bitmap) - 1 AS pos
              FROM ipam_blocks k
             WHERE k.pool_id = p_pool AND k.node = p_node AND k.family = p_family AND k.has_free
             ORDER BY k.id LIMIT 1
               FOR UPDATE SKIP LOCKED)
        UPDATE ipam_blocks k SET bitmap = set_bit(k.bitmap, b.pos, 1), free_count = k.free_count - 1
          FROM b WHERE k.id = b.id
        RETURNING k.id, b.pos, set_masklen(k.base + b.pos, CASE WHEN p_family = 4 THEN 32 ELSE 128 END)
          INTO block_id, pos, ip;
    END IF;
END $$;
"""

RELEASE_BATCH = r"""
CREATE OR REPLACE FUNCTION dsipam_release_batch(
    p_pool_name text, p_version bigint, p_owners text[], p_drop4 boolean[], p_drop6 boolean[])
RETURNS TABLE (idx integer, status text, ipv4 text, ipv6 text)
LANGUAGE plpgsql AS $$
-- Releases a batch exactly as the full path releases one owner: each dropped address goes into
-- cooldown (its bit stays set and its block's cooling counter counts it) or, without cooldown,
-- its bit is cleared (or, when reserved, it stops counting as usable); the row is updated or
-- deleted and a RELEASED event is written. Per owner, status is 'released' (ipv4/ipv6: what was
-- released), 'none' (nothing to release) or 'stale' (pool gone or layout changed: the caller
-- runs its full path). Locks: owner rows in owner order, then blocks in (family, address) order.
DECLARE
    v_pool integer;
    v_version bigint;
    v_cooldown integer;
    v_row record;
    v_n integer := coalesce(array_length(p_owners, 1), 0);
    v_old4 inet[] := array_fill(NULL::inet, ARRAY[v_n]);
    v_old6 inet[] := array_fill(NULL::inet, ARRAY[v_n]);
    v_d4 boolean[] := array_fill(false, ARRAY[v_n]);
    v_d6 boolean[] := array_fill(false, ARRAY[v_n]);
    v_give record;
    v_block bigint;
    v_off integer;
    i integer;
BEGIN
    SELECT p.id, p.version, p.cooldown_ms INTO v_pool, v_version, v_cooldown
      FROM ipam_pools p WHERE p.name = p_pool_name;
    IF v_pool IS NULL OR v_version <> p_version THEN
        FOR i IN 1 .. v_n LOOP
            idx := i - 1; status := 'stale'; ipv4 := NULL; ipv6 := NULL;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- 1. Lock the owners' rows, in owner order.
    FOR i IN SELECT o.n FROM unnest(p_owners) WITH ORDINALITY AS o(owner, n) ORDER BY o.owner, o.n LOOP
        SELECT a.ipv4, a.ipv6 INTO v_row FROM ipam_allocations a
         WHERE a.pool_id = v_pool AND a.owner = p_owners[i] FOR UPDATE;
        IF FOUND THEN
            v_old4[i] := v_row.ipv4; v_old6[i] := v_row.ipv6;
            v_d4[i] := p_drop4[i] AND v_row.ipv4 IS NOT NULL;
            v_d6[i] := p_drop6[i] AND v_row.ipv6 IS NOT NULL;
        END IF;
    END LOOP;
    -- 2. Give the addresses back, in (family, address) order: one lock order over blocks.
    FOR v_give IN
        SELECT * FROM (
            SELECT 4 AS fam, v_old4[n] AS addr, p_owners[n] AS owner FROM generate_series(1, v_n) n WHERE v_d4[n]
            UNION ALL
            SELECT 6, v_old6[n], p_owners[n] FROM generate_series(1, v_n) n WHERE v_d6[n]) g
         ORDER BY fam, addr
    LOOP
        v_block := NULL;
        SELECT b.id, (v_give.addr - b.base)::integer INTO v_block, v_off
          FROM ipam_ranges r
          JOIN ipam_blocks b ON b.range_id = r.id AND b.base = network(set_masklen(v_give.addr, r.block_prefix))
         WHERE r.pool_id = v_pool AND r.cidr >>= v_give.addr;
        IF v_block IS NULL THEN
            CONTINUE;  -- its range was removed: nothing to give back
        END IF;
        IF v_cooldown > 0 THEN
            UPDATE ipam_blocks SET cooling = cooling + 1 WHERE id = v_block;
            INSERT INTO ipam_cooldowns (pool_id, address, family, block_id, owner, until)
            VALUES (v_pool, v_give.addr, v_give.fam, v_block, v_give.owner,
                    now() + make_interval(secs => v_cooldown / 1000.0));
        ELSIF EXISTS (SELECT 1 FROM ipam_reservations s WHERE s.pool_id = v_pool AND s.cidr >>= v_give.addr) THEN
            UPDATE ipam_blocks SET avail_count = avail_count - 1 WHERE id = v_block;
        ELSE
            UPDATE ipam_blocks SET bitmap = set_bit(bitmap, v_off, 0), free_count = free_count + 1
             WHERE id = v_block AND get_bit(bitmap, v_off) = 1;
        END IF;
    END LOOP;
    -- 3. Update or delete the rows, write the events, answer.
    FOR i IN 1 .. v_n LOOP
        idx := i - 1; status := 'none'; ipv4 := NULL; ipv6 := NULL;
        IF v_d4[i] OR v_d6[i] THEN
            IF (v_d4[i] OR v_old4[i] IS NULL) AND (v_d6[i] OR v_old6[i] IS NULL) THEN
                DELETE FROM ipam_allocations WHERE pool_id = v_pool AND owner = p_owners[i];
            ELSE
                UPDATE ipam_allocations
                   SET ipv4 = CASE WHEN v_d4[i] THEN NULL ELSE ipv4 END,
                       ipv6 = CASE WHEN v_d6[i] THEN NULL ELSE ipv6 END
                 WHERE pool_id = v_pool AND owner = p_owners[i];
            END IF;
            INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6)
            VALUES (v_pool, 2, p_owners[i], CASE WHEN v_d4[i] THEN v_old4[i] END, CASE WHEN v_d6[i] THEN v_old6[i] END);
            status := 'released';
            ipv4 := CASE WHEN v_d4[i] THEN host(v_old4[i]) END;
            ipv6 := CASE WHEN v_d6[i] THEN host(v_old6[i]) END;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.add_column("ipam_blocks", sa.Column("has_free", sa.Boolean, sa.Computed("free_count > 0", persisted=True)))
    op.execute("ALTER TABLE ipam_blocks SET (fillfactor = 70)")
    op.drop_index("ix_ipam_blocks_free", table_name="ipam_blocks")
    op.create_index("ix_ipam_blocks_free", "ipam_blocks", ["pool_id", "family", "id"],
                    postgresql_where=sa.text("has_free AND node IS NULL"))
    op.execute(TAKE)
    op.execute(RELEASE_BATCH)


def downgrade() -> None:
    from importlib import import_module

    previous = import_module("dsipam.migrations.versions.0005_fast_release")
    fast = import_module("dsipam.migrations.versions.0004_fast_path")
    op.execute(previous.RELEASE_BATCH)
    op.execute(fast.TAKE)
    op.drop_index("ix_ipam_blocks_free", table_name="ipam_blocks")
    op.create_index("ix_ipam_blocks_free", "ipam_blocks", ["pool_id", "family", "id"],
                    postgresql_where=sa.text("free_count > 0 AND node IS NULL"))
    op.execute("ALTER TABLE ipam_blocks RESET (fillfactor)")
    op.drop_column("ipam_blocks", "has_free")
