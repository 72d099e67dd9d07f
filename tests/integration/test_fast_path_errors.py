"""The fast path is never silent (issue 17): the requests it used to hand over to the full path
because of its own errors now run on it, and an unexpected error is logged at ERROR and counted.

One test per finding, each failing on the code before the fix:
1. single-family Allocates run on the fast path (both SQL functions);
2. releasing one family of a pair runs on the fast path;
3. a batch emptied while it lingered (another drain task took its requests) is not sent;
4. identical concurrent Allocates naming a specific address are idempotent (one address, pair too);
5. DeletePool racing Allocates yields OK or NOT_FOUND, never RESOURCE_EXHAUSTED;
6. a pooled connection whose session PostgreSQL ended while it was idle is not an error
   (InternalClientError "cannot switch to state 12; another operation (2) is in progress", seen
   in test_faults.py::test_database_restart_under_load).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import grpc
import pytest
from grpc_helpers import REQUIRE, SINGLE, V4, V6, pool
from pgproxy import PgProxy, upstream_port, via
from prometheus_client.parser import text_string_to_metric_families
from support import FAST_PATH_ERROR_METRIC, ServerProcess, psql, scratch_database, spawn_server

from dsipam.server.domain import Family, Policy, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine
from dsipam.server.store._fast import FAST_PATH_ERRORS, FastPath, asyncpg_dsn
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


class Watching(FastPath):
    """A real FastPath that records the status of every row the database answered."""

    def __init__(self, url: str, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(url, pool_size=2, **kw)
        self.statuses: list[tuple[str, str]] = []  # (kind, status)

    async def _call(self, kind, pool_name, version, batch):  # type: ignore[no-untyped-def]
        rows = await super()._call(kind, pool_name, version, batch)
        self.statuses += [(kind, r["status"]) for r in rows if r is not None]
        return rows


async def _store(url: str, **kw) -> tuple[Store, Watching]:  # type: ignore[no-untyped-def]
    store = Store(create_engine(url, pool_size=4, max_overflow=4))
    store.fast = fast = Watching(url, **kw)
    return store, fast


async def _pool_with_blocks(store: Store, name: str) -> None:
    """A dual-stack pool whose blocks exist (the fast path takes only from existing blocks)."""
    await store.create_pool(build_pool_spec(name, [RangeInput("198.18.0.0/24"), RangeInput("fd00::/120")], {}, 0))
    for fam in (Family.IPV4, Family.IPV6):
        assert await store.top_up_blocks(name, fam, 2) == 2


def _no_fast_path_logs(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r.getMessage() for r in caplog.records if r.name == "dsipam.store.fast"]
    assert logged == []  # neither the old "fell back" INFO line nor a "fast path error"


# -- 1. single-family allocations ------------------------------------------------------------------


@pytest.mark.parametrize("node", ["", "node-a"])
def test_single_family_allocates_run_on_the_fast_path(clean_db, node, caplog):
    caplog.set_level(logging.INFO, logger="dsipam.store.fast")

    async def main():
        store, fast = await _store(clean_db)
        try:
            # The layout is cached from now on. No pair first: a session that ran a pair batch
            # knew the record type and hid the old unassigned-record error.
            await _pool_with_blocks(store, "one")
            kind = "allocate-node" if node else "allocate"
            for owner, fam in (("v4", Family.IPV4), ("v6", Family.IPV6)):
                info, created = await store.allocate(pool="one", owner=owner, policy=Policy.SINGLE_STACK,
                                                     families=[fam], addresses=(), attributes={"f": owner}, node=node)
                assert created and [a.family for a in info.addresses] == [fam] and info.node == node
            # Both were answered 'created' by the function itself, not handed over.
            assert fast.statuses == [(kind, "created"), (kind, "created")]
            assert fast.errors == {}
            again, created = await store.allocate(pool="one", owner="v4", policy=Policy.SINGLE_STACK,
                                                  families=[Family.IPV4], addresses=(), attributes={}, node=node)
            assert not created and again.attributes == {"f": "v4"} and fast.statuses[-1] == (kind, "exists")
            assert await store.fsck("one") == []
        finally:
            await store.close()

    asyncio.run(main())
    _no_fast_path_logs(caplog)


_MANY = "SELECT * FROM dsipam_allocate_many($1, $2, $3, $4, $5, $6::jsonb[]) ORDER BY idx"
_BATCH = "SELECT * FROM dsipam_allocate_batch($1, $2, $3, $4, $5, $6::jsonb[], $7) ORDER BY idx"
_RELEASE = "SELECT * FROM dsipam_release_batch($1, $2, $3, $4, $5) ORDER BY idx"


def test_single_family_batches_called_directly(clean_db):
    """The functions themselves, with a batch in which only one family is wanted at all (the
    unassigned-record error of migrations 0008 and 0009)."""

    async def main():
        store, _ = await _store(clean_db)
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            await _pool_with_blocks(store, "sql")
            version = await conn.fetchval("SELECT version FROM ipam_pools WHERE name = 'sql'")
            for want4, want6 in ((True, False), (False, True)):
                tag = "4" if want4 else "6"
                many = await conn.fetch(_MANY, "sql", version, [f"m{tag}a", f"m{tag}b"], [want4] * 2, [want6] * 2,
                                        ["{}"] * 2)
                batch = await conn.fetch(_BATCH, "sql", version, [f"b{tag}"], [want4], [want6], ["{}"], ["node-x"])
                for row in [*many, *batch]:
                    assert row["status"] == "created"
                    assert (row["ipv4"] is not None) == want4 and (row["ipv6"] is not None) == want6
            assert await store.fsck("sql") == []
        finally:
            await conn.close()
            await store.close()

    asyncio.run(main())


# -- 2. one-family releases ------------------------------------------------------------------------


@pytest.mark.parametrize("cooldown_ms", [0, 60_000])
def test_releasing_one_family_runs_on_the_fast_path(clean_db, cooldown_ms, caplog):
    caplog.set_level(logging.INFO, logger="dsipam.store.fast")

    async def main():
        store, fast = await _store(clean_db)
        try:
            await store.create_pool(build_pool_spec("rel", [RangeInput("198.18.0.0/24"), RangeInput("fd00::/120")],
                                                    {}, cooldown_ms))
            pairs = {}
            for owner in ("a", "b"):
                info, _ = await store.allocate(pool="rel", owner=owner, policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                               addresses=(), attributes={})
                pairs[owner] = {a.family: a.ip for a in info.addresses}
            fast.statuses.clear()
            released = await store.release(pool="rel", owner="a", families=[Family.IPV4])
            assert [(a.family, a.ip) for a in released] == [(Family.IPV4, pairs["a"][Family.IPV4])]
            released = await store.release(pool="rel", owner="b", families=[Family.IPV6])
            assert [(a.family, a.ip) for a in released] == [(Family.IPV6, pairs["b"][Family.IPV6])]
            assert fast.statuses == [("release", "released"), ("release", "released")]
            assert fast.errors == {}
            left_a = await store.get_allocation(pool="rel", owner="a")
            left_b = await store.get_allocation(pool="rel", owner="b")
            assert [(a.family, a.ip) for a in left_a.addresses] == [(Family.IPV6, pairs["a"][Family.IPV6])]
            assert [(a.family, a.ip) for a in left_b.addresses] == [(Family.IPV4, pairs["b"][Family.IPV4])]
            assert await store.fsck("rel") == []
        finally:
            await store.close()

    asyncio.run(main())
    _no_fast_path_logs(caplog)


def test_one_family_release_called_directly(clean_db):
    async def main():
        store, _ = await _store(clean_db)
        conn = await asyncpg.connect(asyncpg_dsn(clean_db))
        try:
            await _pool_with_blocks(store, "sqlrel")
            version = await conn.fetchval("SELECT version FROM ipam_pools WHERE name = 'sqlrel'")
            made = await conn.fetch(_MANY, "sqlrel", version, ["p", "q"], [True] * 2, [True] * 2, ["{}"] * 2)
            rows = await conn.fetch(_RELEASE, "sqlrel", version, ["p", "q"], [True, False], [False, True])
            assert [r["status"] for r in rows] == ["released", "released"]
            assert (rows[0]["ipv4"], rows[0]["ipv6"]) == (made[0]["ipv4"], None)
            assert (rows[1]["ipv4"], rows[1]["ipv6"]) == (None, made[1]["ipv6"])
            left = {r["owner"]: (r["ipv4"], r["ipv6"]) for r in await conn.fetch(
                "SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6 FROM ipam_allocations")}
            assert left == {"p": (None, made[0]["ipv6"]), "q": (made[1]["ipv4"], None)}
            assert await store.fsck("sqlrel") == []
        finally:
            await conn.close()
            await store.close()

    asyncio.run(main())


# -- 3. a batch emptied while it lingered ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["allocate", "release"])
def test_a_batch_emptied_while_it_lingered_is_not_sent(clean_db, kind, caplog):
    """Two drain tasks of one queue linger; the request that fills a quarter wakes both; the first
    takes every request and the second must not send an empty batch (it used to: IndexError for
    allocations, "expects 5 arguments, 2 were passed" for releases)."""
    caplog.set_level(logging.INFO, logger="dsipam.store.fast")

    async def main():
        # max_batch 8: a quarter is 2 waiting requests; a long linger: only that quarter wakes a batch.
        store, fast = await _store(clean_db, max_batch=8, max_inflight=2, linger=30.0)
        try:
            await _pool_with_blocks(store, "linger")
            version = store._by_name["linger"].version
            if kind == "release":
                for owner in ("o0", "o1", "o2"):
                    await fast.allocate("linger", version, owner, True, True, "{}", "")

            def call(owner: str) -> asyncio.Future:
                if kind == "allocate":
                    return asyncio.ensure_future(fast.allocate("linger", version, owner, True, True, "{}", ""))
                return asyncio.ensure_future(fast.release("linger", version, owner, True, True))

            fast.statuses.clear()
            first = call("o0")
            while not fast._queues or fast._queues[(kind, "linger", version)].waiting:
                assert not first.done()
                await asyncio.sleep(0)  # until the first drain task took o0 and sent it
            second = call("o1")  # a second drain task starts and lingers: a batch is in flight
            await asyncio.wait_for(first, 10)
            queue = fast._queues[(kind, "linger", version)]
            deadline = time.monotonic() + 10
            while len(queue.lingering) < 2:  # the first task, back for o1, lingers too
                assert time.monotonic() < deadline, "the two drain tasks did not both linger"
                await asyncio.sleep(0.001)
            third = call("o2")  # a quarter waits: both wake, one takes o1 and o2
            rows = await asyncio.wait_for(asyncio.gather(second, third), 10)
            want = "created" if kind == "allocate" else "released"
            assert [r["status"] for r in rows] == [want, want]
            assert fast.batches == (2 if kind == "allocate" else 5)  # o0, then o1+o2 (releases: after 3 allocations)
            assert fast.errors == {}
            assert fast._queues == {}
            assert await store.fsck("linger") == []
        finally:
            await store.close()

    asyncio.run(main())
    _no_fast_path_logs(caplog)


# -- 4. identical concurrent Allocates of a specific address ---------------------------------------


@pytest.mark.parametrize("pair", [False, True], ids=["ipv4", "pair"])
def test_identical_concurrent_specific_allocates_are_idempotent(stub, pair):
    """20 identical Allocates naming the address(es), 10 rounds: every one succeeds with the same
    address(es), exactly one of each round creates (it used to be ALREADY_EXISTS "held by" the
    caller itself for about one in seven)."""
    stub.CreatePool(pool("same", "198.18.1.0/24", "fd00:1::/120", cooldown=0))
    with ThreadPoolExecutor(20) as ex:
        for rnd in range(10):
            owner = f"same-{rnd}"
            addrs = [f"198.18.1.{10 + rnd}"] + ([f"fd00:1::{10 + rnd:x}"] if pair else [])
            req = pb.AllocateRequest(pool="same", owner=owner, ip_family_policy=REQUIRE if pair else SINGLE,
                                     ip_families=[] if pair else [V4], addresses=addrs)

            def one(req: pb.AllocateRequest = req) -> tuple[str, bool, list[str]]:
                try:
                    resp = stub.Allocate(req, timeout=30)
                except grpc.RpcError as err:
                    return f"{err.code().name}: {err.details()}", False, []
                return "OK", resp.created, [a.ip for a in resp.allocation.addresses]

            results = list(ex.map(lambda _: one(), range(20)))
            assert [r[0] for r in results] == ["OK"] * 20, f"round {rnd}: {results}"
            assert all(r[2] == addrs for r in results), f"round {rnd}: {results}"
            assert sum(r[1] for r in results) == 1, f"round {rnd}: {results}"
    got = stub.ListAllocations(pb.ListAllocationsRequest(pool="same", page_size=100))
    assert len(got.allocations) == 10


# -- 5. DeletePool racing Allocates ----------------------------------------------------------------


def test_delete_pool_racing_allocates_is_ok_or_not_found(stub):
    """Allocates in flight while their pool is deleted: each either got its addresses before the
    delete or finds the pool gone; none reports the pool as full."""
    codes: dict[str, int] = {}
    wrong: list[str] = []
    for rnd in range(8):
        name = f"doomed-{rnd}"
        stub.CreatePool(pool(name, "198.18.2.0/24", "fd00:2::/120", cooldown=0))
        calls = [stub.Allocate.future(pb.AllocateRequest(pool=name, owner=f"o{i}", ip_family_policy=REQUIRE),
                                      timeout=60) for i in range(30)]
        time.sleep(0.004 * (rnd % 4))
        deleted = stub.DeletePool.future(pb.DeletePoolRequest(name=name, force=True), timeout=60)
        for call in calls:
            try:
                call.result()
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    wrong.append(f"{name}: {code}: {err.details()}")
            codes[code] = codes.get(code, 0) + 1
        deleted.result()
    assert wrong == [], f"{len(wrong)} of {sum(codes.values())} Allocates: {wrong[:5]}"
    assert set(codes) <= {"OK", "NOT_FOUND"}


# -- the metric --------------------------------------------------------------------------------------


def _errors_metric(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == FAST_PATH_ERROR_METRIC}


def _traffic(stub: ipam_pb2_grpc.IpamServiceStub, name: str) -> None:
    """Pairs, single families, nodes, repeats and one-family releases, concurrently."""
    stub.CreatePool(pool(name, "198.18.3.0/24", "fd00:3::/120", cooldown=0))
    reqs = []
    for i in range(40):
        node = f"n{i % 2}" if i % 3 == 0 else ""
        if i % 4 == 0:
            reqs.append(pb.AllocateRequest(pool=name, owner=f"o{i}", ip_family_policy=SINGLE,
                                           ip_families=[V4 if i % 8 else V6], node=node))
        else:
            reqs.append(pb.AllocateRequest(pool=name, owner=f"o{i}", ip_family_policy=REQUIRE, node=node))
    for _ in range(2):  # the second round: every owner exists
        for call in [stub.Allocate.future(r, timeout=30) for r in reqs]:
            call.result()
    rels = [pb.ReleaseRequest(pool=name, owner=f"o{i}", ip_families=[V4 if i % 2 else V6])
            for i in range(40) if i % 4]
    for call in [stub.Release.future(r, timeout=30) for r in rels]:
        call.result()


def test_the_error_metric_exists_and_stays_zero_after_normal_traffic(server_proc, stub):
    address = server_proc.metrics_address()
    assert address is not None, "the test servers serve metrics (tests/support.py)"
    before = _errors_metric(address)
    assert set(before) == {"allocate", "allocate-node", "release"}  # exported from the start
    _traffic(stub, "metric")
    after = _errors_metric(address)
    assert after == {"allocate": 0.0, "allocate-node": 0.0, "release": 0.0}
    assert server_proc.fast_path_error_lines() == []


def test_an_unexpected_error_is_logged_counted_and_served_by_the_full_path(tmp_path):
    """A function call that fails for a reason other than an outage: every caller still gets its
    answer (from the full path), and the error is an ERROR line and a count. The server opts out
    of the teardown check, since it provokes fast-path errors on purpose."""
    with scratch_database("dsipam_fast_broken") as url:
        server: ServerProcess = spawn_server(url, tmp_path)
        server.fast_path_errors_expected = True
        try:
            address = server.metrics_address()
            assert address is not None
            with grpc.insecure_channel(server.target) as ch:
                stub = ipam_pb2_grpc.IpamServiceStub(ch)
                stub.CreatePool(pool("broken", "198.18.4.0/24", "fd00:4::/120", cooldown=0))
                stub.Allocate(pb.AllocateRequest(pool="broken", owner="warm", ip_family_policy=REQUIRE))
                # The function is missing (a schema that does not match the code): not an outage.
                psql(url, "ALTER FUNCTION dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[]) "
                          "RENAME TO dsipam_allocate_many_gone")
                for i in range(3):
                    resp = stub.Allocate(pb.AllocateRequest(pool="broken", owner=f"o{i}", ip_family_policy=REQUIRE))
                    assert resp.created and len(resp.allocation.addresses) == 2
            errors = _errors_metric(address)
            assert errors["allocate"] == 3 and errors["release"] == 0 and errors["allocate-node"] == 0
            lines = server.fast_path_error_lines()
            assert len(lines) == 3 and all("allocate batch of 1 for pool 'broken'" in line for line in lines)
            assert "UndefinedFunctionError" in lines[0] and "o0" in lines[0]
        finally:
            server.terminate()


def test_a_lost_lock_race_is_counted_and_served_by_the_full_path_not_an_error(tmp_path):
    """PostgreSQL aborts the loser of a deadlock (40P01) or serialization failure (40001) whole; the
    full path runs such a transaction again, and so the fast path hands the batch to it: a WARNING
    and dsipam_fast_path_lock_retries_total, not a fast-path error. (A wrapper stands in for the
    function and aborts with 40P01, as a real deadlock does: a real one is timing-dependent.)"""
    sig = "dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[])"
    with scratch_database("dsipam_fast_deadlock") as url:
        server: ServerProcess = spawn_server(url, tmp_path)
        try:
            address = server.metrics_address()
            assert address is not None
            with grpc.insecure_channel(server.target) as ch:
                stub = ipam_pb2_grpc.IpamServiceStub(ch)
                stub.CreatePool(pool("race", "198.18.4.0/24", "fd00:4::/120", cooldown=0))
                stub.Allocate(pb.AllocateRequest(pool="race", owner="warm", ip_family_policy=REQUIRE))
                psql(url, f"ALTER FUNCTION {sig} RENAME TO dsipam_allocate_many_real")
                psql(url, "CREATE FUNCTION dsipam_allocate_many(text, bigint, text[], boolean[], boolean[], jsonb[]) "
                          "RETURNS TABLE (idx integer) LANGUAGE plpgsql AS $$ BEGIN "
                          "RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$")
                for i in range(3):
                    resp = stub.Allocate(pb.AllocateRequest(pool="race", owner=f"o{i}", ip_family_policy=REQUIRE))
                    assert resp.created and len(resp.allocation.addresses) == 2
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            retries = {(s.labels["kind"], s.labels["sqlstate"]): s.value
                       for fam in text_string_to_metric_families(text) for s in fam.samples
                       if s.name == "dsipam_fast_path_lock_retries_total"}
            assert retries[("allocate", "40P01")] == 3 and retries[("allocate", "40001")] == 0, retries
            assert _errors_metric(address)["allocate"] == 0
            assert server.fast_path_error_lines() == []
            warnings = [line for line in server.log().splitlines() if "lost a lock race (SQLSTATE 40P01)" in line]
            assert len(warnings) == 3 and "pool 'race'" in warnings[0]
            assert psql(url, "SELECT count(*) FROM ipam_allocations") == "4"
        finally:
            server.terminate()


def test_an_outage_is_not_a_fast_path_error():
    """A refused connection is DatabaseUnavailable for the callers, and not counted as an error."""
    from dsipam.server.domain import DatabaseUnavailable

    async def main():
        fast = FastPath("postgresql://postgres@127.0.0.1:9/none", pool_size=1)
        before = FAST_PATH_ERRORS.labels("allocate")._value.get()
        try:
            with pytest.raises(DatabaseUnavailable):
                await fast.allocate("p", 1, "o", True, True, "{}", "")
        finally:
            await fast.close()
        assert fast.errors == {}
        assert FAST_PATH_ERRORS.labels("allocate")._value.get() == before

    asyncio.run(main())


# -- 6. a pooled connection the server terminated while it was idle --------------------------------
# PostgreSQL ends an idle session (pg_terminate_backend, a restart's fast shutdown,
# idle_session_timeout) by sending a FATAL ErrorResponse and then closing the socket. asyncpg
# reads the ErrorResponse of an idle connection as a protocol error (its state becomes
# "error consume", 2) and only marks the connection closed when it reads the end of the stream.
# A batch that acquires the connection in between failed with InternalClientError("cannot switch
# to state 12; another operation (2) is in progress") and was counted as a fast-path error (seen
# once in test_faults.py::test_database_restart_under_load).


def _terminate_fast_path_sessions(url: str) -> int:
    out = psql(url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'dsipam-fast'")
    return int(out.strip())


def test_a_connection_the_server_terminated_while_idle_is_not_an_error(caplog):
    """Deterministic: the one pooled connection's session is terminated while idle and the batch
    acquires it after the FATAL message arrived, before the close did. The batch runs on a new
    connection (nothing of it had been sent), on the fast path, with no error counted."""
    caplog.set_level(logging.INFO, logger="dsipam.store.fast")

    async def main(url: str) -> None:
        proxy = PgProxy(upstream_port(url))
        port = await proxy.start()
        store = Store(create_engine(url, pool_size=2, max_overflow=0))
        store.fast = fast = Watching(via(url, port))
        fast.pool_size = 1  # one connection: the batch must get the terminated one
        before = FAST_PATH_ERRORS.labels("release")._value.get()
        try:
            await _pool_with_blocks(store, "idle")
            for owner in ("a", "b", "c"):
                await store.allocate(pool="idle", owner=owner, policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                     addresses=(), attributes={})
            await store.release(pool="idle", owner="a", families=())  # the release statement is now prepared on it
            for owner in ("b", "c"):
                proxy.hold_eof = 1.5
                proxy.server_closed.clear()
                fast.statuses.clear()
                assert await asyncio.to_thread(_terminate_fast_path_sessions, url) == 1
                await asyncio.wait_for(proxy.server_closed.wait(), 10)
                await asyncio.sleep(0.2)  # the FATAL message is read; the close is still held back
                released = await store.release(pool="idle", owner=owner, families=())
                assert len(released) == 2
                assert fast.statuses == [("release", "released")]  # answered by the fast path
                assert fast.errors == {}
            assert fast.reconnects >= 2
        finally:
            await store.close()
            await proxy.close()
        assert FAST_PATH_ERRORS.labels("release")._value.get() == before

    with scratch_database("dsipam_fast_idle") as url:
        asyncio.run(main(url))
    assert not [r for r in caplog.records if r.name == "dsipam.store.fast" and r.levelno >= logging.ERROR]


def test_sessions_terminated_under_load_are_never_fast_path_errors():
    """Many rounds: the fast path's sessions are terminated while allocate and release batches
    run. A batch whose session dies mid-call is an outage (DatabaseUnavailable, the client
    retries); one that picks a connection killed while idle runs on a new one. No error is
    counted and the pool stays consistent."""
    from dsipam.server.domain import DatabaseUnavailable

    async def main(url: str) -> tuple[int, int, int]:
        store = Store(create_engine(url, pool_size=4, max_overflow=4))
        store.fast = fast = FastPath(url, pool_size=3)
        before = {k: FAST_PATH_ERRORS.labels(k)._value.get() for k in ("allocate", "release")}
        unavailable = 0
        killed = 0
        try:
            await store.create_pool(build_pool_spec("kill", [RangeInput("198.18.8.0/22"), RangeInput("fd00:8::/118")],
                                                    {}, 0))
            for fam in (Family.IPV4, Family.IPV6):
                await store.top_up_blocks("kill", fam, 4)

            async def one(op: str, owner: str) -> None:
                nonlocal unavailable
                for _ in range(20):  # as a client would: retry UNAVAILABLE
                    try:
                        if op == "allocate":
                            await store.allocate(pool="kill", owner=owner, policy=Policy.REQUIRE_DUAL_STACK,
                                                 families=(), addresses=(), attributes={})
                        else:
                            await store.release(pool="kill", owner=owner, families=())
                        return
                    except DatabaseUnavailable:
                        unavailable += 1
                        await asyncio.sleep(0.01)
                raise AssertionError(f"{op} {owner}: still unavailable after 20 attempts")

            for rnd in range(25):
                owners = [f"r{rnd}-{i}" for i in range(12)]
                work = asyncio.gather(*(one("allocate", o) for o in owners))
                await asyncio.sleep(0.002 * (rnd % 5))
                killed += await asyncio.to_thread(_terminate_fast_path_sessions, url)
                await work
                work = asyncio.gather(*(one("release", o) for o in owners[::2]))
                killed += await asyncio.to_thread(_terminate_fast_path_sessions, url)
                await work
            assert fast.errors == {}
            assert await store.fsck("kill") == []
        finally:
            await store.close()
        assert {k: FAST_PATH_ERRORS.labels(k)._value.get() for k in before} == before
        return killed, unavailable, fast.reconnects

    with scratch_database("dsipam_fast_kill") as url:
        killed, unavailable, reconnects = asyncio.run(main(url))
    print(f"\nFAST PATH KILL SUMMARY: {killed} sessions terminated, {unavailable} attempts unavailable, "
          f"{reconnects} batches sent again on a new connection")
    assert killed > 0
