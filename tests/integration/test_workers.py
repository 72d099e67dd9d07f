"""`dsipam serve --workers 2`: two processes share one port and stay correct together."""

import os
import signal
import subprocess
import sys

import grpc
from grpc_helpers import REQUIRE, pool
from support import free_port, wait_healthy

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


def test_two_workers_share_the_port(db_url, clean_db, tmp_path):
    port = free_port()
    env = {**os.environ, "DSIPAM_DATABASE_URL": db_url, "DSIPAM_INSECURE": "1", "DSIPAM_SHUTDOWN_DELAY": "0",
           "DSIPAM_LOG_LEVEL": "WARNING"}
    log = open(tmp_path / "workers.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dsipam.server", "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=30, proc=proc)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(pool("w", "198.18.0.0/24", "fd00::/120"))
        got = []
        for i in range(40):  # a fresh connection each time: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                resp = ipam_pb2_grpc.IpamServiceStub(ch).Allocate(
                    pb.AllocateRequest(pool="w", owner=f"o{i}", ip_family_policy=REQUIRE), timeout=30)
                got += [a.ip for a in resp.allocation.addresses]
        assert len(got) == len(set(got)) == 80
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for child in children:
            assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-P", str(proc.pid)], capture_output=True)
