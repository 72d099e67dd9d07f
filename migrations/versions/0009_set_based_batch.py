"""The fast path allocates a batch of owners with no node set-based: each block it takes from is
updated once per batch, and allocations and events are inserted by one statement each.

``dsipam_allocate_batch`` (0004, 0007, 0008) takes owner by owner: two block updates, two
function calls and two single-row inserts per pair, so a block row gets a new version for every
address taken from it. ``dsipam_allocate_many`` does the same work for the whole batch at once,
under the same locks (``FOR UPDATE SKIP LOCKED`` on block rows in id order, IPv4 before IPv6;
the owner's primary key settles races) and with the same statuses. Batches whose owners name a
node keep using ``dsipam_allocate_batch``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

Online-safe: creates functions, and an index on ipam_blocks (a table of one row per block, so the
build's write lock is short).
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TAKE_MANY = r"""
CREATE OR REPLACE FUNCTION dsipam_take_many(p_pool integer, p_family smallint, p_count integer,
                                            OUT block_ids bigint[], OUT positions integer[], OUT ips inet[])
LANGUAGE plpgsql AS $$
-- Up to p_count free bits of blocks of no node that no other transaction holds, lowest first.
-- The blocks stay locked (FOR UPDATE) until the transaction ends; no bit is set here: the
-- caller sets the ones it uses with dsipam_set_bits. Fewer than p_count when no unlocked block
-- has room (the caller sends the rest to the full path).
DECLARE
    v_last cidr;
    b record;
    p integer;
    v_len integer;
    v_masklen integer := CASE WHEN p_family = 4 THEN 32 ELSE 128 END;
BEGIN
    block_ids := '{}'; positions := '{}'; ips := '{}';
    WHILE cardinality(positions) < p_count LOOP
        -- In address order, through ix_ipam_blocks_free_base: no other index gives this order, so
        -- no plan walks the primary key past full blocks and other families' blocks (a generic
        -- plan ordered by id did, when most blocks had room).
        SELECT k.id, k.base, k.bitmap INTO b
          FROM ipam_blocks k
         WHERE k.pool_id = p_pool AND k.family = p_family AND k.has_free AND k.node IS NULL
           AND (v_last IS NULL OR k.base > v_last)
         ORDER BY k.base LIMIT 1
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN NOT FOUND;
        v_last := b.base;
        v_len := length(b.bitmap);
        p := position(B'0' IN b.bitmap) - 1;
        WHILE p >= 0 AND p < v_len AND cardinality(positions) < p_count LOOP
            IF get_bit(b.bitmap, p) = 0 THEN
                block_ids := block_ids || b.id;
                positions := positions || p;
                ips := ips || set_masklen(b.base + p, v_masklen);
            END IF;
            p := p + 1;
        END LOOP;
    END LOOP;
END $$;
"""

SET_BITS = r"""
CREATE OR REPLACE FUNCTION dsipam_set_bits(p_block_ids bigint[], p_positions integer[], p_value integer)
RETURNS void
LANGUAGE plpgsql AS $$
-- Sets (1) or clears (0) the given bits, one update per block: the pairs come in block order.
DECLARE
    i integer := 1;
    n integer := coalesce(cardinality(p_block_ids), 0);
    v_block bigint;
    v_bitmap varbit;
    v_count integer;
BEGIN
    WHILE i <= n LOOP
        v_block := p_block_ids[i];
        SELECT bitmap INTO v_bitmap FROM ipam_blocks WHERE id = v_block;
        v_count := 0;
        WHILE i <= n AND p_block_ids[i] = v_block LOOP
            v_bitmap := set_bit(v_bitmap, p_positions[i], p_value);
            v_count := v_count + 1;
            i := i + 1;
        END LOOP;
        UPDATE ipam_blocks
           SET bitmap = v_bitmap,
               free_count = free_count + CASE WHEN p_value = 1 THEN -v_count ELSE v_count END
         WHERE id = v_block;
    END LOOP;
END $$;
"""

ALLOCATE_MANY = r"""
CREATE OR REPLACE FUNCTION dsipam_allocate_many(
    p_pool_name text, p_version bigint, p_owners text[], p_want4 boolean[], p_want6 boolean[], p_attrs jsonb[])
RETURNS TABLE (idx integer, status text, ipv4 text, ipv6 text, attributes jsonb,
               create_time timestamptz, node text, borrowed boolean)
LANGUAGE plpgsql AS $$
-- The statuses of dsipam_allocate_batch, for owners that name no node:
--   'created'  addresses taken and the allocation row (and its event) inserted;
--   'exists'   the owner already holds every family asked for (nothing changed);
--   'slow'     anything else (not enough free bits in unlocked blocks, an upgrade, the same
--              owner twice in the batch, a concurrent insert of the same owner): nothing was
--              changed for this owner and the caller runs its full path for it;
--   'stale'    the pool is gone or its layout version changed: every owner goes the full path.
DECLARE
    n integer := coalesce(array_length(p_owners, 1), 0);
    v_pool integer;
    v_version bigint;
    v_state text[];
    r record;
    i integer;
    need4 integer := 0;
    need6 integer := 0;
    t4 record;
    t6 record;
    k4 integer := 0;
    k6 integer := 0;
    s_idx integer[] := '{}';
    s_ip4 inet[] := '{}';
    s_ip6 inet[] := '{}';
    s_b4 bigint[] := '{}';
    s_p4 integer[] := '{}';
    s_b6 bigint[] := '{}';
    s_p6 integer[] := '{}';
    lost integer[];
BEGIN
    SELECT p.id, p.version INTO v_pool, v_version FROM ipam_pools p WHERE p.name = p_pool_name;
    IF v_pool IS NULL OR v_version <> p_version THEN
        RETURN QUERY SELECT g - 1, 'stale'::text, NULL::text, NULL::text, NULL::jsonb, NULL::timestamptz,
                            NULL::text, NULL::boolean
                       FROM generate_series(1, n) g;
        RETURN;
    END IF;
    v_state := array_fill('new'::text, ARRAY[n]);

    -- Owners that already hold something: answered from a plain read (the CNI retry path), or
    -- sent to the full path (an upgrade locks the row there). No row lock, as in 0007.
    -- LATERAL ... LIMIT 1 keeps this a primary-key probe per owner: a plain join's generic plan,
    -- made while the table is small, hashes the pool's whole allocation list on every call.
    FOR r IN SELECT o.i::integer AS i, a.ipv4, a.ipv6, a.attributes, a.create_time, a.node, a.borrowed
               FROM unnest(p_owners) WITH ORDINALITY o(owner, i)
               CROSS JOIN LATERAL (SELECT * FROM ipam_allocations x
                                    WHERE x.pool_id = v_pool AND x.owner = o.owner LIMIT 1) a
    LOOP
        idx := r.i - 1;
        IF (p_want4[r.i] AND r.ipv4 IS NULL) OR (p_want6[r.i] AND r.ipv6 IS NULL) THEN
            v_state[r.i] := 'slow';
            status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL; create_time := NULL;
            node := NULL; borrowed := NULL;
        ELSE
            v_state[r.i] := 'exists';
            status := 'exists'; ipv4 := host(r.ipv4); ipv6 := host(r.ipv6); attributes := r.attributes;
            create_time := r.create_time; node := r.node; borrowed := r.borrowed;
        END IF;
        RETURN NEXT;
    END LOOP;
    -- The same new owner twice in one batch: the later ones take the full path.
    FOR r IN SELECT d.i FROM (SELECT o.i::integer AS i, row_number() OVER (PARTITION BY o.owner ORDER BY o.i) AS rn
                                FROM unnest(p_owners) WITH ORDINALITY o(owner, i)) d
              WHERE d.rn > 1
    LOOP
        IF v_state[r.i] = 'new' THEN
            v_state[r.i] := 'slow';
            idx := r.i - 1; status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL;
            create_time := NULL; node := NULL; borrowed := NULL;
            RETURN NEXT;
        END IF;
    END LOOP;

    FOR i IN 1 .. n LOOP
        IF v_state[i] = 'new' THEN
            IF p_want4[i] THEN need4 := need4 + 1; END IF;
            IF p_want6[i] THEN need6 := need6 + 1; END IF;
        END IF;
    END LOOP;
    IF need4 > 0 THEN
        SELECT * INTO t4 FROM dsipam_take_many(v_pool, 4::smallint, need4);
    END IF;
    IF need6 > 0 THEN
        SELECT * INTO t6 FROM dsipam_take_many(v_pool, 6::smallint, need6);
    END IF;

    -- Owners in order take the candidates in order; an owner one of whose families ran out
    -- takes nothing (a pair is whole or not at all), so the bits used are a prefix of each list.
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN v_state[i] <> 'new';
        IF (p_want4[i] AND k4 >= coalesce(cardinality(t4.positions), 0))
           OR (p_want6[i] AND k6 >= coalesce(cardinality(t6.positions), 0)) THEN
            v_state[i] := 'slow';
            idx := i - 1; status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL;
            create_time := NULL; node := NULL; borrowed := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        s_idx := s_idx || i;
        IF p_want4[i] THEN
            k4 := k4 + 1;
            s_ip4 := s_ip4 || t4.ips[k4]; s_b4 := s_b4 || t4.block_ids[k4]; s_p4 := s_p4 || t4.positions[k4];
        ELSE
            s_ip4 := s_ip4 || NULL::inet; s_b4 := s_b4 || NULL::bigint; s_p4 := s_p4 || NULL::integer;
        END IF;
        IF p_want6[i] THEN
            k6 := k6 + 1;
            s_ip6 := s_ip6 || t6.ips[k6]; s_b6 := s_b6 || t6.block_ids[k6]; s_p6 := s_p6 || t6.positions[k6];
        ELSE
            s_ip6 := s_ip6 || NULL::inet; s_b6 := s_b6 || NULL::bigint; s_p6 := s_p6 || NULL::integer;
        END IF;
    END LOOP;
    IF cardinality(s_idx) = 0 THEN
        RETURN;
    END IF;
    IF k4 > 0 THEN
        PERFORM dsipam_set_bits(t4.block_ids[1:k4], t4.positions[1:k4], 1);
    END IF;
    IF k6 > 0 THEN
        PERFORM dsipam_set_bits(t6.block_ids[1:k6], t6.positions[1:k6], 1);
    END IF;

    FOR r IN WITH ins AS (
                 INSERT INTO ipam_allocations AS a (pool_id, owner, ipv4, ipv6, attributes, node, borrowed)
                 SELECT v_pool, p_owners[x.i], x.ip4, x.ip6, p_attrs[x.i], NULL, false
                   FROM unnest(s_idx, s_ip4, s_ip6) x(i, ip4, ip6)
                 ON CONFLICT (pool_id, owner) DO NOTHING
                 RETURNING a.owner, a.ipv4, a.ipv6, a.attributes, a.create_time),
             ev AS (
                 INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6)
                 SELECT v_pool, 1, ins.owner, ins.ipv4, ins.ipv6 FROM ins)
             SELECT x.i, x.k, ins.ipv4, ins.ipv6, ins.attributes, ins.create_time
               FROM unnest(s_idx) WITH ORDINALITY x(i, k)
               LEFT JOIN ins ON ins.owner = p_owners[x.i]
    LOOP
        idx := r.i - 1; node := NULL;
        IF r.create_time IS NULL THEN  -- a concurrent Allocate of the same owner won
            lost := lost || r.k::integer;
            status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL; create_time := NULL;
            borrowed := NULL;
        ELSE
            status := 'created'; ipv4 := host(r.ipv4); ipv6 := host(r.ipv6); attributes := r.attributes;
            create_time := r.create_time; borrowed := false;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF lost IS NOT NULL THEN  -- give their bits back: we still hold the blocks
        PERFORM dsipam_set_bits(array_agg(s_b4[k] ORDER BY s_b4[k], k), array_agg(s_p4[k] ORDER BY s_b4[k], k), 0)
           FROM unnest(lost) k WHERE s_b4[k] IS NOT NULL;
        PERFORM dsipam_set_bits(array_agg(s_b6[k] ORDER BY s_b6[k], k), array_agg(s_p6[k] ORDER BY s_b6[k], k), 0)
           FROM unnest(lost) k WHERE s_b6[k] IS NOT NULL;
    END IF;
END $$;
"""


def upgrade() -> None:
    op.create_index(
        "ix_ipam_blocks_free_base", "ipam_blocks", ["pool_id", "family", "base"],
        postgresql_where="has_free AND node IS NULL",
    )
    op.execute(TAKE_MANY)
    op.execute(SET_BITS)
    op.execute(ALLOCATE_MANY)


def downgrade() -> None:
    op.execute("DROP FUNCTION dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[])")
    op.execute("DROP FUNCTION dsipam_set_bits(bigint[], integer[], integer)")
    op.execute("DROP FUNCTION dsipam_take_many(integer, smallint, integer)")
    op.drop_index("ix_ipam_blocks_free_base", "ipam_blocks")
