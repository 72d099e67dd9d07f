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
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

# Codes whose message is a library's words: the JSON decoder's (6), the connection's (11), and
# an internal error's (999, which must not happen at all: see below).
LIBRARY_WORDED = {6, 11}


@pytest.fixture(scope="module")
def plugins(both_plugins: dict[str, Path]) -> dict[str, Path]:
    return both_plugins


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
    """What must agree: everything, but the library-worded message of codes 6 and 11 (and of
    STATUS's 50 that stands for an 11: the connection's error)."""
    if doc.get("code") in LIBRARY_WORDED or "(would be CNI error 11)" in str(doc.get("details", "")):
        return {"cniVersion": doc.get("cniVersion"), "code": doc["code"]}
    return doc


# -- one fault at a time ------------------------------------------------------------------------
# A runtime's valid invocation with exactly one thing changed, anywhere: so that every check is
# reached, the deep ones (CHECK's prevResult, GC's attachments, CNI_ARGS, route extras) included.

_SPECIAL_VALUES = (86400, 86401, 0, -0.0, 0.5, 1e-7, 1e22, 1e16, 123456789012345678, -1, 2.5e-9, 1e-400,
                     "\t", "a'b", 'a"b', "a'b\"c", "\ufffd", "\x7f", "\u0130Pv4", "S\u0130ngleStack",
                     "\u212aIPv4", "0fd00::/64", "fd00::00000000001", "::198.18.0.1", "198.18.0.1/00032",
                     "fd00::1/0129", "\u0665", "c1\u00e9", "-c1", "c1 ", "a" * 16, "e:1", "..", ".",
                     ["198.18.0.5", "198.18.0.5"], [{"a": 1}], [["x"]], [1000.0], {"b": 1, "a": [True, None]},
                     True, False, None, [], {}, "")
_specials = st.one_of(st.sampled_from(_SPECIAL_VALUES), _junk)
_env_specials = st.sampled_from([v for v in _SPECIAL_VALUES if isinstance(v, str)] + [
    "IP=198.18.0.5,198.18.0.5", "IP=bogus", "K8S_POD_NAME", "=v", "IP=fd00::1;IP=198.18.0.9"])

# Values near each variable's rules.
_ENV_SPECIALS = {
    "CNI_CONTAINERID": ["-c1", "_c1", ".c1", "c1-", "c_1.2-3", "c 1", "c1\t", "c/1", "é", "c1é", "a" * 300, "0"],
    "CNI_IFNAME": ["a" * 15, "a" * 16, "é" * 15, "é" * 16, ".", "..", "...", "e:1", "e/1", "e 1", "e\u00a0",
                   "e\u2028", "e\x1c", "-"],
    "CNI_ARGS": ["IP=198.18.0.5,198.18.0.5", "IP=bogus", "IP=", "IP= , ", "K8S_POD_NAME", "=v", ";;",
                 "IP=fd00::1;IP=198.18.0.9", "IP=198.18.0.9/24", "IP=198.18.0.9/33", "K8S_POD_UID=u;IgnoreUnknown=1"],
    "CNI_COMMAND": ["ADD", "VERSION", "add", "FROBNICATE", ""],
}

# Values near each field's rules, by the field's name (the last key of its path; list items by
# their list's name).
_ADDRESSES = ["198.18.0.9", "198.18.0.9/24", "198.18.0.09", "198.18.0.9/33", "198.18.0.9/024", "1.2.3", "fd00::9",
              "fd00::9/120", "fd00::9/129", "fd00::9/0129", "0fd00::9", "fd00::00009", "fd00:0::9", "fe80::1%eth0",
              "::ffff:198.18.0.1", "::198.18.0.1", "198.18.0.0/\u0661\u0665", "198.18.0.0/\u00b2", "x", ""]
_SECONDS = [86400, 86401, 86400.5, 0, -0.0, 0.5, 1e-7, 2.5e-9, 1e-400, 1e22, -1, True, "1", None]
_PATH_SPECIALS: dict[str, list[object]] = {
    "timeout": _SECONDS, "gcGrace": _SECONDS,
    "ipFamilyPolicy": ["SingleStack", "single_stack", "PREFER-DUAL-STACK", "S\u0130ngleStack", "\u212aingleStack",
                       "\t", "a'b", 'a"b', "a'\"b", "\x7f", "\ufffd", "\u00ad", "\u3000", "\U0001f600", ""],
    "ipFamilies": [["IPv4"], ["IPv6", "IPv4"], ["ipv4", "4"], ["\u0130Pv4"], ["IPv5"], [], ["IPv4", "IPv6", "IPv4"]],
    "addresses": _ADDRESSES, "ips": _ADDRESSES, "address": _ADDRESSES, "dst": _ADDRESSES, "gw": _ADDRESSES,
    "nameservers": _ADDRESSES,
    "endpoint": ["unix:relative", "unix:", "unix://", "/", "h:0", "h:65536", "h:65535", "h:\u0665", "h:\u00b2",
                 "fd00::1:1", "[fd00::1]:1", ":1", "h", "h:"],
    "transport": ["native", "grpc", "GRPC", ""], "gcScope": ["node", "pool", "Node", ""],
    "token": ["t", "with space", "t\u00f8", "\x7f", "~" * 100], "tokenFile": ["/", "/nonexistent", "\x00", ""],
    "cniVersion": ["0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0", "1.0", ""],
    "containerID": ["-c1", "_c", "c.1", "c 1", "é", "a" * 300], "ifname": ["a" * 15, "a" * 16, ".", "..", "e:1", "e 1"],
    "mtu": [1400, 1e3, -0.0, 1e22, 0.1, None], "scope": [0, 1.5, {"b": 1}, ["x"]],
    "domain": ["a.test", "", 5], "search": [["a.test"], [5], "a.test"],
}

_FAULT_PATHS = [
    ("env", "CNI_CONTAINERID"), ("env", "CNI_IFNAME"), ("env", "CNI_ARGS"), ("env", "CNI_NETNS"),
    ("env", "K8S_NODE_NAME"), ("env", "CNI_COMMAND"),
    ("conf", "cniVersion"), ("conf", "name"), ("conf", "ipam"),
    *[("conf", "ipam", key) for key in ("endpoint", "pool", "ipFamilyPolicy", "ipFamilies", "addresses", "routes",
                                        "defaultRoutes", "dns", "timeout", "transport", "tls", "token", "tokenFile",
                                        "gcScope", "gcGrace", "node")],
    ("conf", "ipam", "ipFamilies", 0), ("conf", "ipam", "addresses", 0),
    ("conf", "ipam", "routes", 0), ("conf", "ipam", "routes", 0, "dst"), ("conf", "ipam", "routes", 0, "gw"),
    ("conf", "ipam", "routes", 0, "mtu"), ("conf", "ipam", "routes", 0, "scope"),
    ("conf", "ipam", "dns", "nameservers"), ("conf", "ipam", "dns", "nameservers", 0), ("conf", "ipam", "dns", "domain"),
    ("conf", "ipam", "dns", "search"), ("conf", "ipam", "tls", "ca"), ("conf", "ipam", "tls", "cert"),
]


# What only one command reads: half the faults go there when that command runs.
_COMMAND_PATHS = {
    "ADD": [("env", "CNI_ARGS"), ("conf", "runtimeConfig", "ips"), ("conf", "runtimeConfig", "ips", 0),
            ("conf", "args", "cni", "ips"), ("conf", "args", "cni", "ips", 0), ("conf", "ipam", "addresses", 0)],
    "CHECK": [("conf", "prevResult"), ("conf", "prevResult", "ips"), ("conf", "prevResult", "ips", 0),
              ("conf", "prevResult", "ips", 0, "address"), ("conf", "prevResult", "ips", 1, "address")],
    "GC": [("conf", "cni.dev/valid-attachments"), ("conf", "cni.dev/valid-attachments", 0),
           ("conf", "cni.dev/valid-attachments", 0, "containerID"), ("conf", "cni.dev/valid-attachments", 0, "ifname"),
           ("conf", "cni.dev/attachments"), ("conf", "cni.dev/attachments", 0, "ifname"), ("conf", "ipam", "gcScope"),
           ("conf", "ipam", "gcGrace")],
    "STATUS": [("conf", "ipam", "ipFamilyPolicy"), ("conf", "ipam", "ipFamilies")],
    "DEL": [("env", "CNI_CONTAINERID"), ("env", "CNI_IFNAME")],
}


def _base(sock: str, command: str) -> tuple[dict[str, str], dict]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": "c1",
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x", "CNI_ARGS": "K8S_POD_NAME=p;IP=198.18.0.7"}
    conf = {"cniVersion": "1.1.0", "name": "net",
            "ipam": {"type": "dsipam", "endpoint": f"unix://{sock}", "pool": "pods",
                     "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                     "addresses": ["fd00::7"], "routes": [{"dst": "198.19.0.0/16", "gw": "198.18.0.1", "mtu": 1400}],
                     "dns": {"nameservers": ["198.18.0.53"], "domain": "a.test"}, "defaultRoutes": True,
                     "timeout": 2, "gcGrace": 1.5},
            "prevResult": {"ips": [{"address": "198.18.0.7/24"}, {"address": "fd00::7/120"}]},
            "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]}
    return env, conf


def _set(target: object, path: tuple, value: object) -> None:
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(key, int):
            assert isinstance(target, list)
            while len(target) <= key:
                target.append({} if not isinstance(nxt, int) else [])
            if not isinstance(target[key], (dict, list)):
                target[key] = {} if not isinstance(nxt, int) else []
            target = target[key]
        else:
            assert isinstance(target, dict)
            if not isinstance(target.get(key), (dict, list)) or isinstance(nxt, int) != isinstance(target[key], list):
                target[key] = [] if isinstance(nxt, int) else {}
            target = target[key]
    last = path[-1]
    if isinstance(last, int):
        assert isinstance(target, list)
        while len(target) <= last:
            target.append(None)
    target[last] = value  # type: ignore[index]


@st.composite
def one_fault(draw: st.DrawFn, sock: str) -> tuple[dict[str, str], bytes]:
    command = draw(st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]))
    env, conf = _base(sock, command)
    where, *path = draw(st.sampled_from(_COMMAND_PATHS[command]) if draw(st.booleans())
                        else st.sampled_from(_FAULT_PATHS))
    if where == "env":
        value = draw(st.one_of(_env_text, _env_specials, st.sampled_from(_ENV_SPECIALS.get(path[0], [""]))))
        env[path[0]] = value  # type: ignore[assignment]
    else:
        name = next((key for key in reversed(path) if isinstance(key, str)), "")
        near = _PATH_SPECIALS.get(name)
        _set(conf, tuple(path), draw(st.sampled_from(near) | _specials if near else _specials))
    return env, json.dumps(conf).encode()


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


@pytest.mark.parametrize("size", [4 << 20, (4 << 20) + 1])
def test_a_configuration_over_4_mib_is_refused_by_both(plugins: dict[str, Path], size: int) -> None:
    """Both plugins read at most 4 MiB of stdin (docs/cni.md): exactly 4 MiB is decoded (and fails
    later, on a missing field), a byte more is error 6 before any decoding."""
    stdin = b'{"pad": "' + b"x" * (size - 11) + b'"}'
    assert len(stdin) == size
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    answers = [json.loads(run(plugins[kind], env, stdin)[1]) for kind in ("python", "compiled")]
    want = 6 if len(stdin) > 4 << 20 else 7
    assert [a["code"] for a in answers] == [want, want], answers
    if want == 6:
        assert all("larger than 4 MiB" in a["msg"] for a in answers), answers


@pytest.mark.parametrize("name", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS",
                                  "K8S_NODE_NAME"])
def test_an_environment_value_that_is_not_utf8_is_error_4(plugins: dict[str, Path], name: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV, name: "c\udcff"}  # the byte 0xff
    conf = json.dumps({"cniVersion": "1.0.0", "ipam": {"endpoint": "/x.sock", "pool": "p"}}).encode()
    for kind in ("python", "compiled"):
        rc, out, _ = run(plugins[kind], env, conf)
        assert rc == 1 and json.loads(out)["msg"] == f"{name}: not valid UTF-8", (kind, out)
    assert check_alike(plugins, env, conf) == "CNI error 4"


@pytest.mark.parametrize(("stdin", "code"), [
    (b'{"cniVersion": "1.0.0"} {}', 6),  # a second document
    (b'{"cniVersion": "1.0.0", "name": "\xff"}', 6),  # not UTF-8
    (b'{"cniVersion": "1.0.0", "n": ' + b"1" * 4301 + b"}", 6),  # Python's int limit
    (b'{"cniVersion": "1.0.0", "n": ' + b"1" * 4300 + b"}", 7),
    (b'{"cniVersion": "1.0.0", "n": [1e400]}', 6),
    (b'{"cniVersion": "1.0.0", "n": -1e400}', 6),
    (b'{"cniVersion": "1.0.0", "n": ' + b"[" * 511 + b"]" * 511 + b"}", 7),  # 512 levels, the object's included
    (b'{"cniVersion": "1.0.0", "n": ' + b"[" * 512 + b"]" * 512 + b"}", 6),  # nested deeper than 512
    (b'{"cniVersion": "1.0.0", "n": "' + b"\\" * 2 + b'ud800"}', 7),  # an escaped backslash, then text
    (rb'{"cniVersion": "1.0.0", "n": "\ud800"}', 6),  # a lone surrogate
    (rb'{"cniVersion": "1.0.0", "n": "\udc00\ud800"}', 6),
    (rb'{"cniVersion": "1.0.0", "n": "\ud83d\ude00"}', 7),  # a pair: one character
])
def test_what_the_decoders_refuse(plugins: dict[str, Path], stdin: bytes, code: int) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    assert check_alike(plugins, env, stdin) == f"CNI error {code}"


@pytest.mark.parametrize(("ipam", "code"), [
    ({"addresses": ["198.18.0.1/" + "0" * 5000 + "24"]}, 11),
    ({"addresses": ["198.18.0.1/" + "0" * 5000 + "33"]}, 7),
    ({"endpoint": "h:" + "0" * 5000 + "1"}, 11),  # port 1: leading zeros are no harm
    ({"endpoint": "[]:50051"}, 7),
    ({"endpoint": "a..b:50051"}, 11),
    ({"endpoint": "a" * 64 + ".test:50051"}, 11),
    ({"timeout": int("9" * 309)}, 7),
    ({"timeout": -int("9" * 309)}, 7),
    ({"gcGrace": int("9" * 400)}, 7),
])
def test_numbers_and_names_at_their_limits(plugins: dict[str, Path], ipam: dict, code: int) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    section = {"endpoint": "/x.sock", "pool": "p", **ipam}
    assert check_alike(plugins, env, json.dumps({"cniVersion": "1.1.0", "ipam": section}).encode()) \
        == f"CNI error {code}"


@pytest.mark.parametrize(("size", "code"), [(1 << 20, 11), ((1 << 20) + 1, 7)])
def test_a_token_file_over_1_mib_is_refused_by_both(plugins: dict[str, Path], tmp_path: Path, size: int,
                                                    code: int) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"t" * size)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    conf = {"cniVersion": "1.1.0", "ipam": {"endpoint": str(tmp_path / "x.sock"), "pool": "p", "tokenFile": str(token)}}
    assert check_alike(plugins, env, json.dumps(conf).encode()) == f"CNI error {code}"


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


# Each example runs two processes (~20 ms); data_too_large: some configurations are big on purpose.
DIFFERENTIAL = settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


@DIFFERENTIAL
@given(data=st.data())
def test_the_compiled_plugin_answers_as_the_python_plugin(plugins: dict[str, Path], dead_socket: str,
                                                         data: st.DataObject) -> None:
    env, stdin = data.draw(invocations(dead_socket))
    event(check_alike(plugins, env, stdin))


@DIFFERENTIAL
@given(data=st.data())
def test_one_fault_anywhere_gets_the_same_answer(plugins: dict[str, Path], dead_socket: str,
                                                 data: st.DataObject) -> None:
    env, stdin = data.draw(one_fault(dead_socket))
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
    compiled = (set(re.findall(r'"([A-Za-z]+)", "ipam\.\1"', go_source)) | set(re.findall(r'ipam\["([A-Za-z]+)"\]', go_source))
                | set(re.findall(r'getChoice\(ipam, "([A-Za-z]+)"', go_source)))
    assert python - {"type"} == compiled, (python, compiled)


_GENERIC: list[object] = [None, True, 5, -0.0, 0.5, "", "x", [], {}, [None], {"a": 1}]


def _every_fault() -> list[tuple[str, tuple, object]]:
    """(command, path, value): every value near a field's rules, and every generic one, at every path."""
    out = []
    commands = ["ADD", "DEL", "CHECK", "GC", "STATUS"]
    paths = [(c, p) for c, ps in _COMMAND_PATHS.items() for p in ps]
    paths += [(commands[i % len(commands)], p) for i, p in enumerate(_FAULT_PATHS)]
    for command, (where, *path) in paths:
        if where == "env":
            values: list[object] = [*_ENV_SPECIALS.get(path[0], []), "", "x", "-", "\u00e9", "a" * 300]
        else:
            name = next((key for key in reversed(path) if isinstance(key, str)), "")
            values = [*_PATH_SPECIALS.get(name, []), *_GENERIC]
        out += [(command, (where, *path), value) for value in values]
    return out


def test_every_value_near_a_rule_at_every_field_gets_the_same_answer(plugins: dict[str, Path],
                                                                    dead_socket: str) -> None:
    """Deterministic and exhaustive where hypothesis samples: each boundary value of each field
    (a timeout of 86401, an IPv6 group with five digits, a dotted capital I) at each field, with
    the command that reads it, once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: tuple[str, tuple, object]) -> str:
        command, (where, *path), value = case
        env, conf = _base(dead_socket, command)
        if where == "env":
            env[path[0]] = value  # type: ignore[assignment]
        else:
            _set(conf, tuple(path), value)
        try:
            check_alike(plugins, env, json.dumps(conf).encode())
        except AssertionError as exc:
            return f"{command} {'.'.join(map(str, path))} = {value!r}: {str(exc)[:300]}"
        return ""

    cases = _every_fault()
    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(one, cases) if f]
    assert len(cases) > 500 and not failures, f"{len(failures)} of {len(cases)} differ:\n" + "\n".join(failures[:8])


@pytest.mark.parametrize("field", ["ca", "cert"])
def test_tls_files_that_are_not_pem_are_error_7_in_both(plugins: dict[str, Path], tmp_path: Path, field: str) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    tls = {"ca": str(not_pem)} if field == "ca" else {"cert": str(not_pem), "key": str(not_pem)}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    conf = {"cniVersion": "1.1.0", "ipam": {"endpoint": "127.0.0.1:1", "pool": "p", "tls": tls}}
    assert check_alike(plugins, env, json.dumps(conf).encode()) == "CNI error 7"


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for test certificates")
def test_a_certificate_with_another_certificates_key_is_error_7_in_both(plugins: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """A certificate rotated without its key: a configuration error, not 'try again later'."""
    cert1, key1 = _self_signed(tmp_path, "one")
    _, key2 = _self_signed(tmp_path, "two")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}

    def conf(key: Path) -> bytes:
        return json.dumps({"cniVersion": "1.1.0", "ipam": {"endpoint": "127.0.0.1:1", "pool": "p", "tls": {
            "ca": str(cert1), "cert": str(cert1), "key": str(key)}}}).encode()

    assert check_alike(plugins, env, conf(key2)) == "CNI error 7"
    assert check_alike(plugins, env, conf(key1)) == "CNI error 11"  # the pair is good: nobody listens


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for test certificates")
def test_ca_files_as_go_reads_them(plugins: dict[str, Path], tmp_path: Path) -> None:
    """Any one good PEM certificate makes a CA file (Go's AppendCertsFromPEM), whatever is around it;
    a DER file or only broken blocks is error 7."""
    cert, _ = _self_signed(tmp_path, "ca")
    pem = cert.read_bytes()
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"], capture_output=True,
                         check=True).stdout
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
    for content, code in ((b"# Gr\xc3\xb6\xc3\x9fe CA \xe2\x80\x94\n" + pem, 11), (broken + pem, 11), (pem + broken, 11),
                          (broken, 7), (der, 7)):
        ca = tmp_path / "ca.pem"
        ca.write_bytes(content)
        conf = {"cniVersion": "1.1.0", "ipam": {"endpoint": "127.0.0.1:1", "pool": "p", "tls": {"ca": str(ca)}}}
        assert check_alike(plugins, env, json.dumps(conf).encode()) == f"CNI error {code}", content[:40]
