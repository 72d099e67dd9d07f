"""GarbageCollect's node and attribute_selector filters, against a real server with node-scoped shims.

A controller (or admin) may confine GC to any node and to allocations whose attributes contain a
selector; a shim's GC is always confined to its own node: ``node`` empty means its node, another
node is PERMISSION_DENIED (field ``node``) and nothing is released. The hypothesis test draws the
new request fields (valid and not) and checks, against an oracle written here, that every answer
is OK or a clean INVALID_ARGUMENT / PERMISSION_DENIED naming the field, and that exactly the
allocations the filters select (not valid, older than the grace) are released.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_helpers import error_info, pool
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import ServerProcess, spawn_server

from dsipam.client import IpamClient, PermissionDenied
from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

POOL = "gcf"
NODE_A, NODE_B = "node-a", "node-b"
ZERO = duration_pb2.Duration(seconds=0)

# owner -> (node, attributes): what the tests allocate (as admin) before each GC
FIXTURE = {
    "a1/eth0": (NODE_A, {"cni.node": NODE_A, "cni.network": "net1"}),
    "a2/eth0": (NODE_A, {"cni.node": NODE_A, "cni.network": "net2"}),
    "a3/eth0": (NODE_A, {}),
    "b1/eth0": (NODE_B, {"cni.node": NODE_B, "cni.network": "net1"}),
    "b2/eth0": (NODE_B, {"cni.node": NODE_B, "cni.network": "net1", "k": ""}),
    "none/x": ("", {"cni.network": "net1"}),
}


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    return {name: security.new_token() for name in ("a", "b", "controller", "admin")}


@pytest.fixture(scope="module")
def server(db_url: str, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("gc-filters")
    roles = {"a": ("shim", NODE_A), "b": ("shim", NODE_B), "controller": ("controller", ""), "admin": ("admin", "")}
    config = tmp / "auth.yaml"
    config.write_text("tokens:\n" + "".join(
        f"  - name: {name}\n    role: {roles[name][0]}\n" + (f"    node: {roles[name][1]}\n" if roles[name][1] else "")
        + f"    hash: {security.hash_token(token)}\n" for name, token in tokens.items()))
    proc = spawn_server(db_url, tmp, extra_env={"DSIPAM_AUTH_CONFIG": str(config)})
    yield proc
    proc.terminate()


class Caller:
    """A stub with one identity's token on every call."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.stub = ipam_pb2_grpc.IpamServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self.stub, name)
        return lambda request: method(request, metadata=self.metadata, timeout=10)


@pytest.fixture(scope="module")
def callers(server: ServerProcess, tokens: dict[str, str]) -> Iterator[dict[str, Caller]]:
    with grpc.insecure_channel(server.target) as ch:
        out = {name: Caller(ch, token) for name, token in tokens.items()}
        out["admin"].CreatePool(pool(POOL, "198.18.9.0/24", "fd00:9::/120", cooldown=0))
        yield out
        out["admin"].DeletePool(pb.DeletePoolRequest(name=POOL, force=True))


def populate(admin: Caller) -> None:
    for owner, (node, attributes) in FIXTURE.items():
        admin.Allocate(pb.AllocateRequest(pool=POOL, owner=owner, node=node, attributes=attributes))


def held(admin: Caller) -> set[str]:
    return {a.owner for a in admin.ListAllocations(pb.ListAllocationsRequest(pool=POOL)).allocations}


def gc(caller: Caller, valid: list[str] | None = None, **fields: object) -> list[str]:
    request = pb.GarbageCollectRequest(pool=POOL, valid_owners=valid or [], grace=ZERO, **fields)
    return sorted(a.owner for a in caller.GarbageCollect(request).released)


def test_a_controller_filters_by_node_and_attributes(callers: dict[str, Caller]) -> None:
    ctl, admin = callers["controller"], callers["admin"]
    populate(admin)
    # node only: that node's allocations, whatever their attributes
    assert gc(ctl, ["a1/eth0"], node=NODE_A) == ["a2/eth0", "a3/eth0"]
    populate(admin)
    # selector only: any node (and none), attributes containing every pair
    assert gc(ctl, attribute_selector={"cni.network": "net1"}) == ["a1/eth0", "b1/eth0", "b2/eth0", "none/x"]
    populate(admin)
    # both: what the CNI plugin sends (this node, this network)
    assert gc(ctl, ["b1/eth0"], node=NODE_B, attribute_selector={"cni.node": NODE_B, "cni.network": "net1"}) \
        == ["b2/eth0"]
    # an empty value matches a key whose value is "", not a missing key
    populate(admin)
    assert gc(ctl, attribute_selector={"k": ""}) == ["b2/eth0"]
    # neither: the whole pool, as before; the grace still protects
    populate(admin)
    assert callers["admin"].GarbageCollect(pb.GarbageCollectRequest(pool=POOL)).released == []
    assert gc(ctl) == sorted(FIXTURE)
    assert held(admin) == set()


def test_a_shim_collects_only_its_own_node(callers: dict[str, Caller]) -> None:
    a, admin = callers["a"], callers["admin"]
    populate(admin)
    with pytest.raises(grpc.RpcError) as err:
        gc(a, node=NODE_B)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    info = error_info(err.value)
    assert info.reason == "PERMISSION_DENIED" and info.metadata["field"] == "node"
    assert "node-b" in err.value.details() and "own node" in err.value.details()
    assert held(admin) == set(FIXTURE)  # nothing released
    # its own node named, or no node: the same, confined to node-a
    assert gc(a, ["a1/eth0"], node=NODE_A, attribute_selector={"cni.network": "net2"}) == ["a2/eth0"]
    assert gc(a, attribute_selector={"cni.network": "net1"}) == ["a1/eth0"]
    assert gc(a) == ["a3/eth0"]
    assert held(admin) == {"b1/eth0", "b2/eth0", "none/x"}


# -- hypothesis: the new fields, valid and not ----------------------------------------------------

_node = st.one_of(st.sampled_from(["", NODE_A, NODE_B, "node-c"]), st.text(max_size=8),
                  st.just("n" * 254), st.just("has space"))
_key = st.one_of(st.sampled_from(["cni.node", "cni.network", "k"]), st.text(max_size=6), st.just("x" * 254))
_value = st.one_of(st.sampled_from([NODE_A, NODE_B, "net1", "net2", ""]), st.text(max_size=6),
                   st.just("v" * 1025))
_selector = st.dictionaries(_key, _value, max_size=3) | st.just({f"k{i}": "" for i in range(65)})


def _node_ok(node: str) -> bool:
    return len(node) <= 253 and (not node or (node.isascii() and node.isprintable() and " " not in node))


def _selector_ok(selector: dict[str, str]) -> bool:
    return len(selector) <= 64 and all(
        0 < len(k) <= 253 and len(v) <= 1024 and "\x00" not in k + v for k, v in selector.items())


@settings(max_examples=80, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(who=st.sampled_from(["a", "b", "controller"]), node=_node, selector=_selector,
       valid=st.lists(st.sampled_from(sorted(FIXTURE)), max_size=3))
def test_any_node_and_selector_is_a_clean_answer_and_collects_exactly_the_selected(
        callers: dict[str, Caller], who: str, node: str, selector: dict[str, str], valid: list[str]) -> None:
    admin = callers["admin"]
    populate(admin)
    scope = {"a": NODE_A, "b": NODE_B}.get(who)
    try:
        released = gc(callers[who], valid, node=node, attribute_selector=selector)
    except grpc.RpcError as exc:
        code, field = exc.code(), error_info(exc).metadata.get("field")
        event(f"{code.name} {field}")
        if scope is not None and node and node != scope:
            assert (code, field) == (grpc.StatusCode.PERMISSION_DENIED, "node"), exc.details()
        elif not _node_ok(node):
            assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "node"), exc.details()
        else:
            assert not _selector_ok(selector), exc.details()
            assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "attribute_selector"), exc.details()
        assert held(admin) == set(FIXTURE)  # nothing half-applied
        return
    assert (scope is None or not node or node == scope) and _node_ok(node) and _selector_ok(selector)
    effective = scope or node
    expected = sorted(owner for owner, (n, attributes) in FIXTURE.items()
                      if owner not in valid and (not effective or n == effective)
                      and all(k in attributes and attributes[k] == v for k, v in selector.items()))
    event(f"OK, {len(released)} released")
    assert released == expected
    assert held(admin) == set(FIXTURE) - set(expected)


# -- the SDK and the admin CLI --------------------------------------------------------------------


def test_sdk_and_cli_pass_node_and_selector(server: ServerProcess, tokens: dict[str, str],
                                            callers: dict[str, Caller], tmp_path: Path) -> None:
    admin = callers["admin"]
    populate(admin)
    with IpamClient(server.target, token=tokens["controller"]) as ipam:
        gone = ipam.garbage_collect(POOL, ["b1/eth0"], grace=0, node=NODE_B, selector={"cni.network": "net1"})
        assert sorted(a.owner for a in gone) == ["b2/eth0"]
    with IpamClient(server.target, token=tokens["a"]) as shim:
        with pytest.raises(PermissionDenied):
            shim.garbage_collect(POOL, [], grace=0, node=NODE_B)
        assert [a.owner for a in shim.garbage_collect(POOL, [], grace=0, selector={"cni.network": "net2"})] == [
            "a2/eth0"]
    token_file = tmp_path / "token"
    token_file.write_text(tokens["controller"] + "\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")},
           "DSIPAM_TARGET": server.target, "DSIPAM_TOKEN_FILE": str(token_file)}
    cli = [str(Path(sys.executable).with_name("dsipam")), "gc", POOL, "--keep", "a1/eth0", "--grace", "0", "--node", NODE_A,
           "--selector", "cni.node=node-a", "-o", "json"]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert [a["owner"] for a in json.loads(out.stdout)["released"]] == []  # a1 kept, a2 already gone, a3 no attr
    out = subprocess.run(cli[:-4] + ["-o", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [a["owner"] for a in json.loads(out.stdout)["released"]] == ["a3/eth0"]
    assert held(admin) == {"a1/eth0", "b1/eth0", "none/x"}
