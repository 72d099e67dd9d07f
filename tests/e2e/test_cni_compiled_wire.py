"""The compiled CNI plugin and the Python plugin against a scripted gRPC server.

A real grpcio server on a unix socket answers IpamService's methods with bytes the test
chooses: well-formed answers, ABORTED (the plugins try again, three times), PERMISSION_DENIED,
and answers that do not parse (truncated, a string that is not UTF-8, a field of the wrong
wire type). Both plugins must send the same requests, field for field (decoded with the
generated dsipam.v1 messages), and answer the runtime alike. The real server's behaviour is
test_cni_plugin.py's, which runs both plugins too.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dsipam.v1 import ipam_pb2 as pb

SERVICE = "/dsipam.v1.IpamService/"
REQUESTS = {"Allocate": pb.AllocateRequest, "Release": pb.ReleaseRequest, "GetAllocation": pb.GetAllocationRequest,
            "GetPool": pb.GetPoolRequest, "GarbageCollect": pb.GarbageCollectRequest}


def _allocation() -> pb.Allocation:
    return pb.Allocation(pool="pods", owner="c1/eth0", attributes={"cni.node": "n"}, node="n", addresses=[
        pb.Address(family=pb.IP_FAMILY_IPV4, ip="198.18.0.7", prefix_length=24, gateway="198.18.0.1"),
        pb.Address(family=pb.IP_FAMILY_IPV6, ip="fd00::7", prefix_length=120, gateway="fd00::1")])


ANSWERS = {
    "Allocate": pb.AllocateResponse(allocation=_allocation(), created=True).SerializeToString(),
    "Release": pb.ReleaseResponse(released=_allocation().addresses).SerializeToString(),
    "GetAllocation": _allocation().SerializeToString(),
    "GetPool": pb.Pool(name="pods", usage=[pb.FamilyUsage(family=pb.IP_FAMILY_IPV4, size=10, allocated=10, free=0),
                                           pb.FamilyUsage(family=pb.IP_FAMILY_IPV6, size=10, allocated=1, free=9)]
                       ).SerializeToString(),
    "GarbageCollect": pb.GarbageCollectResponse(released=[_allocation()]).SerializeToString(),
}


def _field(number: int, data: bytes) -> bytes:
    return bytes([number << 3 | 2, len(data)]) + data


# Answers that do not parse, for every method: truncated; a string that is not UTF-8 (in the
# allocation's address, its owner, an attribute); a varint where a message or string belongs.
GARBAGE_TRUNCATED = b"\x0a\x05ab"
_BAD_ADDRESS = _field(2, b"\xff\xfe")
_BAD_ALLOCATION = _field(3, _BAD_ADDRESS)
GARBAGE_BY_METHOD = {
    "Allocate": {"not UTF-8": _field(1, _BAD_ALLOCATION), "wrong wire type": b"\x08\x01",
                 "bad attribute": _field(1, _field(4, _field(1, b"\xff")))},
    "Release": {"not UTF-8": _field(1, _BAD_ADDRESS), "wrong wire type": b"\x08\x05"},
    "GetAllocation": {"not UTF-8": _field(2, b"\xff"), "wrong wire type": b"\x10\x01"},
    "GetPool": {"not UTF-8": _field(4, b"\x08\x01\x12\x01\x05"), "wrong wire type": b"\x20\x01"},
    "GarbageCollect": {"not UTF-8": _field(1, _field(6, b"\xc3")), "wrong wire type": _field(1, b"\x08\x01")},
}


class Scripted:
    """The server's script: what to answer, and the requests it got."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, bytes]] = []
        self.aborts = 0  # answer ABORTED this many times first
        self.status: grpc.StatusCode | None = None  # else answer this status
        self.answer: bytes | None = None  # else answer these bytes

    def reset(self, aborts: int = 0, status: grpc.StatusCode | None = None, answer: bytes | None = None) -> None:
        with self.lock:
            self.calls, self.aborts, self.status, self.answer = [], aborts, status, answer

    def handle(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls.append((method, request))
            if self.aborts:
                self.aborts -= 1
                context.abort(grpc.StatusCode.ABORTED, "lost a race, try again")
            if self.status is not None:
                context.abort(self.status, f"scripted {self.status.name}")
            return self.answer if self.answer is not None else ANSWERS[method]


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, script: Scripted) -> None:
        self.script = script

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.removeprefix(SERVICE)  # type: ignore[attr-defined]
        if method not in REQUESTS:
            return None
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.script.handle(method, request, context))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Scripted, str]]:
    from concurrent.futures import ThreadPoolExecutor

    sock = str(tmp_path_factory.mktemp("cni-scripted") / "s.sock")
    script = Scripted()
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((_Handler(script),))
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    yield script, sock
    server.stop(0)


@pytest.fixture(scope="module")
def plugins(both_plugins: dict[str, Path]) -> dict[str, Path]:
    return both_plugins


def invocation(sock: str, command: str, **ipam: object) -> tuple[dict[str, str], bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": "c1",
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x",
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;IP=198.18.0.7"}
    section = {"type": "dsipam", "endpoint": f"unix://{sock}", "pool": "pods", "ipFamilyPolicy": "PreferDualStack",
               "ipFamilies": ["IPv6", "IPv4"], "node": "node-a", "defaultRoutes": True, "gcGrace": 2.5e-9,
               "routes": [{"dst": "198.19.0.0/16", "gw": "198.18.0.1", "mtu": 1400, "advmss": 1360, "priority": 5,
                           "table": 100, "scope": 0}],
               "dns": {"nameservers": ["198.18.0.53"], "domain": "a.test", "search": ["a.test"],
                       "options": ["ndots:2"]}, **ipam}
    conf = {"cniVersion": "1.1.0", "name": "net", "ipam": section,
            "runtimeConfig": {"ips": ["fd00::7/120"]},
            "prevResult": {"ips": [{"address": "198.18.0.7/24"}, {"address": "fd00:0::7/120"}]},
            "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}, {"containerID": "c3",
                                                                                    "ifname": "net1"}]}
    return env, json.dumps(conf).encode()


def both(plugins: dict[str, Path], script: Scripted, env: dict[str, str], stdin: bytes,
         **reset: object) -> dict[str, tuple[int, object, list[tuple[str, object]]]]:
    """Each plugin's exit code, printed JSON and the requests the server got (decoded)."""
    out = {}
    for kind, plugin in plugins.items():
        script.reset(**reset)  # type: ignore[arg-type]
        proc = subprocess.run([str(plugin)], input=stdin, env=env, capture_output=True, timeout=60)
        assert not proc.stderr, proc.stderr
        printed = json.loads(proc.stdout) if proc.stdout.strip() else None
        out[kind] = (proc.returncode, printed, [(m, REQUESTS[m].FromString(r)) for m, r in script.calls])
    return out


@pytest.mark.parametrize(("command", "extra"), [
    ("ADD", {}), ("DEL", {}), ("CHECK", {}), ("STATUS", {}), ("GC", {}), ("GC", {"gcScope": "pool"}),
    ("GC", {"gcGrace": 0.9999999996}), ("GC", {"gcGrace": 86400}), ("ADD", {"ipFamilyPolicy": "SingleStack",
                                                                           "ipFamilies": ["IPv6"]}),
])
def test_both_send_the_same_requests_and_print_the_same(plugins: dict[str, Path],
                                                        scripted: tuple[Scripted, str], command: str,
                                                        extra: dict) -> None:
    script, sock = scripted
    env, stdin = invocation(sock, command, **extra)
    got = both(plugins, script, env, stdin)
    assert got["compiled"] == got["python"]
    rc, printed, calls = got["python"]
    assert len(calls) == 1, calls
    if command == "ADD":
        assert rc == 0 and isinstance(printed, dict)
        assert printed["routes"][0] == {"dst": "198.19.0.0/16", "gw": "198.18.0.1", "mtu": 1400, "advmss": 1360,
                                        "priority": 5, "table": 100, "scope": 0}
        request = calls[0][1]
        assert dict(request.attributes) == {"cni.containerID": "c1", "cni.ifname": "eth0", "cni.node": "node-a",
                                            "cni.network": "net", "k8s.namespace": "ns", "k8s.pod": "p",
                                            "k8s.podUID": "u"}
    if command == "STATUS":  # PreferDualStack: IPv4 is full, IPv6 has room
        assert (rc, printed) == (0, None)
    if command == "GC" and "gcGrace" in extra:
        grace = calls[0][1].grace
        assert 0 <= grace.nanos < 1_000_000_000 and grace.seconds + grace.nanos / 1e9 == pytest.approx(
            extra["gcGrace"], abs=1e-9)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_aborted_is_tried_three_more_times(plugins: dict[str, Path], scripted: tuple[Scripted, str],
                                           command: str) -> None:
    script, sock = scripted
    env, stdin = invocation(sock, command)
    twice = both(plugins, script, env, stdin, aborts=2)
    assert twice["compiled"] == twice["python"]
    assert twice["python"][0] == 0 and len(twice["python"][2]) == 3
    always = both(plugins, script, env, stdin, status=grpc.StatusCode.ABORTED)
    assert always["compiled"][2] == always["python"][2] and len(always["python"][2]) == 4
    codes = {kind: (rc, printed["code"] if isinstance(printed, dict) else None) for kind, (rc, printed, _) in
             always.items()}
    want = 50 if command == "STATUS" else 11  # STATUS: not available, would be 11
    assert codes == {"python": (1, want), "compiled": (1, want)}


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_permission_denied(plugins: dict[str, Path], scripted: tuple[Scripted, str], command: str) -> None:
    """STATUS takes a role that may not read pools as 'reachable' (0); the others are error 106."""
    script, sock = scripted
    env, stdin = invocation(sock, command)
    got = both(plugins, script, env, stdin, status=grpc.StatusCode.PERMISSION_DENIED)
    assert got["compiled"] == got["python"]
    rc, printed, _ = got["python"]
    if command == "STATUS":
        assert (rc, printed) == (0, None)
    else:
        assert rc == 1 and isinstance(printed, dict) and printed["code"] == 106, printed


METHOD_OF = {"ADD": "Allocate", "DEL": "Release", "CHECK": "GetAllocation", "GC": "GarbageCollect",
             "STATUS": "GetPool"}


@pytest.mark.parametrize("extra", [b"\x00\x00", b"\x7b\x7c", b"\x80\x80\x80\x80\x80\x01\x00",
                                   b"\x78" + b"\xff" * 10 + b"\x01", b"\x78" + b"\xff" * 9 + b"\x7f",
                                   b"\x0b\x0c", b"\x7a" + b"\x80" * 10 + b"\x00", b"\x78" + b"\xff" * 200_000])
def test_a_well_formed_answer_with_a_bad_field_after_it_is_refused_by_both(
        plugins: dict[str, Path], scripted: tuple[Scripted, str], extra: bytes) -> None:
    """Field 0, a group, a field number past 2^31, varints of 11 bytes or past 64 bits (a length's
    too), and a run of 200,000 0xff bytes (refused at the 11th, not after building a huge int)."""
    script, sock = scripted
    env, stdin = invocation(sock, "ADD")
    got = both(plugins, script, env, stdin, answer=ANSWERS["Allocate"] + extra)
    for kind, (rc, printed, _) in got.items():
        assert rc == 1 and isinstance(printed, dict) and printed["code"] == 110, (kind, printed)


@pytest.mark.parametrize("extra", [b"\x80\x80\x80\x80\x10\x00", b"\x7d\x01\x02\x03\x04",
                                   b"\x79" + b"\x00" * 8])
def test_unknown_fields_are_skipped_by_both(plugins: dict[str, Path], scripted: tuple[Scripted, str],
                                            extra: bytes) -> None:
    """A field number below 2^31, fixed32 and fixed64 fields: unknown, skipped."""
    script, sock = scripted
    env, stdin = invocation(sock, "ADD")
    got = both(plugins, script, env, stdin, answer=ANSWERS["Allocate"] + extra)
    assert got["compiled"][:2] == got["python"][:2] and got["python"][0] == 0, got


@pytest.mark.parametrize(("command", "kind"), [(c, k) for c, m in METHOD_OF.items()
                                               for k in ("truncated", *GARBAGE_BY_METHOD[m])])
def test_an_answer_that_does_not_parse_is_error_110(plugins: dict[str, Path], scripted: tuple[Scripted, str],
                                                    command: str, kind: str) -> None:
    script, sock = scripted
    method = METHOD_OF[command]
    answer = GARBAGE_TRUNCATED if kind == "truncated" else GARBAGE_BY_METHOD[method][kind]
    env, stdin = invocation(sock, command)
    got = both(plugins, script, env, stdin, answer=answer)
    for plugin_kind, (rc, printed, _) in got.items():
        assert rc == 1 and isinstance(printed, dict) and printed["code"] == 110, (plugin_kind, printed)
        assert printed["msg"].startswith(f"dsipam {method}: the answer does not parse ("), printed
