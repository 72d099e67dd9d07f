"""The compiled CNI plugin (clients/cni/go) against the Python plugin, input for input.

Both are installed as a runtime finds them and run on the same environment and stdin, drawn by
hypothesis from every input path the plugin has: CNI_COMMAND, CNI_CONTAINERID, CNI_IFNAME,
CNI_NETNS, CNI_ARGS, and a network configuration whose every field may be missing, of the wrong
type or out of range (or stdin that is not JSON at all). They must exit alike and print the same
CNI error: the same code, and the same message and details except where the words come from a
library (a JSON decoder's complaint, a connection error's text).

The endpoint is a unix socket nobody listens on, so a configuration that passes every check
ends in a failed connection (CNI error 11) on both, without a server. The end-to-end behaviour
against a real server (results, GC, STATUS, tokens) is test_cni_plugin.py's and test_cni_gc.py's,
which run against both plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

# Codes whose message is a library's words: the JSON decoder's (6), the connection's (11), and
# an internal error's (999, which must not happen at all: see below).
LIBRARY_WORDED = {6, 11}


@pytest.fixture(scope="module")
def plugins(compiled_plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in ("python", "compiled"):
        bin_dir = tmp_path_factory.mktemp(f"cni-diff-{kind}")
        command = [sys.executable, "-m", "dsipam.cni", "install", str(bin_dir)]
        if kind == "compiled":
            command += ["--compiled", str(compiled_plugin)]
        subprocess.run(command, check=True, capture_output=True)
        out[kind] = bin_dir / "dsipam"
    return out


@pytest.fixture(scope="module")
def dead_socket(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cni-diff-sock") / "nobody.sock")


def run(plugin: Path, env: dict[str, str], stdin: bytes) -> tuple[int, str, str]:
    proc = subprocess.run([str(plugin)], input=stdin, env=env, capture_output=True, timeout=60)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


# -- strategies -------------------------------------------------------------------------------

_chars = st.characters(blacklist_categories=("Cs",))
_env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 100_000), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(_chars, max_size=12))
_junk = st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.text(max_size=4), _scalar, max_size=2))


def _maybe(values: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """A field's value: mostly one of the good ones (so that a draw gets past the first check),
    sometimes anything at all."""
    return st.integers(0, 15).flatmap(lambda i: _junk if i == 0 else values)


_ips = st.sampled_from(["198.18.0.9", "198.18.0.9/24", "fd00::9", "fd00:0::9/120", "198.18.0.09", "fe80::1%eth0",
                        "::ffff:198.18.0.1", "198.18.0.1/33", "fd00::/129", "x", "", "1.2.3.4/024"])
_routes = st.lists(st.fixed_dictionaries({"dst": _maybe(_ips | st.just("0.0.0.0/0") | st.just("::/0"))},
                                         optional={"gw": _maybe(_ips), "mtu": _scalar, "table": _scalar}), max_size=3)


def _ipam(sock: str) -> st.SearchStrategy[dict]:
    good_endpoint = st.sampled_from([f"unix://{sock}", sock, f"unix:{sock}"])
    return st.fixed_dictionaries(
        {
            "endpoint": st.one_of(good_endpoint, good_endpoint, good_endpoint, _maybe(st.sampled_from(
                ["unix:relative", "127.0.0.1:0", "127.0.0.1:65536", "fd00::1:50051", "[fd00::1]:50051", "host",
                 ":50051", "127.0.0.1:1"]))),
            "pool": _maybe(st.sampled_from(["pods", "pods", ""])),
        },
        optional={
            "type": st.just("dsipam"),
            "ipFamilyPolicy": _maybe(st.sampled_from(["SingleStack", "PreferDualStack", "require_dual-stack",
                                                      "REQUIREDUALSTACK", "Dual", ""])),
            "ipFamilies": _maybe(st.lists(st.sampled_from(["IPv4", "IPv6", "ipv4", "4", "6", "IPv5"]), max_size=3)),
            "addresses": _maybe(st.lists(_ips, max_size=3)),
            "routes": _maybe(_routes),
            "defaultRoutes": _maybe(st.booleans()),
            "dns": _maybe(st.fixed_dictionaries({}, optional={
                "nameservers": _maybe(st.lists(_ips, max_size=2)), "domain": _maybe(st.just("example.test")),
                "search": _maybe(st.lists(st.just("a.test"), max_size=2)),
                "options": _maybe(st.lists(st.just("ndots:2"), max_size=2))})),
            "timeout": _maybe(st.sampled_from([0, 0.5, 1, 86400, 86401, -1, 2.5e-3])),
            "transport": _maybe(st.sampled_from(["native", "grpc", "quic"])),
            "tls": _maybe(st.fixed_dictionaries({}, optional={"ca": _maybe(st.just("/nonexistent/ca.crt")),
                                                              "cert": _maybe(st.just("/nonexistent/c.crt")),
                                                              "key": _maybe(st.just("/nonexistent/c.key")),
                                                              "serverName": _maybe(st.just("dsipam"))})),
            "token": _maybe(st.sampled_from(["s3cret", "with space", "tøken", ""])),
            "tokenFile": _maybe(st.sampled_from(["/nonexistent/token", "/proc/self/nonexistent", "/"])),
            "gcScope": _maybe(st.sampled_from(["node", "pool", "cluster"])),
            "gcGrace": _maybe(st.sampled_from([0, 1.5, 86400, 86401, -3])),
            "node": _maybe(st.sampled_from(["node-a", ""])),
        })


def _netconf(sock: str) -> st.SearchStrategy[object]:
    conf = st.fixed_dictionaries(
        {"ipam": _maybe(_ipam(sock)),
         "cniVersion": _maybe(st.sampled_from(["1.1.0", "1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0", "0.2.0", "2.0.0"]))},
        optional={
            "name": _maybe(st.sampled_from(["net", ""])),
            "runtimeConfig": _maybe(st.fixed_dictionaries({}, optional={"ips": _maybe(st.lists(_ips, max_size=2))})),
            "args": _maybe(st.fixed_dictionaries({}, optional={"cni": _maybe(st.fixed_dictionaries(
                {}, optional={"ips": _maybe(st.lists(_ips, max_size=2))}))})),
            "prevResult": _maybe(st.fixed_dictionaries({}, optional={"ips": _maybe(st.lists(_maybe(
                st.fixed_dictionaries({"address": _maybe(_ips)})), max_size=2))})),
            "cni.dev/valid-attachments": _maybe(st.lists(_maybe(st.fixed_dictionaries(
                {}, optional={"containerID": _maybe(st.sampled_from(["c1", "-c", "c/1"])),
                              "ifname": _maybe(st.sampled_from(["eth0", "a" * 16, "."]))})), max_size=2)),
            "cni.dev/attachments": _maybe(st.lists(st.fixed_dictionaries({"containerID": st.just("c2"),
                                                                          "ifname": st.just("eth0")}), max_size=1)),
        })
    return st.integers(0, 9).flatmap(lambda i: _junk if i == 0 else conf)


_stdin_raw = st.one_of(st.binary(max_size=30), st.sampled_from([b"", b"{", b"{} {}", b"[1,", b"\xff\xfe{}", b"NaN",
                                                                b'{"a": Infinity}', b"  {}  "]))


@st.composite
def invocations(draw: st.DrawFn, sock: str) -> tuple[dict[str, str], bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    fields = {
        "CNI_COMMAND": st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "", "add", "FROB"]),
        "CNI_CONTAINERID": st.one_of(st.sampled_from(["c1", "c1.a_b-c", "-c1", "c/1", "é1", "a" * 200]), _env_text),
        "CNI_IFNAME": st.one_of(st.sampled_from(["eth0", "eth 0", "a" * 15, "a" * 16, ".", "..", "e:1", "net1"]),
                                _env_text),
        "CNI_NETNS": st.sampled_from(["/var/run/netns/x", ""]),
        "CNI_ARGS": st.one_of(st.sampled_from(["", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n", "IP=198.18.0.5",
                                                "IP=198.18.0.5,fd00::5", "IP=bogus", "novalue", "=x", ";;",
                                                "IGNOREUNKNOWN=1;IP= 198.18.0.7 "]), _env_text),
        "K8S_NODE_NAME": st.sampled_from(["node-b", ""]),
    }
    good = {"CNI_COMMAND": st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]), "CNI_CONTAINERID": st.just("c1"),
            "CNI_IFNAME": st.just("eth0"), "CNI_NETNS": st.just("/var/run/netns/x")}
    for name, strategy in fields.items():
        if name in good and draw(st.integers(0, 9)) < 8:  # mostly a runtime's environment
            env[name] = draw(good[name])
        elif draw(st.booleans()) or name == "CNI_COMMAND":
            env[name] = draw(strategy)
    if draw(st.integers(0, 19)) == 0:
        stdin = draw(_stdin_raw)
    else:
        stdin = json.dumps(draw(_netconf(sock))).encode()
    return env, stdin


def _canonical(doc: dict) -> dict:
    """What must agree: everything, but the library-worded message of codes 6 and 11."""
    if doc.get("code") in LIBRARY_WORDED:
        return {"cniVersion": doc.get("cniVersion"), "code": doc["code"]}
    return doc


def check_alike(plugins: dict[str, Path], env: dict[str, str], stdin: bytes) -> str:
    """Runs both plugins; asserts that they answer alike; returns what the answer was."""
    py_rc, py_out, py_err = run(plugins["python"], env, stdin)
    go_rc, go_out, go_err = run(plugins["compiled"], env, stdin)
    assert "Traceback" not in py_err and "panic" not in go_err, (py_err, go_err)
    assert go_rc == py_rc, (env, stdin, py_out, go_out)
    if not py_out.strip():
        assert not go_out.strip(), (env, stdin, go_out)
        return "both succeeded, printing nothing"
    py_doc, go_doc = json.loads(py_out), json.loads(go_out)
    if py_rc == 0:
        assert go_doc == py_doc  # VERSION's answer
        return "VERSION"
    assert py_doc["code"] != 999 and go_doc["code"] != 999, (py_doc, go_doc)  # no internal error on either
    assert _canonical(go_doc) == _canonical(py_doc), (env, stdin)
    return f"CNI error {py_doc['code']}"


ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"}


@pytest.mark.parametrize(("env", "conf"), [
    ({"CNI_COMMAND": "VERSION"}, None),
    (ADD_ENV, {"ipam": {"endpoint": "/x.sock", "pool": "p"}}),  # no cniVersion
    (ADD_ENV, {"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p", "ipFamilies": ["IPv4", "IPv6"]}}),
    (ADD_ENV, {"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p", "timeout": 1e400}}),
    (ADD_ENV, {"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p", "addresses": ["fd00::1/0129"]}}),
    ({**ADD_ENV, "CNI_IFNAME": "é" * 15}, {"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p"}}),
    ({**ADD_ENV, "CNI_CONTAINERID": "c\u3000'\""}, {"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p"}}),
])
def test_known_cases_answer_alike(plugins: dict[str, Path], env: dict[str, str], conf: object) -> None:
    check_alike(plugins, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                b"" if conf is None else json.dumps(conf).encode())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_compiled_plugin_answers_as_the_python_plugin(plugins: dict[str, Path], dead_socket: str,
                                                         data: st.DataObject) -> None:
    env, stdin = data.draw(invocations(dead_socket))
    event(check_alike(plugins, env, stdin))


def test_the_compiled_plugin_reads_the_same_ipam_keys() -> None:
    """Every ipam key the Python plugin reads (as test_cni_docs.py finds them), the compiled one
    reads too, and no other: a key added to one plugin only fails here."""
    import inspect
    import re

    from dsipam.cni import _config

    source = inspect.getsource(_config)
    python = set(re.findall(r'"([A-Za-z]+)", "ipam\.\1"', source)) | set(re.findall(r'ipam\.get\("([A-Za-z]+)"', source))
    go_source = (Path(__file__).resolve().parents[2] / "clients" / "cni" / "go" / "config.go").read_text()
    compiled = set(re.findall(r'"([A-Za-z]+)", "ipam\.\1"', go_source)) | set(re.findall(r'ipam\["([A-Za-z]+)"\]',
                                                                                            go_source))
    assert python - {"type"} == compiled, (python, compiled)
