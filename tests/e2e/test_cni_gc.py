"""CNI GC and its list of live attachments, against a real server.

libcni sends ``"cni.dev/valid-attachments": null`` when the runtime's list is empty (a Go nil
slice), which is what a node with no live pod on the network passes: GC must then collect this
node's allocations of this network, and never anything of another node, network or pool. The
key missing altogether is refused (the spec makes it part of GC's input), releasing nothing.

The server has authentication on, as deployed: each node's plugin uses its own node-scoped
``shim`` token (docs/security.md, "Node-scoped shims"), the test's own calls an admin token, and
the unix socket gives no role. GC with the default ``gcScope: node`` is one GarbageCollect
filtered by node and network, which a shim may call (it used to list allocations, which needs
a controller token: PERMISSION_DENIED with a shim's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import ServerProcess, spawn_server
from test_cni_plugin import (  # noqa: F401 - fixtures
    Plugin,
    allocation,
    assert_cni_error,
    make_pool,
    netconf,
    plugin,
    plugin_dir,
    pool,
    transport,
)

from dsipam.cni import _plugin
from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

KEY = "cni.dev/valid-attachments"
ALIAS = "cni.dev/attachments"
ABSENT = object()
NODES = ("node-a", "node-b", "node-h")
SHIM_TOKENS = {node: security.new_token() for node in NODES}  # each node's own shim identity
ADMIN_TOKEN = security.new_token()


@pytest.fixture(scope="module")
def cni_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A server with one shim token per node and an admin token; the unix socket has no role."""
    tmp = tmp_path_factory.mktemp("cni-gc-server")
    sock = tmp / "dsipam.sock"
    entries = [{"name": "ops", "role": "admin", "hash": security.hash_token(ADMIN_TOKEN)}]
    entries += [{"name": f"shim-{node}", "role": "shim", "node": node, "hash": security.hash_token(token)}
                for node, token in SHIM_TOKENS.items()]
    config = tmp / "auth.json"
    config.write_text(json.dumps({"tokens": entries, "unix_socket_role": "none"}))
    server = spawn_server(db_url, tmp, args=("--listen", f"unix://{sock}"),
                          extra_env={"DSIPAM_AUTH_CONFIG": str(config), "DSIPAM_INSECURE": ""})
    yield server, sock
    server.terminate()


class AdminStub:
    """The generated stub with the admin token on every call (the test's own calls)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = ipam_pb2_grpc.IpamServiceStub(channel)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=10)


@pytest.fixture(scope="module")
def ipam(cni_server: tuple[ServerProcess, Path]) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    with grpc.insecure_channel(cni_server[0].target) as channel:
        yield AdminStub(channel)  # type: ignore[misc]


def gc(plugin: Plugin, conf: dict) -> tuple[int, object]:  # noqa: F811
    rc, out, err = plugin("GC", conf, container=None, ifname="", netns=None)
    assert "Traceback" not in err, err
    return rc, out


def gc_conf(sock: Path, pool: str, valid: object = ABSENT, alias: object = ABSENT,  # noqa: F811
            name: str = "cni-test", **ipam: object) -> dict:  # noqa: F811
    """GC's network configuration; the token is the shim token of the configured node unless given."""
    ipam.setdefault("token", SHIM_TOKENS.get(str(ipam.get("node", "")), ""))
    conf = netconf(sock, pool, version="1.1.0", **ipam)
    conf["name"] = name
    if valid is not ABSENT:
        conf[KEY] = valid
    if alias is not ABSENT:
        conf[ALIAS] = alias
    return conf


def attachments(*containers: str) -> list[dict]:
    return [{"containerID": c, "ifname": "eth0"} for c in containers]


def add(plugin: Plugin, sock: Path, pool: str, container: str, node: str = "node-a",  # noqa: F811
        name: str = "cni-test") -> None:
    conf = {**netconf(sock, pool, version="1.1.0", node=node, token=SHIM_TOKENS[node]), "name": name}
    rc, out, _ = plugin("ADD", conf, container=container)
    assert rc == 0, out


def held(stub: ipam_pb2_grpc.IpamServiceStub, pool: str, *owners: str) -> dict[str, bool]:  # noqa: F811
    return {owner: allocation(stub, pool, owner) is not None for owner in owners}


# -- null, [] and a missing key -------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, []], ids=["null", "empty-list"])
def test_no_live_attachment_collects_this_node_and_network_only(
        plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
        pool: str, transport: str, empty: object) -> None:  # noqa: F811
    sock = cni_server[1]
    other_pool = make_pool(ipam, v4="198.18.163.0/24", v6="fd00:a3::/120", v4_gateway="198.18.163.1",
                           v6_gateway="fd00:a3::1")
    try:
        add(plugin, sock, pool, "p1")
        add(plugin, sock, pool, "p2")
        add(plugin, sock, pool, "elsewhere", node="node-b")          # same network, another node
        add(plugin, sock, pool, "othernet", name="other-net")        # this node, another network
        add(plugin, sock, other_pool, "otherpool")                   # this node and network, another pool
        ipam.Allocate(pb.AllocateRequest(pool=pool, owner="not-cni"))  # not the plugin's at all
        ipam.Allocate(pb.AllocateRequest(pool=pool, owner="sdk-on-a", node="node-a"))  # node-a's, not the plugin's

        # GC as node-a, with node-a's shim token (gc_conf): the default gcScope is node
        conf = gc_conf(sock, pool, empty, node="node-a", gcGrace=0, transport=transport)
        assert "gcScope" not in conf["ipam"] and conf["ipam"]["token"] == SHIM_TOKENS["node-a"]
        assert gc(plugin, conf) == (0, None)
        assert held(ipam, pool, "p1/eth0", "p2/eth0", "elsewhere/eth0", "othernet/eth0", "not-cni", "sdk-on-a") == {
            "p1/eth0": False, "p2/eth0": False, "elsewhere/eth0": True, "othernet/eth0": True, "not-cni": True,
            "sdk-on-a": True}
        assert held(ipam, other_pool, "otherpool/eth0") == {"otherpool/eth0": True}

        # node-b's own GC (its token) collects its pod of this network, and nothing of node-a's
        assert gc(plugin, gc_conf(sock, pool, empty, node="node-b", gcGrace=0, transport=transport)) == (0, None)
        assert held(ipam, pool, "elsewhere/eth0", "othernet/eth0") == {"elsewhere/eth0": False,
                                                                       "othernet/eth0": True}

        # the grace still protects an ADD in flight (allocated, not yet in the runtime's list)
        add(plugin, sock, pool, "young")
        assert gc(plugin, gc_conf(sock, pool, empty, node="node-a", transport=transport)) == (0, None)
        assert held(ipam, pool, "young/eth0") == {"young/eth0": True}
    finally:
        ipam.DeletePool(pb.DeletePoolRequest(name=other_pool, force=True))


def test_missing_key_is_error_7_and_releases_nothing(plugin: Plugin, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                                     ipam: ipam_pb2_grpc.IpamServiceStub, pool: str) -> None:  # noqa: F811
    sock = cni_server[1]
    add(plugin, sock, pool, "p1")
    for scope in ("node", "pool"):
        err = assert_cni_error(*gc(plugin, gc_conf(sock, pool, node="node-a", gcGrace=0, gcScope=scope)), 7)
        assert KEY in err["msg"] and "required" in err["msg"], err
        assert "nothing was released" in err.get("details", ""), err
    assert held(ipam, pool, "p1/eth0") == {"p1/eth0": True}


def test_the_alias_key_counts_and_both_keys_are_merged(plugin: Plugin, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                                        ipam: ipam_pb2_grpc.IpamServiceStub, pool: str) -> None:  # noqa: F811
    sock = cni_server[1]
    for container in ("a", "b", "c"):
        add(plugin, sock, pool, container)
    # only the alias: it is the list
    assert gc(plugin, gc_conf(sock, pool, alias=attachments("a", "b"), node="node-a", gcGrace=0)) == (0, None)
    assert held(ipam, pool, "a/eth0", "b/eth0", "c/eth0") == {"a/eth0": True, "b/eth0": True, "c/eth0": False}
    # both: an attachment valid in either is kept (null in one does not empty the other)
    assert gc(plugin, gc_conf(sock, pool, None, attachments("a", "b"), node="node-a", gcGrace=0)) == (0, None)
    assert held(ipam, pool, "a/eth0", "b/eth0") == {"a/eth0": True, "b/eth0": True}
    assert gc(plugin, gc_conf(sock, pool, attachments("b"), attachments("a"), node="node-a", gcGrace=0)) == (0, None)
    assert held(ipam, pool, "a/eth0", "b/eth0") == {"a/eth0": True, "b/eth0": True}
    # both empty: nothing is live
    assert gc(plugin, gc_conf(sock, pool, [], None, node="node-a", gcGrace=0)) == (0, None)
    assert held(ipam, pool, "a/eth0", "b/eth0") == {"a/eth0": False, "b/eth0": False}


@pytest.mark.parametrize("identity", ["admin", "shim"])
def test_pool_scope_with_no_live_attachment_empties_only_that_pool(
        plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
        pool: str, transport: str, identity: str) -> None:  # noqa: F811
    """gcScope pool is GarbageCollect over the whole pool (docs/cni.md): null releases all of it
    with a cluster-wide token; a shim token's GarbageCollect is confined to its node by the server."""
    sock = cni_server[1]
    other_pool = make_pool(ipam, v4="198.18.163.0/24", v6="fd00:a3::/120", v4_gateway="198.18.163.1",
                           v6_gateway="fd00:a3::1")
    try:
        add(plugin, sock, pool, "p1")
        add(plugin, sock, pool, "othernet", name="other-net")
        add(plugin, sock, pool, "elsewhere", node="node-b")
        add(plugin, sock, other_pool, "otherpool")
        token = ADMIN_TOKEN if identity == "admin" else SHIM_TOKENS["node-a"]
        conf = gc_conf(sock, pool, None, node="node-a", gcGrace=0, gcScope="pool", transport=transport, token=token)
        assert gc(plugin, conf) == (0, None)
        assert held(ipam, pool, "p1/eth0", "othernet/eth0", "elsewhere/eth0") == {
            "p1/eth0": False, "othernet/eth0": False, "elsewhere/eth0": identity == "shim"}
        assert held(ipam, other_pool, "otherpool/eth0") == {"otherpool/eth0": True}
    finally:
        ipam.DeletePool(pb.DeletePoolRequest(name=other_pool, force=True))


@pytest.mark.parametrize(("value", "field"), [
    (5, KEY),
    ("eth0", KEY),
    ({"containerID": "a", "ifname": "eth0"}, KEY),
    (True, KEY),
    ([1], f"{KEY}[0]"),
    ([None], f"{KEY}[0]"),
    ([{"ifname": "eth0"}], f"{KEY}[0].containerID"),
    ([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": 7}], f"{KEY}[1].ifname"),
    ([{"containerID": "", "ifname": "eth0"}], f"{KEY}[0].containerID"),
])
def test_a_malformed_list_is_error_7_naming_the_entry(plugin: Plugin, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                                      ipam: ipam_pb2_grpc.IpamServiceStub, pool: str,  # noqa: F811
                                                      value: object, field: str) -> None:
    sock = cni_server[1]
    add(plugin, sock, pool, "p1")
    err = assert_cni_error(*gc(plugin, gc_conf(sock, pool, value, node="node-a", gcGrace=0)), 7)
    assert err["msg"].startswith(field + ":"), err
    assert held(ipam, pool, "p1/eth0") == {"p1/eth0": True}


def test_a_node_that_is_not_the_tokens_is_refused_and_releases_nothing(
        plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
        pool: str, transport: str) -> None:  # noqa: F811
    """A plugin configured with node-b's name but node-a's token: GarbageCollect names node-b, which
    a shim of node-a may not collect (PERMISSION_DENIED, CNI error 106)."""
    sock = cni_server[1]
    add(plugin, sock, pool, "p1", node="node-b")
    add(plugin, sock, pool, "p2", node="node-a")
    conf = gc_conf(sock, pool, [], node="node-b", gcGrace=0, transport=transport, token=SHIM_TOKENS["node-a"])
    err = assert_cni_error(*gc(plugin, conf), 106)
    assert "PERMISSION_DENIED" in err.get("details", "") and "node-b" in err["msg"], err
    assert held(ipam, pool, "p1/eth0", "p2/eth0") == {"p1/eth0": True, "p2/eth0": True}


def test_an_unnamed_network_collects_only_its_own(
        plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
        pool: str) -> None:  # noqa: F811
    """A network configuration without ``name`` records cni.network "" and its GC selects that."""
    sock = cni_server[1]
    add(plugin, sock, pool, "unnamed", name="")
    add(plugin, sock, pool, "named")
    assert allocation(ipam, pool, "unnamed/eth0").attributes["cni.network"] == ""
    assert gc(plugin, gc_conf(sock, pool, [], name="", node="node-a", gcGrace=0)) == (0, None)
    assert held(ipam, pool, "unnamed/eth0", "named/eth0") == {"unnamed/eth0": False, "named/eth0": True}


# -- arbitrary JSON as the list -------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)
_ident = st.text(max_size=12) | st.sampled_from(["p1", "p2", "c1", "x"])
_attachment = st.fixed_dictionaries(
    {}, optional={"containerID": _ident | _json, "ifname": st.sampled_from(["eth0", "net1"]) | _json,
                  "extra": _json})
_good_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True) | st.sampled_from(["p1", "p2", "c1"])
_good = st.none() | st.lists(
    st.fixed_dictionaries({"containerID": _good_id, "ifname": st.sampled_from(["eth0", "net1", "a" * 15])},
                          optional={"extra": _json}), max_size=8)
_value = st.one_of(_good, _good, st.just(ABSENT), _json, st.lists(_attachment, max_size=8))


def _spec_container_id(v: object) -> bool:
    """The spec's rule, written out independently of the plugin's code."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return isinstance(v, str) and v != "" and v[0] in allowed and set(v) <= allowed | set("_.-")


def _spec_ifname(v: object) -> bool:
    return (isinstance(v, str) and 0 < len(v) <= 15 and v not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in v))


def expected_ok(value: object, alias: object) -> bool:
    """The oracle: GC succeeds iff some key is there and every key there is null or a list of
    objects whose containerID and ifname follow the spec's rules for CNI_CONTAINERID and CNI_IFNAME."""
    present = [v for v in (value, alias) if v is not ABSENT]
    if not present:
        return False

    def good(v: object) -> bool:
        return v is None or (isinstance(v, list) and all(
            isinstance(a, dict) and _spec_container_id(a.get("containerID")) and _spec_ifname(a.get("ifname"))
            for a in v))

    return all(good(v) for v in present)


@pytest.fixture(scope="module")
def pools(cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
          plugin: Plugin) -> Iterator[tuple[str, list[str], str]]:  # noqa: F811
    """A pool where node-b holds allocations (GC runs as node-h), and an empty pool for gcScope pool."""
    shared = make_pool(ipam, v4="198.18.160.0/24", v6="fd00:a0::/120", v4_gateway="198.18.160.1",
                       v6_gateway="fd00:a0::1")
    owners = []
    for c in ("p1", "p2", "c1"):
        add(plugin, cni_server[1], shared, c, node="node-b")
        owners.append(f"{c}/eth0")
    empty = make_pool(ipam, v4="198.18.161.0/24", v6="fd00:a1::/120", v4_gateway="198.18.161.1",
                      v6_gateway="fd00:a1::1")
    yield shared, owners, empty
    for name in (shared, empty):
        ipam.DeletePool(pb.DeletePoolRequest(name=name, force=True))


@settings(max_examples=150, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=_value, alias=st.one_of(st.just(ABSENT), st.just(ABSENT), _value), scope=st.sampled_from(["node", "pool"]))
def test_any_json_as_the_list_is_a_clean_result(cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                                 ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
                                                 pools: tuple[str, list[str], str],
                                                 value: object, alias: object, scope: str) -> None:
    """In process (the plugin's own ``run``) against the real server: exit 0 and no output, or a
    CNI error with code 7 naming the key; never 999 (a bug), and bounded time. node-b's
    allocations survive every node-scoped GC of node-h."""
    shared, owners, empty = pools
    conf = gc_conf(cni_server[1], shared if scope == "node" else empty, value, alias, node="node-h", gcGrace=0,
                   gcScope=scope)
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/nonexistent"}
    started = time.monotonic()
    rc, out = _plugin.run(env, json.dumps(conf).encode())
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    doc = json.loads(out) if out else None
    event(f"{scope}: exit {rc}")
    if rc:
        assert isinstance(doc, dict) and set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
        assert doc["code"] == 7 and isinstance(doc["msg"], str), doc
    if not expected_ok(value, alias):
        assert rc == 1 and doc["msg"].startswith((KEY, ALIAS)), doc
    elif scope == "node":
        assert (rc, out) == (0, ""), out
    else:  # the server checks each owner GarbageCollect is given (length, characters)
        assert (rc, out) == (0, "") or doc["msg"].startswith("valid_owners["), doc
    assert all(held(ipam, shared, *owners).values())


@settings(max_examples=25, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=_value)
def test_the_plugin_binary_never_prints_a_traceback(plugin: Plugin, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                                     pools: tuple[str, list[str], str], value: object) -> None:
    """The same through the installed plugin: one CNI document (or nothing) on stdout, nothing on stderr."""
    conf = gc_conf(cni_server[1], pools[0], value, node="node-h", gcGrace=0)
    rc, out, err = plugin("GC", conf, container=None, ifname="", netns=None)
    assert err == ""
    if expected_ok(value, ABSENT):
        assert (rc, out) == (0, None), out
    else:
        assert_cni_error(rc, out, 7)


def test_a_long_list_costs_little(plugin: Plugin, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                  ipam: ipam_pb2_grpc.IpamServiceStub, pool: str) -> None:  # noqa: F811
    """5,000 live attachments with real (64 hex digit) container IDs, far more than a node runs:
    one pass over the list, one GarbageCollect of about 360 KB (under the server's 512 KiB)."""
    sock = cni_server[1]
    add(plugin, sock, pool, "p1")
    add(plugin, sock, pool, "gone")
    live = attachments(*(f"{i:064x}" for i in range(5_000)), "p1")
    started = time.monotonic()
    assert gc(plugin, gc_conf(sock, pool, live, node="node-a", gcGrace=0)) == (0, None)
    elapsed = time.monotonic() - started
    assert held(ipam, pool, "p1/eth0", "gone/eth0") == {"p1/eth0": True, "gone/eth0": False}
    assert elapsed < 5, elapsed
    print(f"GC with 5,000 live attachments: {elapsed * 1000:.0f} ms")


def test_a_list_over_the_message_limit_is_an_error_and_releases_nothing(
        plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,  # noqa: F811
        pool: str) -> None:  # noqa: F811
    """10,000 owners of 71 bytes do not fit in one request of 512 KiB: the server refuses the
    whole call (RESOURCE_EXHAUSTED), the runtime gets a CNI error, and nothing is released (GC
    cannot be split: an owner missing from one part's list would be collected)."""
    sock = cni_server[1]
    add(plugin, sock, pool, "gone")
    live = attachments(*(f"{i:064x}" for i in range(10_000)))
    rc, out = gc(plugin, gc_conf(sock, pool, live, node="node-a", gcGrace=0))
    assert rc == 1 and isinstance(out, dict) and "RESOURCE_EXHAUSTED" in out.get("details", ""), out
    assert held(ipam, pool, "gone/eth0") == {"gone/eth0": True}
