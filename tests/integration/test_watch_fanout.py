"""Watch fan-out: idle watch streams cost the database nothing, every stream of a process is fed
by one reader of the event outbox (woken by LISTEN/NOTIFY), watch streams are capped in total and
per caller, a slow stream catches up by itself, and the listener survives a database outage."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_helpers import REQUIRE, error_info, next_owners, pool
from support import psql, running_server, scratch_database

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode


@pytest.fixture
def own_db():  # type: ignore[no-untyped-def]
    """A database of this test's server alone: its connections and transactions are counted."""
    with scratch_database("dsipam_fanout") as url:
        yield url


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def commits(url: str) -> int:
    """Transactions committed in the test database so far (every query of the server is one)."""
    return int(psql(url, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db_name(url)}'"))


def backends(url: str) -> int:
    return int(psql(url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db_name(url)}' "
                         "AND pid <> pg_backend_pid()"))


class Watcher:
    """A watch stream read on its own thread."""

    def __init__(self, stub, name: str, token: str = "") -> None:  # type: ignore[no-untyped-def]
        self.call = stub.WatchAllocations(pb.WatchAllocationsRequest(pool=name, resume_token=token))
        self.first = next(self.call)
        self.events: list[pb.WatchAllocationsResponse] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for message in self.call:
                if message.type != pb.EVENT_TYPE_BOOKMARK:
                    self.events.append(message)
        except grpc.RpcError as err:
            self.error = err

    def owners(self) -> list[str]:
        return [e.owner for e in self.events]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


SLOW = 30.0  # an event waits for every older transaction of the (shared) cluster to end


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def allocate(stub, name: str, owner: str) -> None:  # type: ignore[no-untyped-def]
    stub.Allocate(pb.AllocateRequest(pool=name, owner=owner, ip_family_policy=REQUIRE), timeout=10)


def test_idle_streams_cost_the_database_nothing(own_db, tmp_path):
    """200 idle watches of two pools on one server: no more transactions and at most one more
    connection than the same server without them; an event still reaches every stream at once,
    woken by NOTIFY (the fallback read is set to a minute here)."""
    with running_server(own_db, tmp_path, extra_env={"DSIPAM_WATCH_FALLBACK_SECONDS": "60"}) as server, grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("fan-a", "198.18.0.0/24", "fd00::/120"))
        stub.CreatePool(pool("fan-b", "198.18.1.0/24", "fd00:1::/120"))
        time.sleep(1.0)
        before, conns_before = commits(own_db), backends(own_db)
        time.sleep(4.0)
        baseline = commits(own_db) - before  # maintenance and health pings of an idle server
        watchers = [Watcher(stub, "fan-a" if i % 2 else "fan-b") for i in range(200)]
        try:
            time.sleep(1.0)
            before = commits(own_db)
            time.sleep(4.0)
            idle = commits(own_db) - before
            assert idle <= baseline + 8, f"{idle} transactions in 4 s with 200 idle watches ({baseline} without)"
            assert backends(own_db) <= conns_before + 2
            allocate(stub, "fan-a", "one")
            allocate(stub, "fan-b", "two")
            wait_for(lambda: all(w.owners() == (["one"] if i % 2 else ["two"]) for i, w in enumerate(watchers)),
                     SLOW, "the events on every stream")
            for k in range(3):  # each one woken by its NOTIFY: no read happens otherwise for a minute
                allocate(stub, "fan-a", f"later-{k}")
                wait_for(lambda k=k: all(w.owners()[-1:] == [f"later-{k}"] for w in watchers[1::2]), SLOW, "an event")
        finally:
            for w in watchers:
                w.close()


def test_watch_streams_are_capped_in_total_and_per_caller(own_db, tmp_path):
    env = {"DSIPAM_MAX_WATCH_STREAMS": "4", "DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY": "3"}
    with running_server(own_db, tmp_path, extra_env=env) as server, grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("cap", "198.18.0.0/24", "fd00::/120"))
        watchers = [Watcher(stub, "cap") for _ in range(3)]
        try:
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.WatchAllocations(pb.WatchAllocationsRequest(pool="cap"), timeout=10))
            assert caught.value.code() == C.RESOURCE_EXHAUSTED, caught.value.details()
            assert "DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY" in caught.value.details()
            assert "3" in caught.value.details()
            assert error_info(caught.value).reason == "TOO_MANY_WATCH_STREAMS"
            # A stream that ends frees its place.
            watchers.pop().close()
            time.sleep(0.3)
            watchers.append(Watcher(stub, "cap"))
            allocate(stub, "cap", "x")
            wait_for(lambda: all(w.owners() == ["x"] for w in watchers), SLOW, "the event")
        finally:
            for w in watchers:
                w.close()
    env = {"DSIPAM_MAX_WATCH_STREAMS": "2", "DSIPAM_MAX_WATCH_STREAMS_PER_IDENTITY": "5"}
    with running_server(own_db, tmp_path, extra_env=env) as server, grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        watchers = [Watcher(stub, "cap") for _ in range(2)]
        try:
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.WatchAllocations(pb.WatchAllocationsRequest(pool="cap"), timeout=10))
            assert caught.value.code() == C.RESOURCE_EXHAUSTED
            assert "DSIPAM_MAX_WATCH_STREAMS " in caught.value.details() + " "
            assert "PER_IDENTITY" not in caught.value.details()
        finally:
            for w in watchers:
                w.close()


def test_a_slow_stream_catches_up_without_gaps(own_db, tmp_path):
    """A stream whose buffer (here 4 events) overflows reads the rest on its own, in order, once."""
    with running_server(own_db, tmp_path, extra_env={"DSIPAM_WATCH_BUFFER": "4"}) as server, \
            grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("slow", "198.18.0.0/22", "fd00::/118"))
        fast = Watcher(stub, "slow")
        slow = stub.WatchAllocations(pb.WatchAllocationsRequest(pool="slow"))
        assert next(slow).type == pb.EVENT_TYPE_BOOKMARK
        owners = [f"o{i:03d}" for i in range(300)]
        # Concurrent allocations: many events per read of the outbox, so the slow stream overflows.
        threads = [threading.Thread(target=lambda part=owners[k::6]: [allocate(stub, "slow", o) for o in part])
                   for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: len(fast.events) >= 300, 60.0, "the fast stream")
        got = next_owners(slow, 300)
        slow.cancel()
        assert got == fast.owners() and sorted(got) == owners
        fast.close()
        log = server.log()
    assert "fell behind" in log  # the overflow happened and was logged


def test_the_listener_comes_back_after_its_connection_is_killed(own_db, tmp_path):
    with running_server(own_db, tmp_path, extra_env={"DSIPAM_LOG_LEVEL": "INFO"}) as server, \
            grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("relisten", "198.18.0.0/24", "fd00::/120"))
        w = Watcher(stub, "relisten")
        try:
            allocate(stub, "relisten", "before")
            wait_for(lambda: w.owners() == ["before"], SLOW, "the first event")
            killed = psql(own_db, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    f"WHERE datname = '{db_name(own_db)}' AND application_name = 'dsipam-watch'")
            assert killed == "1"
            time.sleep(0.5)
            allocate(stub, "relisten", "after")
            wait_for(lambda: w.owners() == ["before", "after"], SLOW, "the event after the outage")
            wait_for(lambda: "ERROR dsipam.store.watch watch listener failed" in server.log(), 5.0, "the ERROR log")
            assert w.error is None
        finally:
            w.close()


def test_deleting_a_watched_pool_ends_its_streams_with_not_found(stub):
    stub.CreatePool(pool("gone", "198.18.0.0/24", "fd00::/120"))
    stub.CreatePool(pool("stays", "198.18.1.0/24", "fd00:1::/120"))
    gone = [Watcher(stub, "gone") for _ in range(3)]
    stays = Watcher(stub, "stays")
    try:
        allocate(stub, "gone", "a")
        wait_for(lambda: all(w.owners() == ["a"] for w in gone), SLOW, "the event")
        stub.DeletePool(pb.DeletePoolRequest(name="gone", force=True))
        allocate(stub, "stays", "b")  # a wake-up: the reader notices the deleted pool
        wait_for(lambda: all(w.error is not None for w in gone), SLOW, "the streams to end")
        for w in gone:
            assert w.error.code() == C.NOT_FOUND and "'gone'" in w.error.details()
        wait_for(lambda: stays.owners() == ["b"], SLOW, "the other pool's event")
        assert stays.error is None
    finally:
        for w in [*gone, stays]:
            w.close()
