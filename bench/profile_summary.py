#!/usr/bin/env python3
"""Summarises a py-spy ``--format raw`` profile (collapsed stacks): where the server's time goes.

  python bench/profile_summary.py bench/results/profile-*/s1-server-*.txt [--top 25]

Prints the share of samples by component (the package of the innermost frame), the
inclusive share of dsipam's own functions, and the functions with the most self time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

COMPONENTS = (
    ("dsipam.server.store", ("dsipam/server/store/",)),
    ("dsipam.server.domain", ("dsipam/server/domain/",)),
    ("dsipam.server.rpc", ("dsipam/server/rpc/",)),
    ("dsipam (other)", ("dsipam/",)),
    ("sqlalchemy", ("sqlalchemy/",)),
    ("asyncpg", ("asyncpg/",)),
    ("grpc", ("grpc/", "grpc_", "cygrpc", "libgrpc", "grpc_core", "grpc::", "absl")),
    ("protobuf", ("google/protobuf/",)),
    ("asyncio / uvloop", ("asyncio/", "uvloop/", "uvloop", "libuv")),
    ("CPython interpreter", ("Python/", "Objects/", "libpython", "python3.11")),
    ("libc / kernel", ("libc.so", "libc-", "libpthread")),
    ("ipaddress", ("ipaddress.py",)),
    ("json", ("json/",)),
)


def _dsipam_path(path: str) -> str:
    """py-spy shortens a file of an installed package to its path inside the package's directory:
    dsipam's ``server/rpc/pipeline.py`` (from .../dsipam/server/rpc/pipeline.py) is ours."""
    return "dsipam/" + path if path.startswith(("server/", "client/", "cni/", "kube/")) else path


def component(path: str) -> str:
    path = _dsipam_path(path)
    for name, needles in COMPONENTS:
        if any(n in path for n in needles):
            return name
    return "other"


_SOCKET_CALLS = ("write", "read", "sendmsg", "recvmsg", "send", "recv", "writev")
_NOT_A_COMPONENT = ("libc / kernel", "CPython interpreter", "other")


def attributed(frames: list[tuple[str, str]]) -> str:
    """The component of the innermost frame that belongs to a known library (idle when waiting in epoll)."""
    if frames and frames[-1][0].startswith("epoll"):
        return "idle (epoll_wait)"
    if frames and frames[-1][0] in _SOCKET_CALLS:
        on_stack = {component(path) for _, path in frames}
        if "asyncpg" in on_stack:
            return "socket I/O to PostgreSQL (write/read syscalls)"
        if "grpc" in on_stack:
            return "socket I/O of gRPC (sendmsg/recvmsg syscalls)"
    for _, path in reversed(frames):
        name = component(path)
        if name not in _NOT_A_COMPONENT:
            return name
    return "other"


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line or " " not in line:
            continue
        frames_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for raw in frames_text.split(";"):
            m = _FRAME.match(raw.strip())
            frames.append((m.group("func"), m.group("file")) if m else (raw.strip(), ""))
        stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[tuple[str, str]], int]], top: int = 25) -> str:
    total = sum(c for _, c in stacks) or 1
    by_component: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive_dsipam: Counter[str] = Counter()
    inclusive_component: Counter[str] = Counter()
    syscalls: Counter[str] = Counter()
    for frames, count in stacks:
        func, file = frames[-1]
        by_component[attributed(frames)] += count
        if component(file) == "libc / kernel":
            syscalls[func] += count
        self_time[f"{func} ({_short(file)})"] += count
        for name in {component(path) for _, path in frames}:
            inclusive_component[name] += count
        seen = set()
        for f, path in frames:
            if "dsipam/" in _dsipam_path(path):
                key = f"{f} ({_short(path)})"
                if key not in seen:
                    inclusive_dsipam[key] += count
                    seen.add(key)
    out = [
        f"{total} samples of the server process's threads (py-spy --native; waits in epoll are idle time)",
        "",
        "By component (the innermost frame of a known library; libc and interpreter frames count for their caller):",
    ]
    for name, n in by_component.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out += ["", "System calls and libc at the top of the stack:"]
    for name, n in syscalls.most_common(8):
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out += ["", "By component, inclusive (a stack counts for every component on it):"]
    for name, n in inclusive_component.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out += ["", "dsipam functions, inclusive:"]
    for name, n in inclusive_dsipam.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out += ["", "Self time:"]
    for name, n in self_time.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def _short(path: str) -> str:
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    stacks = [s for path in a.profiles for s in parse(path)]
    if not stacks:
        print("no samples", file=sys.stderr)
        return 1
    print(summarise(stacks, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
