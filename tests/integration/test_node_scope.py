"""Node-scoped shims (issue 13, finding 4) against a real server with an auth config.

Two shim identities, one for node-a and one for node-b, plus a controller and an admin. A
shim may Allocate for its own node only, and Release, GetAllocation and GarbageCollect only
owners whose stored node is its node; the rest is PERMISSION_DENIED with a message that
names no holder. ALREADY_EXISTS sent to a shim names no holder either; controllers keep
cluster-wide scope and see holders. A shim's Release that races another node re-allocating
the same owner never releases that node's address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_helpers import REQUIRE, error_info, pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess, free_port, psql, spawn_server

from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

POOL = "scope"
NODE_A, NODE_B = "node-a", "node-b"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def cli_token(role: str, node: str | None) -> tuple[str, str]:
    """``dsipam token new ROLE [--node NODE]``: the token (stdout) and its config entry (stderr)."""
    args = [sys.executable, "-m", "dsipam.server", "token", "new", role]
    if node is not None:
        args += ["--node", node]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return out.stdout.strip(), out.stderr.split("(under tokens:):\n", 1)[1]


def entry(name: str, role: str, node: str | None) -> tuple[str, str]:
    """A token and its auth config entry (made here, not by the CLI, so that these tests also
    run against a server without node scopes and show what it lets through)."""
    token = security.new_token()
    node_line = f"    node: {node}\n" if node else ""
    return token, f"  - name: {name}\n    role: {role}\n{node_line}    hash: {security.hash_token(token)}\n"


@pytest.fixture(scope="module")
def tokens() -> dict[str, tuple[str, str]]:
    return {"a": entry("shim-a", "shim", NODE_A), "b": entry("shim-b", "shim", NODE_B),
            "controller": entry("ctl", "controller", None), "admin": entry("ops", "admin", None)}


@pytest.fixture(scope="module")
def server(db_url: str, tokens, tmp_path_factory) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("node-scope")
    sock = tmp / "dsipam.sock"
    config = tmp / "auth.yaml"
    config.write_text("tokens:\n" + "".join(entry for _t, entry in tokens.values()))
    proc = spawn_server(db_url, tmp, extra_env={"DSIPAM_AUTH_CONFIG": str(config)},
                       args=("--listen", f"unix://{sock}"))
    proc.socket = sock  # type: ignore[attr-defined]
    yield proc
    proc.terminate()


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Caller:
    """A stub with one identity's token on every call."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.stub = ipam_pb2_grpc.IpamServiceStub(channel)
        self.metadata = md(token)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self.stub, name)
        return lambda request, **kw: method(request, metadata=self.metadata, timeout=10, **kw)


@pytest.fixture
def callers(server, tokens, clean_db) -> Iterator[dict[str, Caller]]:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        out = {name: Caller(ch, tokens[name][0]) for name in tokens}
        out["admin"].CreatePool(pool(POOL, "198.18.8.0/24", "fd00:8::/120", cooldown=0))
        yield out


def denied(fn) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == DENIED, (err.value.code(), err.value.details())
    assert error_info(err.value).reason == "PERMISSION_DENIED"
    return err.value


def alloc(caller: Caller, owner: str, node: str = "", **kw) -> pb.Allocation:  # type: ignore[no-untyped-def]
    return caller.Allocate(pb.AllocateRequest(pool=POOL, owner=owner, ip_family_policy=REQUIRE, node=node,
                                              **kw)).allocation


def test_shim_acts_only_on_its_nodes_owners(callers):
    a, b, ctl = callers["a"], callers["b"], callers["controller"]
    mine = alloc(a, "pod-a/eth0")  # no node in the request: the shim's own
    assert mine.node == NODE_A and len(mine.addresses) == 2
    assert alloc(a, "pod-a2/eth0", node=NODE_A).node == NODE_A
    theirs = alloc(b, "pod-b/eth0")
    assert theirs.node == NODE_B
    unplaced = alloc(ctl, "ctl-owned/x")  # a controller's allocation of no node
    assert unplaced.node == ""

    secrets = {NODE_B, *[x.ip for x in theirs.addresses], *[x.ip for x in unplaced.addresses]}
    for owner in ("pod-b/eth0", "ctl-owned/x"):
        for fn in (lambda o=owner: a.Release(pb.ReleaseRequest(pool=POOL, owner=o)),
                   lambda o=owner: a.Release(pb.ReleaseRequest(pool=POOL, owner=o, ip_families=[pb.IP_FAMILY_IPV6])),
                   lambda o=owner: a.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner=o)),
                   lambda o=owner: alloc(a, o)):  # Allocate is idempotent by owner: no read through it either
            err = denied(fn)
            assert not [s for s in secrets if s in err.details()], err.details()
            assert error_info(err).metadata["field"] == "owner"
    # Allocating for another node is refused outright.
    err = denied(lambda: alloc(a, "new/eth0", node=NODE_B))
    assert error_info(err).metadata["field"] == "node"
    # GarbageCollect by a shim touches only its own node's owners.
    zero = duration_pb2.Duration(seconds=0)
    gone = b.GarbageCollect(pb.GarbageCollectRequest(pool=POOL, valid_owners=[], grace=zero))
    assert [x.owner for x in gone.released] == ["pod-b/eth0"]
    gone = a.GarbageCollect(pb.GarbageCollectRequest(pool=POOL, valid_owners=["pod-a2/eth0"], grace=zero))
    assert [x.owner for x in gone.released] == ["pod-a/eth0"]
    listed = ctl.ListAllocations(pb.ListAllocationsRequest(pool=POOL))
    assert sorted(x.owner for x in listed.allocations) == ["ctl-owned/x", "pod-a2/eth0"]
    # Cluster-wide methods stay controller's.
    for fn in (lambda: a.ListAllocations(pb.ListAllocationsRequest(pool=POOL)),
               lambda: a.ReleaseNode(pb.ReleaseNodeRequest(pool=POOL, node=NODE_B)),
               lambda: a.ListBlocks(pb.ListBlocksRequest(pool=POOL)),
               lambda: next(iter(a.WatchAllocations(pb.WatchAllocationsRequest(pool=POOL)))),
               lambda: a.ListPools(pb.ListPoolsRequest())):
        denied(fn)
    # Its own: get and release work; a released or never-held owner is "nothing" (idempotent DEL).
    assert a.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="pod-a2/eth0")).node == NODE_A
    assert a.Release(pb.ReleaseRequest(pool=POOL, owner="pod-a2/eth0")).released
    assert not a.Release(pb.ReleaseRequest(pool=POOL, owner="pod-a2/eth0")).released
    assert not a.Release(pb.ReleaseRequest(pool=POOL, owner="never/eth0")).released
    # A controller keeps cluster-wide scope.
    assert ctl.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="ctl-owned/x")).owner == "ctl-owned/x"
    assert ctl.Release(pb.ReleaseRequest(pool=POOL, owner="ctl-owned/x")).released


def test_already_exists_to_a_shim_names_no_holder(callers):
    a, b, ctl = callers["a"], callers["b"], callers["controller"]
    held = alloc(a, "holder-a/eth0", addresses=["198.18.8.77", "fd00:8::77"])
    assert [x.ip for x in held.addresses] == ["198.18.8.77", "fd00:8::77"]
    with pytest.raises(grpc.RpcError) as err:
        alloc(b, "taker-b/eth0", addresses=["198.18.8.77"])
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
    assert "holder-a" not in err.value.details() and NODE_A not in err.value.details()
    assert "198.18.8.77" in err.value.details()  # what it asked for, and that it is taken
    assert all("holder-a" not in v for v in error_info(err.value).metadata.values())
    # The controller, cluster-wide, is told who holds it.
    with pytest.raises(grpc.RpcError) as err:
        alloc(ctl, "taker-ctl/x", addresses=["fd00:8::77"])
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "holder-a/eth0" in err.value.details()
    # Nothing was half-applied for the refused shim.
    listed = ctl.ListAllocations(pb.ListAllocationsRequest(pool=POOL))
    assert [x.owner for x in listed.allocations] == ["holder-a/eth0"]


def _race_round(a: Caller, b: Caller, owner: str) -> tuple[list[pb.Allocation], list[list[str]], list[grpc.StatusCode]]:
    """Two threads of node A's shim release ``owner`` again and again while node B's shim
    allocates it until it gets it; A goes on for a few calls after that."""
    b_got: list[pb.Allocation] = []
    a_released: list[list[str]] = []
    a_codes: list[grpc.StatusCode] = []
    b_done = threading.Event()

    def b_loop() -> None:
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                try:
                    b_got.append(alloc(b, owner))
                    return
                except grpc.RpcError as err:
                    assert err.code() == DENIED, (err.code(), err.details())  # still A's
        finally:
            b_done.set()

    def a_loop() -> None:
        extra = 0
        while extra < 5:
            try:
                a_released.append([x.ip for x in a.Release(pb.ReleaseRequest(pool=POOL, owner=owner)).released])
            except grpc.RpcError as err:
                a_codes.append(err.code())
            if b_done.is_set():
                extra += 1

    threads = [threading.Thread(target=b_loop), threading.Thread(target=a_loop), threading.Thread(target=a_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return b_got, a_released, a_codes


def test_release_racing_reallocation_on_another_node_never_releases_it(callers, db_url):
    """Node A's shim releases an owner again and again while node B's shim re-allocates the
    same owner as soon as it is free: every release after B's allocation is refused, and B keeps
    the address it was told."""
    a, b, ctl = callers["a"], callers["b"], callers["controller"]
    stolen: list[str] = []
    for i in range(25):
        owner = f"race-{i}/eth0"
        mine = alloc(a, owner)
        b_got, a_released, a_codes = _race_round(a, b, owner)
        assert b_got, f"round {i}: node B never got {owner}"
        now = ctl.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner=owner))
        if now.node != NODE_B or [x.ip for x in now.addresses] != [x.ip for x in b_got[0].addresses]:
            stolen.append(owner)
            continue
        nonempty = [r for r in a_released if r]
        assert nonempty == [[x.ip for x in mine.addresses]], (i, a_released)  # A released its own, once
        assert set(a_codes) <= {DENIED}, a_codes
        assert DENIED in a_codes, f"round {i}: no release of A ran after B's allocation"
    assert not stolen, f"node A released node B's allocations: {stolen}"
    fsck = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", POOL], capture_output=True, text=True,
                          env={**os.environ, "DSIPAM_DATABASE_URL": db_url})
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


NODE_TEXT = st.one_of(
    st.sampled_from(["", NODE_A, NODE_B, "*", "node-a ", " node-a", "NODE-A", "node-a\x00"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=250, max_size=300),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=NODE_TEXT, who=st.sampled_from(["a", "b", "controller"]))
def test_request_node_values_get_clean_statuses(callers, node, who):
    """Any node value in an Allocate request: a shim gets its own node or PERMISSION_DENIED (or
    INVALID_ARGUMENT for a value no node can have); a controller gets what it named; never
    anything else."""
    caller = callers[who]
    owner = f"hyp-{uuid.uuid4().hex[:12]}/eth0"
    own = {"a": NODE_A, "b": NODE_B}.get(who)
    try:
        got = alloc(caller, owner, node=node)
    except grpc.RpcError as err:
        assert err.code() in (DENIED, grpc.StatusCode.INVALID_ARGUMENT), (err.code(), err.details())
        if err.code() == DENIED:
            assert own is not None and node not in ("", own)
        else:
            assert len(node) > 253 or any(not (0x21 <= ord(c) <= 0x7E) for c in node), node
        return
    if own is not None:
        assert node in ("", own) and got.node == own
    else:
        assert got.node == node
    # Only the owning node's shim (or the controller) may release it.
    other = {"a": "b", "b": "a"}.get(who, "a")
    if got.node != {"a": NODE_A, "b": NODE_B}[other]:
        denied(lambda: callers[other].Release(pb.ReleaseRequest(pool=POOL, owner=owner)))
    assert callers["controller"].Release(pb.ReleaseRequest(pool=POOL, owner=owner)).released


# -- the auth config -------------------------------------------------------------------


CONFIG_NODE = st.one_of(
    st.none(), st.text(max_size=30), st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from(["", "*", "node-a", "a" * 253, "a" * 254, "node a"]),
)


@settings(max_examples=300, deadline=None)
@given(role=st.sampled_from(["shim", "controller", "admin"]), node=CONFIG_NODE,
       where=st.sampled_from(["tokens", "clients", "unix"]))
def test_config_node_values_load_or_name_the_field(role, node, where):
    """Every node value in every place of the auth config: loaded only when a shim names a real
    node (or a cluster-wide role names none); otherwise a ValueError naming the field."""
    entry: dict[str, object] = {"role": role}
    if node is not None:
        entry["node"] = node
    admin = {"name": "ops", "role": "admin", "hash": security.hash_token("x")}
    if where == "tokens":
        data = {"tokens": [{"name": "t", "hash": security.hash_token("y"), **entry}, admin]}
        field = "tokens[0].node"
    elif where == "clients":
        data = {"tokens": [admin], "clients": [{"cn": "some-cn", **entry}]}
        field = "clients[0].node"
    else:
        data = {"tokens": [admin], "unix_socket_role": role}
        if node is not None:
            data["unix_socket_node"] = node
        field = "unix_socket_node"
    valid_node = isinstance(node, str) and node not in ("", "*") and len(node) <= 253 and all(
        0x21 <= ord(c) <= 0x7E for c in node)
    should_load = valid_node if role == "shim" else node is None
    try:
        cfg = security.AuthConfig.from_mapping(data, "auth.yaml")
    except ValueError as exc:
        assert not should_load, exc
        assert f"auth.yaml: {field}" in str(exc), exc
        return
    assert should_load, (role, node, where)
    scoped = cfg.tokens[0].node if where == "tokens" else (
        cfg.cert_cn["some-cn"].node if where == "clients" else cfg.unix_socket_node)
    assert scoped == (node if role == "shim" else None)


def test_unix_socket_default_needs_a_token(server, tokens, clean_db):
    """No unix_socket_role in the config: the socket gives no identity (health stays open)."""
    with grpc.insecure_channel(f"unix://{server.socket}") as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="x/eth0"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # with a token, the token's identity
            stub.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="x/eth0"), metadata=md(tokens["a"][0]),
                               timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unix_socket_shim_is_scoped_to_its_node(db_url, tokens, tmp_path, clean_db):
    sock = tmp_path / "s.sock"
    config = tmp_path / "auth.yaml"
    config.write_text("tokens:\n" + tokens["admin"][1] + tokens["b"][1]
                      + f"unix_socket_role: shim\nunix_socket_node: {NODE_A}\n")
    srv = spawn_server(db_url, tmp_path, extra_env={"DSIPAM_AUTH_CONFIG": str(config)},
                       args=("--listen", f"unix://{sock}"))
    try:
        with grpc.insecure_channel(srv.target) as tcp, grpc.insecure_channel(f"unix://{sock}") as unix:
            Caller(tcp, tokens["admin"][0]).CreatePool(pool(POOL, "198.18.9.0/24", cooldown=0))
            b = Caller(tcp, tokens["b"][0])
            b_alloc = b.Allocate(pb.AllocateRequest(pool=POOL, owner="pod-b/eth0")).allocation
            stub = ipam_pb2_grpc.IpamServiceStub(unix)
            got = stub.Allocate(pb.AllocateRequest(pool=POOL, owner="pod-a/eth0"), timeout=5).allocation
            assert got.node == NODE_A
            with pytest.raises(grpc.RpcError) as err:
                stub.Release(pb.ReleaseRequest(pool=POOL, owner="pod-b/eth0"), timeout=5)
            assert err.value.code() == DENIED
            assert b.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="pod-b/eth0")) == b_alloc
    finally:
        srv.terminate()


@pytest.mark.parametrize("config, field", [
    ({"tokens": [{"name": "s", "role": "shim"}]}, "tokens[0].node: required for role shim"),
    ({"tokens": [{"name": "s", "role": "shim", "node": "*"}]}, "tokens[0].node: '*' is not a node"),
    ({"tokens": [{"name": "c", "role": "controller", "node": "n1"}]}, "tokens[0].node: only shim identities"),
    ({"clients": [{"cn": "x", "role": "shim"}]}, "clients[0].node: required for role shim"),
    ({"clients": [{"cn": "x", "role": "admin"}], "unix_socket_role": "shim"}, "unix_socket_node: required"),
])
def test_server_refuses_a_shim_without_a_node(db_url, tmp_path, config, field):
    for entry in config.get("tokens", []):
        entry["hash"] = security.hash_token("t")
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-m", "dsipam.server", "serve", "--listen", f"127.0.0.1:{free_port()}"],
        env={**os.environ, "DSIPAM_DATABASE_URL": db_url, "DSIPAM_AUTH_CONFIG": str(path)},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert field in out.stderr, out.stderr


def test_cli_token_names_its_node(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "token", "new", "shim"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "--node: required for role shim" in out.stderr, out.stderr
    assert not out.stdout.strip()  # no token printed for an entry that could not be used
    token, line = cli_token("shim", "node-7.example")
    (tmp_path / "auth.yaml").write_text("tokens:\n" + line)
    cfg = security.load_auth_config(tmp_path / "auth.yaml")
    assert cfg.tokens[0].node == "node-7.example" and cfg.tokens[0].name == "shim-node-7.example"
    assert security.Authorizer(cfg).token_entry(token) is cfg.tokens[0]


def test_stored_node_is_what_the_guard_reads(callers, db_url):
    """The guard reads the stored node of the allocation: changing it in the database (as a
    controller's ReleaseNode/migration could) moves the owner out of node A's reach."""
    a = callers["a"]
    alloc(a, "moved/eth0")
    psql(db_url, "UPDATE ipam_allocations SET node = 'node-b' WHERE owner = 'moved/eth0'")
    denied(lambda: a.Release(pb.ReleaseRequest(pool=POOL, owner="moved/eth0")))
    assert callers["b"].Release(pb.ReleaseRequest(pool=POOL, owner="moved/eth0")).released


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([str(Path(__file__))]))


def test_certificate_mappings_carry_their_node():
    """A client certificate mapped as a shim (by CN or SAN) brings its node to the call."""
    cfg = security.AuthConfig.from_mapping({"clients": [
        {"cn": "node-a.shim", "role": "shim", "node": NODE_A},
        {"san": "spiffe://cluster/node/node-b", "role": "shim", "node": NODE_B},
        {"cn": "controller", "role": "controller"},
    ]})
    auth = security.Authorizer(cfg)
    assert auth.certificate_grant({"x509_common_name": [b"node-a.shim"]}) == (
        security.Grant(security.Role.SHIM, NODE_A), "cert:CN=node-a.shim")
    assert auth.certificate_grant({"x509_common_name": [b"x"],
                                   "x509_subject_alternative_name": [b"spiffe://cluster/node/node-b"]})[0] == (
        security.Grant(security.Role.SHIM, NODE_B))
    assert auth.certificate_grant({"x509_common_name": [b"controller"]})[0] == security.Grant(security.Role.CONTROLLER)
