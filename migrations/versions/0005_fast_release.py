"""The release fast path: a server-side function that releases a batch of owners in one round trip.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Online-safe: only creates a function.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RELEASE_BATCH = r"""
CREATE OR REPLACE FUNCTION dsipam_release_batch(
    p_pool_name text, p_version bigint, p_owners text[], p_drop4 boolean[], p_drop6 boolean[])
RETURNS TABLE (idx integer, status text, ipv4 text, ipv6 text)
LANGUAGE plpgsql AS $$
-- Releases each owner in turn, in the caller's transaction, exactly as the full path does:
-- the owner's row is locked, each dropped address goes into cooldown (its bit stays set and
-- its block's cooling counter counts it) or, without cooldown, its bit is cleared (or, when
-- the address is reserved, it stops counting as usable); the row is updated or deleted and a
-- RELEASED event is written. Per owner, status is 'released' (ipv4/ipv6: what was released),
-- 'none' (nothing to release) or 'stale' (the pool is gone or its layout changed: the caller
-- runs its full path). ipv4/ipv6 are the released addresses.
DECLARE
    v_pool integer;
    v_version bigint;
    v_cooldown integer;
    v_row record;
    v_addr inet;
    v_fam integer;
    v_block bigint;
    v_off integer;
    v_d4 boolean;
    v_d6 boolean;
    i integer;
BEGIN
    SELECT p.id, p.version, p.cooldown_ms INTO v_pool, v_version, v_cooldown
      FROM ipam_pools p WHERE p.name = p_pool_name;
    IF v_pool IS NULL OR v_version <> p_version THEN
        FOR i IN 1 .. coalesce(array_length(p_owners, 1), 0) LOOP
            idx := i - 1; status := 'stale'; ipv4 := NULL; ipv6 := NULL;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_owners, 1), 0) LOOP
        idx := i - 1; status := 'none'; ipv4 := NULL; ipv6 := NULL;
        SELECT a.ipv4, a.ipv6 INTO v_row FROM ipam_allocations a
         WHERE a.pool_id = v_pool AND a.owner = p_owners[i] FOR UPDATE;
        IF NOT FOUND THEN
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_d4 := p_drop4[i] AND v_row.ipv4 IS NOT NULL;
        v_d6 := p_drop6[i] AND v_row.ipv6 IS NOT NULL;
        IF NOT (v_d4 OR v_d6) THEN
            RETURN NEXT;
            CONTINUE;
        END IF;
        FOREACH v_fam IN ARRAY ARRAY[4, 6] LOOP
            IF (v_fam = 4 AND NOT v_d4) OR (v_fam = 6 AND NOT v_d6) THEN
                CONTINUE;
            END IF;
            v_addr := CASE WHEN v_fam = 4 THEN v_row.ipv4 ELSE v_row.ipv6 END;
            SELECT b.id, (v_addr - b.base)::integer INTO v_block, v_off
              FROM ipam_ranges r
              JOIN ipam_blocks b ON b.range_id = r.id AND b.base = network(set_masklen(v_addr, r.block_prefix))
             WHERE r.pool_id = v_pool AND r.cidr >>= v_addr;
            IF v_block IS NULL THEN
                CONTINUE;  -- its range was removed: nothing to give back
            END IF;
            IF v_cooldown > 0 THEN
                UPDATE ipam_blocks SET cooling = cooling + 1 WHERE id = v_block;
                INSERT INTO ipam_cooldowns (pool_id, address, family, block_id, owner, until)
                VALUES (v_pool, v_addr, v_fam, v_block, p_owners[i],
                        now() + make_interval(secs => v_cooldown / 1000.0));
            ELSIF EXISTS (SELECT 1 FROM ipam_reservations s WHERE s.pool_id = v_pool AND s.cidr >>= v_addr) THEN
                UPDATE ipam_blocks SET avail_count = avail_count - 1 WHERE id = v_block;
            ELSE
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, v_off, 0), free_count = free_count + 1
                 WHERE id = v_block AND get_bit(bitmap, v_off) = 1;
            END IF;
        END LOOP;
        IF (v_d4 OR v_row.ipv4 IS NULL) AND (v_d6 OR v_row.ipv6 IS NULL) THEN
            DELETE FROM ipam_allocations WHERE pool_id = v_pool AND owner = p_owners[i];
        ELSE
            UPDATE ipam_allocations
               SET ipv4 = CASE WHEN v_d4 THEN NULL ELSE ipv4 END,
                   ipv6 = CASE WHEN v_d6 THEN NULL ELSE ipv6 END
             WHERE pool_id = v_pool AND owner = p_owners[i];
        END IF;
        INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6)
        VALUES (v_pool, 2, p_owners[i], CASE WHEN v_d4 THEN v_row.ipv4 END, CASE WHEN v_d6 THEN v_row.ipv6 END);
        status := 'released';
        ipv4 := CASE WHEN v_d4 THEN host(v_row.ipv4) END;
        ipv6 := CASE WHEN v_d6 THEN host(v_row.ipv6) END;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.execute(RELEASE_BATCH)


def downgrade() -> None:
    op.execute("DROP FUNCTION dsipam_release_batch(text, bigint, text[], boolean[], boolean[])")
