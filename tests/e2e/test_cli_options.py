"""The ``dsipam`` command line's rough edges (issue 17, findings 10 and 16; issue 13, finding 9):
connection options and -o before or after the subcommand, malformed --target values refused
before any call, control characters in --attr/--label/--selector, one-line errors (no
traceback) from fsck, migrate and serve, and `token new` printing its token once. Hypothesis
tests drive the parser, the target check and the KEY=VALUE check in-process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import ADMIN_URL, database_url, free_port, psql

from dsipam.client import IpamClient
from dsipam.client._channel import normalise_target
from dsipam.client._cli import GLOBAL_OPTIONS, UsageError, _pairs, prepare_argv
from dsipam.client._errors import InvalidArgument
from dsipam.server.cli import build_parser

DSIPAM = str(Path(sys.executable).with_name("dsipam"))
WAIT = 30.0


def dsipam(*args: str, target: str | None = None, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    base["DSIPAM_TIMEOUT"] = str(WAIT)
    if target is not None:
        base["DSIPAM_TARGET"] = target
    return subprocess.run([DSIPAM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dsipam"), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- global options anywhere ----------------------------------------------------------------------


def test_output_and_connection_options_go_before_or_after_the_subcommand(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("pods", ["198.18.0.0/24"])
    import json

    forms = [
        ("-o", "json", "pool", "list"),
        ("pool", "list", "-o", "json"),
        ("pool", "-o", "json", "list"),
        ("--output", "json", "pool", "list", "--target", target),
    ]
    for form in forms:
        result = dsipam(*form, target=target)
        assert result.returncode == 0, (form, result.stderr)
        assert [p["name"] for p in json.loads(result.stdout)["pools"]] == ["pods"], form
    # --target after the subcommand wins over the variable and over one given before it
    result = dsipam("--target", "127.0.0.1:9", "pool", "list", "--target", target, target="127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:1] == ["NAME"]
    # the alloc short form keeps working with options between alloc and its words
    alloc = dsipam("alloc", "-o", "json", "pods", "c1", "--timeout", "20", target=target)
    assert alloc.returncode == 0, alloc.stderr
    assert json.loads(alloc.stdout)["allocation"]["owner"] == "c1"
    listed = dsipam("alloc", "-o", "json", "list", "pods", target=target)
    assert [a["owner"] for a in json.loads(listed.stdout)["allocations"]] == ["c1"], listed.stderr


_VALUES = {"--target": "127.0.0.1:50051", "--ca-file": "ca.pem", "--cert-file": "c.pem", "--key-file": "k.pem",
           "--server-name": "ipam.example", "--token": "t0k", "--token-file": "tok", "--timeout": "7"}
_COMMANDS = [
    ["pool", "list"], ["pool", "show", "pods"], ["alloc", "pods", "c1/eth0"], ["alloc", "list", "pods"],
    ["alloc", "show", "pods", "o"], ["release", "pods", "o"], ["blocks", "pods"], ["node", "release", "pods", "n1"],
    ["watch", "pods"], ["gc", "pods", "--keep", "a"],
]


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(prepare_argv(argv))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_COMMANDS),
       st.lists(st.sampled_from([g.flag for g in GLOBAL_OPTIONS] + ["-o"]), unique=True, max_size=5),
       st.data())
def test_global_options_parse_the_same_before_and_after_the_subcommand(command: list[str], flags: list[str],
                                                                       data: st.DataObject) -> None:
    """Every placement of the global options (before the command, after it, or split) parses to
    the same namespace as all of them before it."""
    given_options = []
    for flag in flags:
        value = "yaml" if flag == "-o" else _VALUES.get(flag)
        given_options.append([flag] if value is None else [flag, value])
    before = [x for option in given_options for x in option]
    reference = _parse(before + command)
    split = data.draw(st.lists(st.booleans(), min_size=len(given_options), max_size=len(given_options)))
    front = [x for option, late in zip(given_options, split, strict=True) if not late for x in option]
    back = [x for option, late in zip(given_options, split, strict=True) if late for x in option]
    assert vars(_parse(front + command + back)) == vars(reference)
    for flag, option in zip(flags, given_options, strict=True):
        dest = "output" if flag == "-o" else "client_" + flag.lstrip("-").replace("-", "_")
        assert getattr(reference, dest) == (option[1] if len(option) == 2 else True)


# -- --target -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["host:notaport", "127.0.0.1:99999", "127.0.0.1:0", "unix://relative", "a b:1",
                                 "[::1", "::1:50051", ":50051", "host:", "ipv4:127.0.0.1:x", "ipv4:[::1]:5",
                                 "dns:///:50051", "unix:", "h\tx:1", ","])
def test_malformed_targets_exit_2_before_any_call(bad: str) -> None:
    started = time.monotonic()
    result = dsipam("--target", bad, "pool", "list")
    elapsed = time.monotonic() - started
    one_line(result, 2, "target")  # no C-core log lines, no resolver text after retries
    assert elapsed < 8, elapsed  # no retries (they took 9 s before)


@pytest.mark.parametrize("bad", ["http://127.0.0.1:50051", "https://ipam.example:443", "grpc://[fd00::1]:5",
                                 "tcp://198.18.0.1:50051"])
def test_a_url_scheme_in_the_target_is_named_as_unsupported(bad: str) -> None:
    line = one_line(dsipam("--target", bad, "pool", "list"), 2, "target", "scheme", bad.split(":")[0] + "://",
                    "host:port", "unix:///")
    assert "IPv6" not in line.split("give")[0], line  # it said "write an IPv6 address in brackets"


def _accepted(target: str) -> bool:
    try:
        normalise_target(target)
    except InvalidArgument as exc:
        assert exc.message.startswith("target:") and exc.attempts == 0
        return False
    return True


@settings(max_examples=400, deadline=None, database=None)
@example(",")
@example("ipv6:,")
@example("dns://")
@example("[]:1")
@given(st.text(alphabet=st.sampled_from("ab1:.[]/,-_ \t\nunix%") | st.characters(), max_size=40))
def test_target_check_raises_invalid_argument_or_accepts(text: str) -> None:
    """Whatever the text: InvalidArgument (never another exception); an accepted plain host:port
    has a port from 1 to 65535 and no whitespace."""
    if _accepted(text):
        stripped = text.strip()
        assert not any(ch.isspace() for ch in stripped)
        if "," not in stripped and stripped.split(":", 1)[0] not in ("unix", "unix-abstract", "dns", "ipv4",
                                                                      "ipv6", "vsock", "xds", "google-c2p"):
            assert 1 <= int(stripped.rsplit(":", 1)[1]) <= 65535


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(["localhost", "ipam.example", "198.18.0.1", "[fd00::1]", "[::1]"]),
       st.integers(min_value=-5, max_value=70000))
def test_target_ports(host: str, port: int) -> None:
    assert _accepted(f"{host}:{port}") == (1 <= port <= 65535)


# -- --attr, --label, --selector --------------------------------------------------------------------------------


def test_control_characters_in_pairs_are_refused_naming_the_flag(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("pods", ["198.18.0.0/24"])
    one_line(dsipam("alloc", "pods", "o", "--attr", "note=two\nlines", target=target), 2, "--attr", "control")
    one_line(dsipam("alloc", "pods", "o", "--attr", "k=a\tb", target=target), 2, "--attr", "'\\t'")
    one_line(dsipam("pool", "create", "p2", "--range", "198.18.1.0/24", "--label", "k=\x1b[31m", target=target), 2,
             "--label")
    one_line(dsipam("alloc", "list", "pods", "--selector", "k=\r", target=target), 2, "--selector")
    with IpamClient(target, timeout=WAIT) as ipam:
        assert [p.name for p in ipam.list_pools()] == ["pods"]
        assert list(ipam.list_allocations("pods")) == []  # nothing reached the server


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.text(max_size=12), max_size=4))
def test_pairs_accept_only_printable_key_value(values: list[str]) -> None:
    import unicodedata

    try:
        out = _pairs(values, "--attr")
    except UsageError as exc:
        assert str(exc).startswith("--attr ")
        return
    for text in values:
        assert "=" in text and not text.startswith("=")
        assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)
    assert set(out) == {v.partition("=")[0] for v in values}


# -- server-side commands: one line, no traceback -----------------------------------------------------------


@pytest.fixture
def empty_db() -> str:
    name = f"dsipam_test_empty_{uuid.uuid4().hex[:10]}"
    psql(ADMIN_URL, f"CREATE DATABASE {name}")
    yield database_url(name)
    psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_fsck_and_migrate_errors_are_one_line(db_url: str, empty_db: str) -> None:
    missing = database_url(f"dsipam_missing_{uuid.uuid4().hex[:8]}")
    one_line(dsipam("fsck", "nosuch", "--database-url", db_url), 1, "nosuch", "POOL_NOT_FOUND")
    for command in (["fsck", "pods"], ["migrate"], ["migrate", "--check"]):
        one_line(dsipam(*command, "--database-url", "postgresql://postgres@127.0.0.1:9/x"), 1,
                 "cannot reach the database", "127.0.0.1:9")
        one_line(dsipam(*command, "--database-url", "bogus"), 2, "--database-url", "bogus")
        one_line(dsipam(*command, "--database-url", missing), 1, "does not exist", "dsipam migrate")
    one_line(dsipam("fsck", "pods", "--database-url", empty_db), 1, "database error", "dsipam migrate")
    # no URL at all, and no private PostgreSQL running in the data directory given
    one_line(dsipam("fsck", "pods", env={"DSIPAM_DATA_DIR": "/nonexistent/dsipam"}), 2, "--database-url",
             "/nonexistent/dsipam")


@pytest.mark.parametrize("command", [["fsck", "pods"], ["migrate"], ["migrate", "--check"], ["serve"]])
def test_database_url_is_checked_up_front(command: list[str]) -> None:
    """A port out of range, a foreign scheme or a broken host is a usage error naming it (it was
    'unexpected error: OverflowError' from the driver), from the flag and from the variable."""
    for url, words in (("postgresql://postgres@127.0.0.1:99999/x", ["port", "'99999'"]),
                       ("postgresql://postgres@h1:5432,h2:70000/x", ["port", "'70000'"]),
                       ("postgresql://postgres@127.0.0.1/x?port=0", ["port", "'0'"]),
                       ("mysql://root@127.0.0.1/x", ["scheme", "'mysql'"]),
                       ("postgresql://postgres@[::1/x", ["[::1"])):
        line = one_line(dsipam(*command, "--database-url", url), 2, "--database-url", *words)
        assert "unexpected" not in line
        one_line(dsipam(*command, env={"DSIPAM_DATABASE_URL": url}), 2, "DSIPAM_DATABASE_URL", *words)


def test_a_refused_database_url_is_refused_before_the_database_layer_is_imported() -> None:
    """The URL checks live in dburl.py, without SQLAlchemy, alembic or asyncpg, and every command
    checks its URL before it imports them: a refused URL costs a user (and this suite's forty refusals
    above) the interpreter's start, not the database layer's import (0.66 s -> 0.09 s a refusal here)."""
    code = (
        "import sys\n"
        "from dsipam.server import cli\n"
        "for command in (['fsck', 'pods'], ['migrate'], ['migrate', '--check'], ['serve']):\n"
        "    assert cli.main([*command, '--database-url', 'postgresql://u@127.0.0.1:99999/x']) == 2\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'asyncpg', 'dsipam.server.store') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    assert result.stderr.count("the port '99999' is not a number from 1 to 65535") == 4, result.stderr


@settings(max_examples=300, deadline=None, database=None)
@example("postgresql://u@h:65536/d")
@example("postgresql://u@[fd00::1]:5432/d")
@given(st.builds("{}://{}@{}:{}/d{}".format, st.sampled_from(["postgresql", "postgres", "postgresql+asyncpg", "pg"]),
                 st.sampled_from(["u", "u:p"]), st.sampled_from(["h", "198.18.0.1", "[fd00::1]", "h1:1,h2", "a b"]),
                 st.one_of(st.integers(-3, 70000).map(str), st.text(max_size=6)),
                 st.sampled_from(["", "?port=5", "?port=99999", "?host=/tmp"])))
def test_database_url_check_refuses_with_a_usage_error_or_accepts(url: str) -> None:
    from dsipam.server.cli import CommandError, check_database_url
    from dsipam.server.store.db import to_sqlalchemy_url

    try:
        check_database_url(url)
    except CommandError as exc:
        assert exc.code == 2 and str(exc).startswith("--database-url ")
        return
    to_sqlalchemy_url(url)  # the engine takes it
    from urllib.parse import urlsplit

    from dsipam.server.store.db import normalise_multihost

    parts = urlsplit(normalise_multihost(url))
    assert parts.port is None or 1 <= parts.port <= 65535
    assert "99999" not in url and " " not in url


def test_migrate_check_names_the_revisions_when_behind(db_url: str, empty_db: str) -> None:
    from dsipam.server.migrate import head_revision

    head = head_revision()
    line = one_line(dsipam("migrate", "--check", "--database-url", empty_db), 1, "no dsipam schema", head,
                    "dsipam migrate")
    assert "unexpected" not in line
    assert dsipam("migrate", "--revision", "0001", "--database-url", empty_db).returncode == 0
    line = one_line(dsipam("migrate", "--check", "--database-url", empty_db), 1, "0001", head, "dsipam migrate")
    assert "unexpected" not in line
    result = dsipam("migrate", "--check", "--database-url", db_url)  # the session database is at head
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [["migrate", "--check"], ["fsck", "pods"], ["serve"]])
def test_debug_is_taken_after_the_subcommand_too(command: list[str]) -> None:
    bogus = "postgresql://postgres@127.0.0.1:99999/x"
    for argv in (["--debug", *command], [*command, "--debug"]):
        result = dsipam(*argv, "--database-url", bogus)
        assert result.returncode != 0
        assert "Traceback" in result.stderr and "unrecognized" not in result.stderr, result.stderr
    assert "Traceback" not in dsipam(*command, "--database-url", bogus).stderr
    assert _parse(["token", "hash", "--debug"]).client_debug is True
    assert _parse(["token", "new", "admin", "--debug"]).client_debug is True
    assert _parse(["--debug", "migrate"]).client_debug is True
    assert not _parse(["migrate"]).client_debug


def test_fsck_of_a_missing_pool_names_the_command(db_url: str) -> None:
    line = one_line(dsipam("fsck", "nopool", "--database-url", db_url), 1, "POOL_NOT_FOUND")
    assert line == "dsipam: fsck: pool 'nopool' not found [POOL_NOT_FOUND]", line


@pytest.mark.parametrize(("env", "words"), [
    ({"DSIPAM_MAX_WATCH_STREAMS": "abc"}, ["DSIPAM_MAX_WATCH_STREAMS", "'abc'"]),
    ({"DSIPAM_MAX_EXCLUDES_PER_POOL": "-1"}, ["DSIPAM_MAX_EXCLUDES_PER_POOL", "-1"]),
    ({"DSIPAM_FAST_LINGER_MS": "soon"}, ["DSIPAM_FAST_LINGER_MS"]),
    ({"DSIPAM_SHUTDOWN_GRACE": "x"}, ["DSIPAM_SHUTDOWN_GRACE"]),
    ({"DSIPAM_UNIX_SOCKET_MODE": "999"}, ["DSIPAM_UNIX_SOCKET_MODE"]),
    ({"DSIPAM_TOKEN_KEY": "zz"}, ["DSIPAM_TOKEN_KEY"]),
    ({"DSIPAM_TOKEN_KEY_FILE": "/nonexistent/key"}, ["DSIPAM_TOKEN_KEY_FILE", "/nonexistent/key"]),
    ({"DSIPAM_LOG_FORMAT": "xml"}, ["'xml'"]),
    ({"DSIPAM_METRICS_LISTEN": "nocolon"}, ["--metrics-listen", "nocolon"]),
    ({"DSIPAM_METRICS_LISTEN": "127.0.0.1:99999"}, ["--metrics-listen", "99999"]),
    ({"DSIPAM_LISTEN": "nocolon"}, ["--listen", "nocolon"]),
    ({"DSIPAM_LOG_LEVEL": "loud"}, ["--log-level", "'LOUD'"]),
])
def test_setting_errors_are_one_usage_line(db_url: str, env: dict[str, str], words: list[str]) -> None:
    result = dsipam("serve", "--insecure", env={"DSIPAM_DATABASE_URL": db_url, **env})
    line = one_line(result, 2, *words)
    assert line.startswith("dsipam: "), line


def test_serve_on_a_busy_port_is_one_line(db_url: str) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = dsipam("serve", "--listen", f"127.0.0.1:{port}", "--database-url", db_url, "--insecure")
    one_line(result, 1, f"127.0.0.1:{port}", "in use")
    assert result.stdout == ""


def test_serve_refuses_non_loopback_without_auth_unless_insecure(db_url: str) -> None:
    port = free_port()
    for extra in ([], ["--database-url", db_url], ["--data-dir", "/nonexistent/never-started"]):
        for listen in (f"0.0.0.0:{port}", f"[::]:{port}", f"198.18.0.1:{port}", f":{port}"):
            result = dsipam("serve", "--listen", listen, *extra)
            one_line(result, 1, listen, "loopback", "--auth-config", "--insecure")
            assert "private PostgreSQL" not in result.stdout  # refused before starting anything
    result = dsipam("serve", env={"DSIPAM_LISTEN": f"127.0.0.1:{port},0.0.0.0:{port}"})
    one_line(result, 1, f"0.0.0.0:{port}")


def test_token_new_prints_the_token_once() -> None:
    result = dsipam("token", "new", "admin")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token and "\n" not in token
    assert token not in result.stderr  # stderr often lands in logs
    assert "hash:" in result.stderr and "role: admin" in result.stderr
