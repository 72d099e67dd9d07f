"""The node variant of the fast path gives back a block it claimed when the owner fails.

``dsipam_allocate_batch`` (0011) claims an empty block for a node (``dsipam_claim``) when the
node has none with room. When the owner then fails (its other family has no free address, or a
concurrent Allocate of the same owner won), the function gives the address back and answers
'slow' ("nothing changed") -- but the block stayed the node's. The full path then rolls its own
work back, so the fast server ended with a claim the full server does not have; with strict node
affinity another node's Allocate then got RESOURCE_EXHAUSTED where the full path answers OK.
Found by tests/integration/test_engines_differential.py (its two explicit examples). The block
now goes back to no node with the bit.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

Online-safe: replaces one function.
"""

from __future__ import annotations

from importlib import import_module

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ALLOCATE_BATCH_SIG = "dsipam_allocate_batch(text, bigint, text[], boolean[], boolean[], jsonb[], text[])"

ALLOCATE_BATCH = r"""
CREATE OR REPLACE FUNCTION dsipam_allocate_batch(
    p_pool_name text, p_version bigint, p_owners text[], p_want4 boolean[], p_want6 boolean[],
    p_attrs jsonb[], p_nodes text[])
RETURNS TABLE (idx integer, status text, ipv4 text, ipv6 text, attributes jsonb,
               create_time timestamptz, node text, borrowed boolean)
LANGUAGE plpgsql AS $$
-- Allocates each owner in turn (in owner order), in the caller's transaction. Per owner, status is
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
    -- The address taken of each family: NULL when the family is not wanted (or none was free).
    t4_block bigint;
    c4 boolean := false;  -- t4/t6 were claimed for the node by dsipam_claim in this call
    c6 boolean := false;
    t4_pos integer;
    t4_ip inet;
    t6_block bigint;
    t6_pos integer;
    t6_ip inet;
    i integer;
BEGIN
    -- KEY SHARE, as the foreign keys of the rows inserted below take it anyway, but before any block
    -- lock: a DeletePool (which holds the pool row, then locks the blocks) is waited for here, not
    -- met holding blocks it waits for (a deadlock).
    SELECT p.id, p.version INTO v_pool, v_version FROM ipam_pools p WHERE p.name = p_pool_name FOR KEY SHARE;
    IF v_pool IS NULL OR v_version <> p_version THEN
        FOR i IN 1 .. coalesce(array_length(p_owners, 1), 0) LOOP
            idx := i - 1; status := 'stale';
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- In owner order: concurrent batches wait on each other's keys in one order.
    FOR i IN SELECT o.n FROM unnest(p_owners) WITH ORDINALITY AS o(owner, n) ORDER BY o.owner, o.n LOOP
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
        t4_block := NULL; t4_pos := NULL; t4_ip := NULL; c4 := false; c6 := false;
        t6_block := NULL; t6_pos := NULL; t6_ip := NULL;
        IF p_want4[i] THEN
            SELECT t.block_id, t.pos, t.ip INTO t4_block, t4_pos, t4_ip FROM dsipam_take(v_pool, 4::smallint, v_node) t;
            IF t4_block IS NULL AND v_node IS NOT NULL THEN
                SELECT t.block_id, t.pos, t.ip INTO t4_block, t4_pos, t4_ip
                  FROM dsipam_claim(v_pool, 4::smallint, v_node) t;
                c4 := t4_block IS NOT NULL;
            END IF;
            IF t4_block IS NULL THEN
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        IF p_want6[i] THEN
            SELECT t.block_id, t.pos, t.ip INTO t6_block, t6_pos, t6_ip FROM dsipam_take(v_pool, 6::smallint, v_node) t;
            IF t6_block IS NULL AND v_node IS NOT NULL THEN
                SELECT t.block_id, t.pos, t.ip INTO t6_block, t6_pos, t6_ip
                  FROM dsipam_claim(v_pool, 6::smallint, v_node) t;
                c6 := t6_block IS NOT NULL;
            END IF;
            IF t6_block IS NULL THEN
                IF t4_block IS NOT NULL THEN  -- give the IPv4 bit back: we still hold its block
                    UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4_pos, 0), free_count = free_count + 1,
                        node = CASE WHEN c4 THEN NULL ELSE ipam_blocks.node END
                     WHERE id = t4_block;
                END IF;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO ipam_allocations AS a (pool_id, owner, ipv4, ipv6, attributes, node, borrowed)
        VALUES (v_pool, p_owners[i], t4_ip, t6_ip, p_attrs[i], v_node, false)
        ON CONFLICT (pool_id, owner) DO NOTHING
        RETURNING a.attributes, a.create_time INTO attributes, create_time;
        IF NOT FOUND THEN  -- a concurrent Allocate of the same owner won: undo, full path
            IF t4_block IS NOT NULL THEN
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4_pos, 0), free_count = free_count + 1,
                        node = CASE WHEN c4 THEN NULL ELSE ipam_blocks.node END
                 WHERE id = t4_block;
            END IF;
            IF t6_block IS NOT NULL THEN
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t6_pos, 0), free_count = free_count + 1,
                        node = CASE WHEN c6 THEN NULL ELSE ipam_blocks.node END
                 WHERE id = t6_block;
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6) VALUES (v_pool, 1, p_owners[i], t4_ip, t6_ip);
        status := 'created'; ipv4 := host(t4_ip); ipv6 := host(t6_ip); node := v_node; borrowed := false;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.execute(ALLOCATE_BATCH)
    # CREATE OR REPLACE FUNCTION drops the function's SET clauses (0010).
    op.execute(f"ALTER FUNCTION {ALLOCATE_BATCH_SIG} SET plan_cache_mode = force_generic_plan")


def downgrade() -> None:
    op.execute(import_module("dsipam.migrations.versions.0011_fast_path_fixes").ALLOCATE_BATCH)
    op.execute(f"ALTER FUNCTION {ALLOCATE_BATCH_SIG} SET plan_cache_mode = force_generic_plan")
