"""Fixtures: one migrated database per session (real PostgreSQL), clean-up after
each test, and one real server process on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube import ApiServer, running_api_server  # noqa: E402
from support import ServerProcess, psql, scratch_database, spawn_server  # noqa: E402

from dsipam.v1 import ipam_pb2_grpc  # noqa: E402

TABLES = "ipam_allocations, ipam_blocks, ipam_ranges, ipam_pools"


@pytest.fixture(scope="session")
def db_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def server_proc(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = spawn_server(db_url, tmp_path_factory.mktemp("server"))
    yield server
    server.terminate()


@pytest.fixture
def clean_db(db_url: str) -> Iterator[str]:
    yield db_url
    # A server's background work (cooldown reclaim, spare-block top-up) may still hold row locks
    # that TRUNCATE's table locks deadlock with; PostgreSQL then aborts one side: try again.
    for attempt in range(10):
        try:
            psql(db_url, f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
            return
        except subprocess.CalledProcessError:
            if attempt == 9:
                raise
            time.sleep(0.3)


@pytest.fixture
def target(server_proc: ServerProcess, clean_db: str, request: pytest.FixtureRequest) -> Iterator[str]:
    if server_proc.proc.poll() is not None:
        raise RuntimeError(f"session server died:\n{server_proc.log()}")
    # The session server is shared: a fast-path error it counts or logs during this test fails this test.
    errors_before = server_proc.fast_path_errors() or 0.0
    log_from = len(server_proc.log())
    yield server_proc.target
    server_proc.check_fast_path(errors_before=errors_before, log_from=log_from, who=request.node.nodeid)


@pytest.fixture
def stub(target: str) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield ipam_pb2_grpc.IpamServiceStub(channel)


@pytest.fixture(scope="session")
def kube_api() -> Iterator[ApiServer]:
    """A real kube-apiserver + etcd (tests/kube.py), found through KUBEBUILDER_ASSETS; stopped afterwards."""
    yield from running_api_server()
