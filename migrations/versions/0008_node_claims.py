"""The fast path claims a spare block for a node whose blocks are full, instead of falling back.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

Online-safe: only creates and replaces functions.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CLAIM = r"""
CREATE OR REPLACE FUNCTION dsipam_claim(p_pool integer, p_family smallint, p_node text,
                                        OUT block_id bigint, OUT pos integer, OUT ip inet)
LANGUAGE plpgsql AS $$
-- The node has no unlocked block with room: claim an empty block of no node for it and take its
-- first bit, exactly as the full path does, under the same per-(pool, family, node) advisory
-- lock. It never waits: when another transaction holds that lock, or one of the node's blocks
-- with room is held by another transaction (claiming now could give the node a block too many),
-- it returns NULL and the caller takes the full path, which waits.
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('dsipam:' || p_pool || ':' || p_family || ':' || p_node, 0)) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM ipam_blocks k WHERE k.pool_id = p_pool AND k.node = p_node
                  AND k.family = p_family AND k.has_free) THEN
        RETURN;
    END IF;
    WITH b AS (
        SELECT k.id, position(B'0' IN k.bitmap) - 1 AS pos
          FROM ipam_blocks k
         WHERE k.pool_id = p_pool AND k.family = p_family AND k.has_free AND k.node IS NULL
           AND k.free_count = k.avail_count AND k.cooling = 0
         ORDER BY k.id LIMIT 1
           FOR UPDATE SKIP LOCKED)
    UPDATE ipam_blocks k SET node = p_node, bitmap = set_bit(k.bitmap, b.pos, 1), free_count = k.free_count - 1
      FROM b WHERE k.id = b.id
    RETURNING k.id, b.pos, set_masklen(k.base + b.pos, CASE WHEN p_family = 4 THEN 32 ELSE 128 END)
      INTO block_id, pos, ip;
END $$;
"""

ALLOCATE_BATCH = r"""
CREATE OR REPLACE FUNCTION dsipam_allocate_batch(
    p_pool_name text, p_version bigint, p_owners text[], p_want4 boolean[], p_want6 boolean[],
    p_attrs jsonb[], p_nodes text[])
RETURNS TABLE (idx integer, status text, ipv4 text, ipv6 text, attributes jsonb,
               create_time timestamptz, node text, borrowed boolean)
LANGUAGE plpgsql AS $$
-- Allocates each owner in turn, in the caller's transaction. Per owner, status is
--   'created'  addresses taken and the allocation row (and its event) inserted;
--   'exists'   the owner already holds every family asked for (nothing changed);
--   'slow'     anything else (a family without a free bit in an unlocked block, an upgrade,
--              a concurrent insert of the same owner): nothing was changed for this owner
--              and the caller runs its full path for it;
--   'stale'    the pool is gone or its layout version changed: every owner goes the full path.
DECLARE
    v_pool integer;
    v_version bigint;
    v_row record;
    v_node text;
    t4 record;
    t6 record;
    i integer;
BEGIN
    SELECT p.id, p.version INTO v_pool, v_version FROM ipam_pools p WHERE p.name = p_pool_name;
    IF v_pool IS NULL OR v_version <> p_version THEN
        FOR i IN 1 .. coalesce(array_length(p_owners, 1), 0) LOOP
            idx := i - 1; status := 'stale';
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_owners, 1), 0) LOOP
        idx := i - 1;
        status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL; create_time := NULL;
        node := NULL; borrowed := NULL;
        v_node := nullif(p_nodes[i], '');
        -- No row lock: an owner that already holds everything asked for is answered from a plain
        -- read (the CNI retry path); an upgrade goes to the full path, which locks the row; a new
        -- owner's insert below settles races through the primary key.
        SELECT a.ipv4, a.ipv6, a.attributes, a.create_time, a.node, a.borrowed INTO v_row
          FROM ipam_allocations a WHERE a.pool_id = v_pool AND a.owner = p_owners[i];
        IF FOUND THEN
            IF NOT ((p_want4[i] AND v_row.ipv4 IS NULL) OR (p_want6[i] AND v_row.ipv6 IS NULL)) THEN
                status := 'exists'; ipv4 := host(v_row.ipv4); ipv6 := host(v_row.ipv6);
                attributes := v_row.attributes; create_time := v_row.create_time;
                node := v_row.node; borrowed := v_row.borrowed;
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        t4 := NULL; t6 := NULL;
        IF p_want4[i] THEN
            SELECT * INTO t4 FROM dsipam_take(v_pool, 4::smallint, v_node);
            IF t4.block_id IS NULL AND v_node IS NOT NULL THEN
                SELECT * INTO t4 FROM dsipam_claim(v_pool, 4::smallint, v_node);
            END IF;
            IF t4.block_id IS NULL THEN
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        IF p_want6[i] THEN
            SELECT * INTO t6 FROM dsipam_take(v_pool, 6::smallint, v_node);
            IF t6.block_id IS NULL AND v_node IS NOT NULL THEN
                SELECT * INTO t6 FROM dsipam_claim(v_pool, 6::smallint, v_node);
            END IF;
            IF t6.block_id IS NULL THEN
                IF t4.block_id IS NOT NULL THEN  -- give the IPv4 bit back: we still hold its block
                    UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4.pos, 0), free_count = free_count + 1
                     WHERE id = t4.block_id;
                END IF;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO ipam_allocations AS a (pool_id, owner, ipv4, ipv6, attributes, node, borrowed)
        VALUES (v_pool, p_owners[i], t4.ip, t6.ip, p_attrs[i], v_node, false)
        ON CONFLICT (pool_id, owner) DO NOTHING
        RETURNING a.attributes, a.create_time INTO attributes, create_time;
        IF NOT FOUND THEN  -- a concurrent Allocate of the same owner won: undo, full path
            IF t4.block_id IS NOT NULL THEN
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4.pos, 0), free_count = free_count + 1
                 WHERE id = t4.block_id;
            END IF;
            IF t6.block_id IS NOT NULL THEN
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t6.pos, 0), free_count = free_count + 1
                 WHERE id = t6.block_id;
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6) VALUES (v_pool, 1, p_owners[i], t4.ip, t6.ip);
        status := 'created'; ipv4 := host(t4.ip); ipv6 := host(t6.ip); node := v_node; borrowed := false;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.execute(CLAIM)
    op.execute(ALLOCATE_BATCH)


def downgrade() -> None:
    from importlib import import_module

    op.execute(import_module("dsipam.migrations.versions.0007_lockfree_exists").ALLOCATE_BATCH)
    op.execute("DROP FUNCTION dsipam_claim(integer, smallint, text)")
