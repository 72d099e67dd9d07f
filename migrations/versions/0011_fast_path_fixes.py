"""Fast-path function fixes: single-family requests and one-family releases run on the fast path.

* ``dsipam_allocate_many`` and ``dsipam_allocate_batch`` kept the addresses a batch took in record
  variables (``t4``, ``t6``) and read the IPv6 record when only IPv4 was wanted (and the other way
  round). PL/pgSQL refuses to read a record that was never assigned (``record "t6" is not assigned
  yet``; ``t6 := NULL`` does not count as assigned either), so every batch with a single-family
  request failed as a whole and went to the full path. The candidates are now kept in plain
  (array or scalar) variables, which are NULL until assigned.
* ``dsipam_release_batch`` wrote ``ELSE ipv4`` in the UPDATE of an owner that keeps one family:
  ``ipv4`` is also the function's OUT column, so the reference was ambiguous and every release
  of one family of a pair failed. The columns are now qualified with the table's alias.
* Both allocation functions insert new owners in owner order, as ``dsipam_release_batch`` locks
  them: two batches that insert the same new owners (two servers, or two batches of one server in
  flight at once) wait on each other's keys in one order and cannot deadlock.
* All three read the pool row ``FOR KEY SHARE`` (the lock the foreign keys of their inserts take
  anyway) before they lock blocks or owner rows. DeletePool locks the pool row, then the pool's
  blocks: a batch that locked blocks first and then met the pool row in its foreign-key check
  deadlocked with it (seen as a ``deadlock detected`` fast-path error while DeletePool raced
  Allocates); now the batch waits for the DeletePool, finds the pool gone and answers 'stale'.

The functions keep ``plan_cache_mode = force_generic_plan`` (0010): CREATE OR REPLACE resets a
function's settings, so they are set again after each replacement, on upgrade and on downgrade.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

Online-safe: only replaces functions.
"""

from __future__ import annotations

from importlib import import_module

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ALLOCATE_MANY_SIG = "dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[])"
ALLOCATE_BATCH_SIG = "dsipam_allocate_batch(text, bigint, text[], boolean[], boolean[], jsonb[], text[])"
RELEASE_BATCH_SIG = "dsipam_release_batch(text, bigint, text[], boolean[], boolean[])"

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
    -- The candidates of each family (dsipam_take_many): empty when the family is not wanted.
    t4_ids bigint[] := '{}';
    t4_pos integer[] := '{}';
    t4_ips inet[] := '{}';
    t6_ids bigint[] := '{}';
    t6_pos integer[] := '{}';
    t6_ips inet[] := '{}';
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
    -- KEY SHARE, as the foreign keys of the rows inserted below take it anyway, but before any block
    -- lock: a DeletePool (which holds the pool row, then locks the blocks) is waited for here, not
    -- met holding blocks it waits for (a deadlock).
    SELECT p.id, p.version INTO v_pool, v_version FROM ipam_pools p WHERE p.name = p_pool_name FOR KEY SHARE;
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
        SELECT t.block_ids, t.positions, t.ips INTO t4_ids, t4_pos, t4_ips
          FROM dsipam_take_many(v_pool, 4::smallint, need4) t;
    END IF;
    IF need6 > 0 THEN
        SELECT t.block_ids, t.positions, t.ips INTO t6_ids, t6_pos, t6_ips
          FROM dsipam_take_many(v_pool, 6::smallint, need6) t;
    END IF;

    -- Owners in order take the candidates in order; an owner one of whose families ran out
    -- takes nothing (a pair is whole or not at all), so the bits used are a prefix of each list.
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN v_state[i] <> 'new';
        IF (p_want4[i] AND k4 >= coalesce(cardinality(t4_pos), 0))
           OR (p_want6[i] AND k6 >= coalesce(cardinality(t6_pos), 0)) THEN
            v_state[i] := 'slow';
            idx := i - 1; status := 'slow'; ipv4 := NULL; ipv6 := NULL; attributes := NULL;
            create_time := NULL; node := NULL; borrowed := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        s_idx := s_idx || i;
        IF p_want4[i] THEN
            k4 := k4 + 1;
            s_ip4 := s_ip4 || t4_ips[k4]; s_b4 := s_b4 || t4_ids[k4]; s_p4 := s_p4 || t4_pos[k4];
        ELSE
            s_ip4 := s_ip4 || NULL::inet; s_b4 := s_b4 || NULL::bigint; s_p4 := s_p4 || NULL::integer;
        END IF;
        IF p_want6[i] THEN
            k6 := k6 + 1;
            s_ip6 := s_ip6 || t6_ips[k6]; s_b6 := s_b6 || t6_ids[k6]; s_p6 := s_p6 || t6_pos[k6];
        ELSE
            s_ip6 := s_ip6 || NULL::inet; s_b6 := s_b6 || NULL::bigint; s_p6 := s_p6 || NULL::integer;
        END IF;
    END LOOP;
    IF cardinality(s_idx) = 0 THEN
        RETURN;
    END IF;
    IF k4 > 0 THEN
        PERFORM dsipam_set_bits(t4_ids[1:k4], t4_pos[1:k4], 1);
    END IF;
    IF k6 > 0 THEN
        PERFORM dsipam_set_bits(t6_ids[1:k6], t6_pos[1:k6], 1);
    END IF;

    -- New owners are inserted in owner order: concurrent batches wait on each other's keys in one order.
    FOR r IN WITH ins AS (
                 INSERT INTO ipam_allocations AS a (pool_id, owner, ipv4, ipv6, attributes, node, borrowed)
                 SELECT v_pool, p_owners[x.i], x.ip4, x.ip6, p_attrs[x.i], NULL, false
                   FROM unnest(s_idx, s_ip4, s_ip6) x(i, ip4, ip6)
                  ORDER BY p_owners[x.i]
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
        t4_block := NULL; t4_pos := NULL; t4_ip := NULL;
        t6_block := NULL; t6_pos := NULL; t6_ip := NULL;
        IF p_want4[i] THEN
            SELECT t.block_id, t.pos, t.ip INTO t4_block, t4_pos, t4_ip FROM dsipam_take(v_pool, 4::smallint, v_node) t;
            IF t4_block IS NULL AND v_node IS NOT NULL THEN
                SELECT t.block_id, t.pos, t.ip INTO t4_block, t4_pos, t4_ip
                  FROM dsipam_claim(v_pool, 4::smallint, v_node) t;
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
            END IF;
            IF t6_block IS NULL THEN
                IF t4_block IS NOT NULL THEN  -- give the IPv4 bit back: we still hold its block
                    UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4_pos, 0), free_count = free_count + 1
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
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t4_pos, 0), free_count = free_count + 1
                 WHERE id = t4_block;
            END IF;
            IF t6_block IS NOT NULL THEN
                UPDATE ipam_blocks SET bitmap = set_bit(bitmap, t6_pos, 0), free_count = free_count + 1
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
-- Table columns are always qualified: ipv4 and ipv6 are also this function's OUT columns.
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
    -- KEY SHARE, as the foreign keys of the events and cooldowns inserted below take it anyway, but before any block
    -- lock: a DeletePool (which holds the pool row, then locks the blocks) is waited for here, not
    -- met holding owner rows and blocks it waits for (a deadlock).
    SELECT p.id, p.version, p.cooldown_ms INTO v_pool, v_version, v_cooldown
      FROM ipam_pools p WHERE p.name = p_pool_name FOR KEY SHARE;
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
                DELETE FROM ipam_allocations a WHERE a.pool_id = v_pool AND a.owner = p_owners[i];
            ELSE
                UPDATE ipam_allocations a
                   SET ipv4 = CASE WHEN v_d4[i] THEN NULL ELSE a.ipv4 END,
                       ipv6 = CASE WHEN v_d6[i] THEN NULL ELSE a.ipv6 END
                 WHERE a.pool_id = v_pool AND a.owner = p_owners[i];
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


def _generic_plans() -> None:
    # As 0010: CREATE OR REPLACE FUNCTION drops a function's SET clauses, so set it again.
    for sig in (ALLOCATE_MANY_SIG, ALLOCATE_BATCH_SIG, RELEASE_BATCH_SIG):
        op.execute(f"ALTER FUNCTION {sig} SET plan_cache_mode = force_generic_plan")


def upgrade() -> None:
    op.execute(ALLOCATE_MANY)
    op.execute(ALLOCATE_BATCH)
    op.execute(RELEASE_BATCH)
    _generic_plans()


def downgrade() -> None:
    # The definitions of 0010: dsipam_allocate_many of 0009, dsipam_allocate_batch of 0008,
    # dsipam_release_batch of 0006, each planned generically.
    op.execute(import_module("dsipam.migrations.versions.0009_set_based_batch").ALLOCATE_MANY)
    op.execute(import_module("dsipam.migrations.versions.0008_node_claims").ALLOCATE_BATCH)
    op.execute(import_module("dsipam.migrations.versions.0006_hot_blocks").RELEASE_BATCH)
    _generic_plans()
