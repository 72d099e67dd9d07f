"""SDK retries against real servers that fail: started late, restarted in the middle of a call
sequence, a database that is down, transactions that keep losing races (ABORTED) and
unexpected server errors (INTERNAL). UNAVAILABLE and ABORTED are retried; RESOURCE_EXHAUSTED
and INTERNAL are not. Attempts are counted by a client interceptor, outside the SDK."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import ServerProcess, free_port, psql, scratch_database, spawn_server

import dsipam.client as sdk
from dsipam.client import AsyncIpamClient, IpamClient, Range, RetryPolicy

DUAL = ["198.18.0.0/24", "fd00::/120"]
QUICK = RetryPolicy(initial_backoff=0.05, max_backoff=0.5)

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


class Counting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the calls that reach the channel, per method."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return continuation(details, request)


class AsyncCounting(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The same for grpc.aio."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = details.method
        name = (name.decode() if isinstance(name, bytes) else name).rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return await continuation(details, request)


# -- UNAVAILABLE: a server that starts late or restarts ----------------------------------


def test_sync_client_waits_for_a_server_started_late(db_url: str, clean_db: str, tmp_path: Path) -> None:
    port = free_port()
    counting = Counting()
    started: list[ServerProcess] = []
    starter = threading.Timer(1.0, lambda: started.append(spawn_server(db_url, tmp_path, port=port)))
    try:
        with IpamClient(f"127.0.0.1:{port}", timeout=60, retry=QUICK, interceptors=[counting]) as ipam:
            starter.start()  # nothing listens on the port until then
            pool = ipam.create_pool("late", DUAL)
            starter.join()
            assert pool.name == "late" and started
            assert counting.calls["CreatePool"] > 1  # refused at first, then retried until the server was up
            assert ipam.allocate("late", "a", policy="require").created
    finally:
        starter.cancel()
        starter.join()
        for server in started:
            server.terminate()


async def test_async_client_waits_for_a_server_started_late(db_url: str, clean_db: str, tmp_path: Path) -> None:
    port = free_port()
    counting = AsyncCounting()
    server: ServerProcess | None = None
    try:
        async with AsyncIpamClient(f"127.0.0.1:{port}", timeout=60, retry=QUICK, interceptors=[counting]) as ipam:
            call = asyncio.create_task(ipam.create_pool("late", DUAL))
            await asyncio.sleep(1.0)
            assert not call.done()  # still retrying: nothing listens yet
            server = await asyncio.to_thread(spawn_server, db_url, tmp_path, port=port)
            pool = await call
            assert pool.name == "late" and counting.calls["CreatePool"] > 1
            assert (await ipam.allocate("late", "a", policy="require")).created
    finally:
        if server is not None:
            server.terminate()


def test_sync_sequence_survives_a_server_restart(db_url: str, clean_db: str, tmp_path: Path) -> None:
    port = free_port()
    servers = [spawn_server(db_url, tmp_path, port=port)]
    counting = Counting()
    restarter = threading.Timer(1.0, lambda: servers.append(spawn_server(db_url, tmp_path, port=port)))
    try:
        with IpamClient(f"127.0.0.1:{port}", timeout=60, retry=QUICK, interceptors=[counting]) as ipam:
            ipam.create_pool("restart", DUAL)
            before = [ipam.allocate("restart", f"o{i}", policy="require").allocation for i in range(5)]
            servers[0].kill()  # abrupt: no drain
            restarter.start()
            after = [ipam.allocate("restart", f"o{i}", policy="require").allocation for i in range(5, 10)]
            restarter.join()
            assert counting.calls["Allocate"] > 10  # the first call after the kill was retried
            # idempotent across the restart: the same owner gets the same pair back
            again = ipam.allocate("restart", "o3", policy="require")
            assert again.created is False and again.allocation.addresses == before[3].addresses
            listed = list(ipam.iter_allocations("restart"))
            assert [a.owner for a in listed] == sorted(f"o{i}" for i in range(10))
            ips = {x.ip for a in before + after for x in a.addresses}
            assert len(ips) == 20  # ten distinct pairs
    finally:
        restarter.cancel()
        restarter.join()
        for server in servers:
            server.terminate()


async def test_async_sequence_survives_a_server_restart(db_url: str, clean_db: str, tmp_path: Path) -> None:
    port = free_port()
    servers = [await asyncio.to_thread(spawn_server, db_url, tmp_path, port=port)]
    counting = AsyncCounting()
    try:
        async with AsyncIpamClient(f"127.0.0.1:{port}", timeout=60, retry=QUICK, interceptors=[counting]) as ipam:
            await ipam.create_pool("restart", DUAL)
            for i in range(3):
                await ipam.allocate("restart", f"o{i}", policy="require")
            servers[0].terminate()  # graceful this time
            pending = asyncio.create_task(ipam.allocate("restart", "o3", policy="require"))
            await asyncio.sleep(0.5)
            assert not pending.done()
            servers.append(await asyncio.to_thread(spawn_server, db_url, tmp_path, port=port))
            assert (await pending).created
            assert counting.calls["Allocate"] > 4
            await ipam.release("restart", "o0")
            assert [a.owner async for a in ipam.iter_allocations("restart")] == ["o1", "o2", "o3"]
    finally:
        for server in servers:
            server.terminate()


def test_unreachable_server_gives_up_at_the_deadline_with_service_unavailable() -> None:
    counting = Counting()
    with IpamClient(f"127.0.0.1:{free_port()}", timeout=1.5, retry=QUICK, interceptors=[counting]) as ipam:
        with pytest.raises(sdk.ServiceUnavailable) as caught:
            ipam.list_pools()
    err = caught.value
    assert type(err) is sdk.ServiceUnavailable and err.reason == "" and err.code == grpc.StatusCode.UNAVAILABLE
    assert err.attempts == counting.calls["ListPools"] > 1
    with IpamClient(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01),
                    interceptors=[counting], timeout=WAIT) as ipam:
        with pytest.raises(sdk.ServiceUnavailable) as caught:
            ipam.get_pool("x")
    assert caught.value.attempts == counting.calls["GetPool"] == 3


# -- RESOURCE_EXHAUSTED is never retried ---------------------------------------------------


def test_sync_pool_exhausted_is_not_retried(target: str) -> None:
    counting = Counting()
    with IpamClient(target, retry=RetryPolicy(max_attempts=5), interceptors=[counting], timeout=WAIT) as ipam:
        ipam.create_pool("one", [Range("198.18.7.0/24", first="198.18.7.9", last="198.18.7.9")])
        ipam.allocate("one", "holder")
        with pytest.raises(sdk.PoolExhausted) as caught:
            ipam.allocate("one", "another")
    assert caught.value.attempts == 1
    assert counting.calls["Allocate"] == 2  # the holder's, and one for the refused call


async def test_async_pool_exhausted_is_not_retried(target: str) -> None:
    counting = AsyncCounting()
    async with AsyncIpamClient(target, retry=RetryPolicy(max_attempts=5), interceptors=[counting],
                               timeout=WAIT) as ipam:
        await ipam.create_pool("one", [Range("198.18.7.0/24", first="198.18.7.9", last="198.18.7.9")])
        await ipam.allocate("one", "holder")
        with pytest.raises(sdk.PoolExhausted) as caught:
            await ipam.allocate("one", "another")
    assert caught.value.attempts == 1 and counting.calls["Allocate"] == 2


# -- a database that is down; conflicts (ABORTED); INTERNAL ---------------------------------


@pytest.fixture(scope="module")
def db_down_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose database URL points at a port where nothing listens."""
    server = spawn_server(f"postgresql://postgres@127.0.0.1:{free_port()}/none", tmp_path_factory.mktemp("dbdown"),
                          wait_serving=False)
    yield server
    server.terminate()


def test_sync_database_unavailable_is_retried(db_down_server: ServerProcess) -> None:
    counting = Counting()
    with IpamClient(db_down_server.target, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01),
                    interceptors=[counting], timeout=WAIT) as ipam:
        with pytest.raises(sdk.DatabaseUnavailable) as caught:
            ipam.allocate("pods", "o")
    err = caught.value
    assert isinstance(err, sdk.ServiceUnavailable) and err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == "DATABASE_UNAVAILABLE" and err.message.startswith("database")
    assert err.attempts == counting.calls["Allocate"] == 3


async def test_async_database_unavailable_is_retried_until_the_deadline(db_down_server: ServerProcess) -> None:
    counting = AsyncCounting()
    async with AsyncIpamClient(db_down_server.target, timeout=2.0, retry=QUICK, interceptors=[counting]) as ipam:
        with pytest.raises(sdk.DatabaseUnavailable) as caught:
            await ipam.release("pods", "o")
    # the SDK stopped retrying on its own, before an attempt ran into the deadline
    assert caught.value.attempts == counting.calls["Release"] > 1


@pytest.fixture(scope="module")
def sabotaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server on a database of its own in which every new pool row fails with a serialization
    failure (the server retries it, then reports CONFLICT) and every new allocation row with an
    unexpected error (INTERNAL). A sequence counts the pool inserts tried."""
    with scratch_database("dsipam_sdk_sabotage") as url:
        server = spawn_server(url, tmp_path_factory.mktemp("sabotage"))
        server.expected_traceback_lines = ("dsipam.rpc internal error",)  # the INTERNAL answers it provokes
        # The sabotaged insert fails inside a fast-path batch too (once the pool's layout is cached,
        # an Allocate takes the fast path first): that error is provoked here, not a bug.
        server.fast_path_errors_expected = True
        try:
            with IpamClient(server.target, timeout=WAIT) as ipam:
                ipam.create_pool("existing", DUAL)
            psql(url, """
                CREATE SEQUENCE pool_inserts;
                CREATE FUNCTION lose_race() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  PERFORM nextval('pool_inserts');
                  RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
                END $$;
                CREATE TRIGGER lose_race BEFORE INSERT ON ipam_pools FOR EACH ROW EXECUTE FUNCTION lose_race();
                CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'secret internals'; END $$;
                CREATE TRIGGER fail BEFORE INSERT ON ipam_allocations FOR EACH ROW EXECUTE FUNCTION fail();
            """)
            yield server, url
        finally:
            server.terminate()


def test_conflict_is_aborted_and_retried(sabotaged: tuple[ServerProcess, str]) -> None:
    server, url = sabotaged
    counting = Counting()
    before = int(psql(url, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pool_inserts"))
    with IpamClient(server.target, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01),
                    interceptors=[counting], timeout=WAIT) as ipam:
        with pytest.raises(sdk.Conflict) as caught:
            ipam.create_pool("never", DUAL)
    err = caught.value
    assert isinstance(err, sdk.Aborted) and err.code == grpc.StatusCode.ABORTED and err.reason == "CONFLICT"
    assert err.attempts == counting.calls["CreatePool"] == 3
    tried = int(psql(url, "SELECT last_value FROM pool_inserts")) - before
    assert tried >= 3  # every call reached the database (and the server retried there too)


async def test_internal_errors_are_not_retried_and_hide_internals(sabotaged: tuple[ServerProcess, str]) -> None:
    server, _ = sabotaged
    counting = AsyncCounting()
    async with AsyncIpamClient(server.target, retry=RetryPolicy(max_attempts=5), interceptors=[counting],
                               timeout=WAIT) as ipam:
        with pytest.raises(sdk.InternalError) as caught:
            await ipam.allocate("existing", "o", policy="require")
        assert (await ipam.get_pool("existing")).name == "existing"  # the server itself is fine
    err = caught.value
    assert err.code == grpc.StatusCode.INTERNAL and err.reason == "INTERNAL"
    assert "secret" not in err.message
    assert err.attempts == counting.calls["Allocate"] == 1
