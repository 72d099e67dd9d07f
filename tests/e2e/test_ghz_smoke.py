"""ghz smoke run: every shipped config in bench/ghz/ runs against a real server with ``--proto``.

A few hundred calls per config (the counts and concurrency overridden on the command line, as
docs/performance.md shows), in the order of the benchmark, so that a config whose call, field
names or enum values no longer match proto/dsipam/v1/ipam.proto fails here, and every call is
answered OK. ghz is a benchmark tool, not a dependency: found through ``$GHZ``, PATH, or
``../shared/ghz/ghz`` beside the project (scripts/test exports ``GHZ`` when it finds one there);
without one the test is skipped, naming what was looked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_helpers import pool
from support import spawn_server

from dsipam.v1 import ipam_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bench" / "ghz"
IMPORT_PATHS = f"{ROOT / 'proto'},{CONFIGS / 'proto'}"
# The benchmark's order: later configs use the owners of earlier ones.
ORDER = ("empty_rpc", "s1_allocate", "s3_reallocate", "s5_mixed_allocate", "s5_mixed_release", "s2_release",
         "s4_allocate_99_full", "s6_scale")
CALLS = 200


def find_ghz() -> str | None:
    for candidate in (os.environ.get("GHZ"), shutil.which("ghz"), str(ROOT.parent / "shared" / "ghz" / "ghz")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


GHZ = find_ghz()
pytestmark = pytest.mark.skipif(GHZ is None, reason="no ghz: set GHZ, put ghz on PATH, or keep ../shared/ghz/ghz "
                                                    "beside the project (ghz v0.120.0, see docs/performance.md)")


def test_configs_match_the_proto():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(ORDER), "a config added or removed: list it in ORDER"


def run_config(name: str, target: str) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    proto = "grpc/health/v1/health.proto" if config["call"].startswith("grpc.health") else "dsipam/v1/ipam.proto"
    total = CALLS // 2 if name.startswith("s5_") else CALLS
    done = subprocess.run(
        [GHZ, "--config", str(CONFIGS / f"{name}.json"), "--import-paths", IMPORT_PATHS, "--proto", proto,
         "-n", str(total), "-c", "8", "--connections", "2", "--format", "json", target],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"ghz --config {name}.json: {done.stderr.strip()[:2000]}"
    report = json.loads(done.stdout)
    assert report["count"] == total, (name, report["count"])
    return report


@pytest.mark.timeout(300)
def test_every_shipped_config_runs_against_a_real_server(db_url, tmp_path):
    server = spawn_server(db_url, tmp_path)
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            # The configs' pools, small: s1 (allocate, re-allocate, mixed, release), s4, s6.
            for name, v4, v6 in (("s1", "198.18.40.0/22", "fd00:40::/118"), ("s4", "198.18.44.0/24", "fd00:44::/120"),
                                 ("s6", "198.18.45.0/24", "fd00:45::/120")):
                stub.CreatePool(pool(name, v4, v6), timeout=30)
        for name in ORDER:
            report = run_config(name, server.target)
            codes = report.get("statusCodeDistribution") or {}
            assert codes == {"OK": report["count"]}, (name, codes, report.get("errorDistribution"))
        with grpc.insecure_channel(server.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            from dsipam.v1 import ipam_pb2 as pb

            held = {name: {u.family: u.allocated for u in stub.GetPool(pb.GetPoolRequest(name=name)).usage}
                    for name in ("s1", "s4", "s6")}
        # s1: 200 allocated, re-allocated (no new), 100 mixed new owners, s1-0..99 and then s1-0..199 released.
        assert set(held["s1"].values()) == {CALLS // 2}, held
        assert set(held["s4"].values()) == {CALLS} and set(held["s6"].values()) == {CALLS}, held
    finally:
        server.terminate()
