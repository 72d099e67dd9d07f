"""The ``dsipam`` admin commands, built on the SDK: pools (and their settings, reservations,
ranges and migration), allocations, releases, GC, blocks, nodes and watches.

    dsipam [--target HOST:PORT|unix:///path] [TLS and token options] [-o FORMAT] COMMAND ...

The connection options and ``-o/--output`` may also come after the subcommand, as kubectl's do
(``dsipam pool list --target HOST:PORT -o json``).

Exit codes: 0 success; 1 the server refused the request or could not be reached (or refused
some owners of a migration); 2 the command line is wrong (argparse errors and anything found
before calling the server); 130 interrupted. Errors are one line on stderr; ``--debug`` adds
the traceback.

Only :mod:`argparse`, :mod:`os` and :mod:`sys` are imported up front; gRPC and the SDK are
imported when a command runs, so ``dsipam --help`` and usage errors are fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ._client import IpamClient
    from ._errors import IpamError
    from ._types import Allocation, Block, Range

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

OUTPUTS = ("table", "json", "yaml")


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class Refused(Exception):
    """The server did the command only in part, such as a migration with failed owners (exit 1)."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class _Global:
    flag: str
    env: str
    help: str
    metavar: str | None = None  # None: a switch without a value


GLOBAL_OPTIONS = (
    _Global("--target", "DSIPAM_TARGET", "the server: host:port, unix:///path, or ip:port,ip:port for round-robin "
            "(default 127.0.0.1:50051)", "HOST:PORT"),
    _Global("--tls", "DSIPAM_TLS", "use TLS with the system's CA roots (implied by --ca-file/--cert-file)"),
    _Global("--ca-file", "DSIPAM_CA_FILE", "CA bundle (PEM) that signs the server's certificate", "PEM"),
    _Global("--cert-file", "DSIPAM_CERT_FILE", "client certificate (PEM) for mutual TLS", "PEM"),
    _Global("--key-file", "DSIPAM_KEY_FILE", "private key (PEM) of --cert-file", "PEM"),
    _Global("--server-name", "DSIPAM_SERVER_NAME", "name to verify the server's certificate against", "NAME"),
    _Global("--token", "DSIPAM_TOKEN", "bearer token sent with every call", "TOKEN"),
    _Global("--token-file", "DSIPAM_TOKEN_FILE", "file holding the bearer token", "PATH"),
    _Global("--timeout", "DSIPAM_TIMEOUT", "deadline of each call in seconds, retries included (default 10)",
            "SECONDS"),
    _Global("--debug", "DSIPAM_DEBUG", "print tracebacks and retry attempts"),
)
_VALUE_FLAGS = frozenset([*(g.flag for g in GLOBAL_OPTIONS if g.metavar), "-o", "--output"])


def _dest(flag: str) -> str:
    return "client_" + flag.lstrip("-").replace("-", "_")


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Adds the connection options and -o/--output to the top-level parser (the admin commands
    take them after the subcommand too: see :func:`add_client_commands`)."""
    group = parser.add_argument_group("connection options (admin commands; before or after the subcommand)")
    _add_globals(group, top=True)


def _add_globals(group: Any, *, top: bool) -> None:
    """The connection options and -o/--output. Below the top level they default to SUPPRESS, so
    that a value given before the subcommand is kept when none is given after it (and the one after
    it wins when both are), and they stay out of the subcommands' --help."""
    for g in GLOBAL_OPTIONS:
        help_text = f"{g.help} (env {g.env}{'=1' if not g.metavar else ''})" if top else argparse.SUPPRESS
        if g.metavar:
            group.add_argument(g.flag, dest=_dest(g.flag), metavar=g.metavar, help=help_text,
                               **({} if top else {"default": argparse.SUPPRESS}))
        else:
            group.add_argument(g.flag, dest=_dest(g.flag), action="store_true",
                               default=None if top else argparse.SUPPRESS, help=help_text)
    if top:
        group.add_argument("-o", "--output", default=None, choices=OUTPUTS, help=_OUTPUT_HELP)


def _add_globals_below(parser: argparse.ArgumentParser) -> None:
    """Gives ``parser`` and every parser under it the connection options."""
    _add_globals(parser, top=False)
    if "-o" not in parser._option_string_actions:  # `dsipam pool -o json list`
        parser.add_argument("-o", "--output", default=argparse.SUPPRESS, choices=OUTPUTS, help=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                _add_globals_below(child)


def _next_word(args: Sequence[str], i: int) -> int:
    """The index of the first argument at or after ``i`` that is not a global option (or its value)."""
    while i < len(args):
        token = args[i]
        if token == "--" or not token.startswith("-") or token == "-":
            return i
        i += 2 if token in _VALUE_FLAGS else 1
    return i


def prepare_argv(argv: Sequence[str]) -> list[str]:
    """Rewrites ``alloc NAME OWNER`` to ``alloc new NAME OWNER`` so that argparse can tell it
    from ``alloc list`` and ``alloc show`` (a pool named list or show: ``alloc new list OWNER``).
    Global options may stand before the subcommand or between ``alloc`` and its words."""
    args = list(argv)
    i = _next_word(args, 0)
    if i >= len(args) or args[i] != "alloc":
        return args
    j = _next_word(args, i + 1)
    if j >= len(args) or args[j] in ("list", "show", "new", "--"):
        return args
    if any(a in ("-h", "--help") for a in args[i + 1 : j]):
        return args
    return args[: i + 1] + ["new"] + args[i + 1 :]


# -- per-range options ----------------------------------------------------------------------


class _RangeAction(argparse.Action):
    """``--range CIDR`` starts a range; the range options that follow attach to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        ranges = list(getattr(namespace, self.dest) or [])
        ranges.append({"cidr": values, "first": None, "last": None, "gateway": None, "exclude": [], "block_size": 0})
        setattr(namespace, self.dest, ranges)


class _RangeOption(argparse.Action):
    """``--gateway/--first/--last/--exclude/--block-size``: set on the preceding ``--range``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        key = self.dest.removeprefix("range_")
        ranges = getattr(namespace, "ranges", None)
        if not ranges:
            parser.error(f"{option_string} {values} must follow the --range it applies to")
        current = ranges[-1]
        if key == "exclude":
            current["exclude"].extend(x.strip() for x in str(values).split(",") if x.strip())
            return
        if current[key]:
            parser.error(f"{option_string} is given twice for --range {current['cidr']}")
        current[key] = values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number of seconds")
    return value


def _output_default() -> str:
    return os.environ.get("DSIPAM_OUTPUT", "table") or "table"


_OUTPUT_HELP = "table (for people, the default), json (stable, for scripts) or yaml (env DSIPAM_OUTPUT)"


def _add_output(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `dsipam -o json pool list` keeps the -o given before the subcommand.
    p.add_argument("-o", "--output", default=argparse.SUPPRESS, choices=OUTPUTS, help=_OUTPUT_HELP)


_RANGE_HELP = """\
range options attach to the --range before them, so each range gets its own:

  dsipam pool create pods \\
      --range 198.18.0.0/24 --gateway 198.18.0.1 --exclude 198.18.0.128/25 \\
      --range fd00::/120 --first fd00::10 --last fd00::ff

--exclude is repeatable and takes addresses or CIDRs (also comma-separated).
"""


def _add_range_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--range", dest="ranges", action=_RangeAction, metavar="CIDR", required=True,
                   help="a range such as 198.18.0.0/24 or fd00::/120 (repeatable)")
    p.add_argument("--gateway", dest="range_gateway", action=_RangeOption, metavar="IP",
                   help="gateway of the preceding --range (never handed out)")
    p.add_argument("--first", dest="range_first", action=_RangeOption, metavar="IP",
                   help="first address handed out from the preceding --range")
    p.add_argument("--last", dest="range_last", action=_RangeOption, metavar="IP",
                   help="last address handed out from the preceding --range")
    p.add_argument("--exclude", dest="range_exclude", action=_RangeOption, metavar="ADDR|CIDR",
                   help="never hand out these addresses of the preceding --range (repeatable)")
    p.add_argument("--block-size", dest="range_block_size", action=_RangeOption, type=_positive_int,
                   metavar="N", help="addresses per block of the preceding --range (a power of two; default 64)")


def _add_settings(p: argparse.ArgumentParser, *, update: bool) -> None:
    p.add_argument("--cooldown", type=_seconds, metavar="SECONDS",
                   help="how long a released address waits before it is handed out again (0: none; "
                        + ("unchanged when not given)" if update else "default 30)"))
    p.add_argument("--node-affinity", choices=("borrow", "strict"),
                   help="borrow: a node with no free block takes an address from another node's block "
                        + ("(unchanged when not given)" if update else "(the default)")
                        + "; strict: it never does")


POOL_COMMANDS = "{create,list,show,usage,delete,update,reserve,unreserve,add-range,remove-range,migrate}"


def add_client_commands(sub: Any) -> None:
    """Adds ``pool``, ``alloc``, ``release``, ``gc``, ``blocks``, ``node`` and ``watch`` to a
    subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter

    pool = sub.add_parser("pool", help="create, list, show, change, migrate and delete pools", description="Pools.")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True, metavar=POOL_COMMANDS)

    create = pool_sub.add_parser("create", help="create a pool", description="Create a pool.", epilog=_RANGE_HELP,
                                 formatter_class=fmt)
    create.add_argument("name", metavar="NAME", help="a lowercase DNS label")
    _add_range_options(create)
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    create.add_argument("--network", default="", metavar="NAME",
                        help="the address space (default: the default network); pools of one network never overlap")
    _add_settings(create, update=False)
    _add_output(create)
    create.set_defaults(func=run, handler=_pool_create)

    lst = pool_sub.add_parser("list", help="list pools with their usage", description="List pools.")
    _add_output(lst)
    lst.set_defaults(func=run, handler=_pool_list)

    show = pool_sub.add_parser("show", help="show a pool: ranges, and size, allocated and free per family",
                               description="Show a pool with its usage per family.")
    show.add_argument("name", metavar="NAME")
    _add_output(show)
    show.set_defaults(func=run, handler=_pool_show)

    usage = pool_sub.add_parser(
        "usage", help="utilisation bars per family: one pool, or every pool",
        description="Per family of POOL (or of every pool): a bar of the addresses allocated, in cooldown, "
                    "reserved and free, the share in use, and the exact counts. With -o json or yaml: "
                    "{pools: [{name, network, families: [{family, size, allocated, cooldown, reserved, free, "
                    "used, used_percent}]}]}.")
    usage.add_argument("name", metavar="POOL", nargs="?", help="the pool (default: every pool)")
    _add_output(usage)
    usage.set_defaults(func=run, handler=_pool_usage)

    delete = pool_sub.add_parser("delete", help="delete a pool", description="Delete a pool.")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--force", action="store_true", help="delete it even when it holds allocations (released)")
    _add_output(delete)
    delete.set_defaults(func=run, handler=_pool_delete)

    update = pool_sub.add_parser("update", help="change a pool's labels, cooldown or node affinity",
                                 description="Change the settings of pool NAME; what is not given stays as it is.")
    update.add_argument("name", metavar="NAME")
    update.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="the pool's labels become exactly those given (repeatable)")
    update.add_argument("--clear-labels", action="store_true", help="remove every label")
    _add_settings(update, update=True)
    _add_output(update)
    update.set_defaults(func=run, handler=_pool_update)

    reserve = pool_sub.add_parser("reserve", help="reserve addresses so that they are never handed out",
                                  description="Reserve addresses or CIDRs of pool NAME: they are never handed out.")
    reserve.add_argument("name", metavar="NAME")
    reserve.add_argument("addresses", nargs="+", metavar="ADDR|CIDR")
    reserve.add_argument("--force", action="store_true",
                         help="reserve allocated addresses too: their owners keep them, and they are not handed "
                              "out again after release")
    _add_output(reserve)
    reserve.set_defaults(func=run, handler=_pool_reserve)

    unreserve = pool_sub.add_parser("unreserve", help="remove reservations",
                                    description="Remove reservations of pool NAME (each as it was reserved).")
    unreserve.add_argument("name", metavar="NAME")
    unreserve.add_argument("addresses", nargs="+", metavar="ADDR|CIDR")
    _add_output(unreserve)
    unreserve.set_defaults(func=run, handler=_pool_unreserve)

    add_range = pool_sub.add_parser(
        "add-range", help="add ranges to a live pool", epilog=_RANGE_HELP, formatter_class=fmt,
        description="Add ranges to pool NAME, one call per --range in order (an IPv6 range makes an IPv4 pool "
                    "dual-stack; see 'pool migrate'). It stops at the first range the server refuses.")
    add_range.add_argument("name", metavar="NAME")
    _add_range_options(add_range)
    _add_output(add_range)
    add_range.set_defaults(func=run, handler=_pool_add_range)

    remove_range = pool_sub.add_parser("remove-range", help="remove a range that holds no allocations",
                                       description="Remove the range CIDR from pool NAME.")
    remove_range.add_argument("name", metavar="NAME")
    remove_range.add_argument("cidr", metavar="CIDR")
    _add_output(remove_range)
    remove_range.set_defaults(func=run, handler=_pool_remove_range)

    migrate = pool_sub.add_parser(
        "migrate", help="give every owner of a pool the families a policy asks for",
        description="Give every owner of pool NAME the families the policy asks for, in batches, keeping the "
                    "addresses owners hold; prints progress after each batch. Safe to run again. Exits 1 when "
                    "some owners could not be migrated.")
    migrate.add_argument("name", metavar="NAME")
    migrate.add_argument("--policy", choices=("prefer", "require"), default="prefer",
                         help="prefer (the default): add what is free; require: owners that cannot get both "
                              "families count as failed")
    migrate.add_argument("--batch-size", type=_positive_int, default=0, metavar="N",
                         help="owners per batch (at most 1000; default: the server's 100)")
    _add_output(migrate)
    migrate.set_defaults(func=run, handler=_pool_migrate)

    alloc = sub.add_parser(
        "alloc", help="allocate addresses for an owner; list or show allocations",
        usage="%(prog)s [new] NAME OWNER [options] | %(prog)s list NAME | %(prog)s show NAME OWNER",
        description="dsipam alloc NAME OWNER allocates (it is short for 'alloc new NAME OWNER'; "
                    "write 'alloc new' for a pool named list, show or new).",
    )
    alloc_sub = alloc.add_subparsers(dest="alloc_command", required=True, metavar="{new,list,show}", prog=alloc.prog)

    new = alloc_sub.add_parser("new", help="allocate (the default: 'dsipam alloc NAME OWNER')",
                               description="Allocate addresses for OWNER from pool NAME. Idempotent per owner.")
    new.add_argument("name", metavar="NAME", help="the pool")
    new.add_argument("owner", metavar="OWNER", help="the attachment's key, such as <containerID>/<ifname>")
    new.add_argument("--policy", choices=("single", "prefer", "require"),
                     help="single (the default): one address; prefer: one of each family that is free; "
                          "require: a dual-stack pair or nothing")
    new.add_argument("--family", action="append", choices=("ipv4", "ipv6"), default=None,
                     help="families in order, the first is the primary (repeatable; default: the pool's order)")
    new.add_argument("--ip", action="append", default=[], metavar="ADDR",
                     help="take this specific address (repeatable, one per family)")
    new.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                     help="an attribute stored with the allocation (repeatable)")
    new.add_argument("--node", metavar="NODE", help="the node the owner runs on: addresses come from its blocks")
    _add_output(new)
    new.set_defaults(func=run, handler=_alloc_new)

    alist = alloc_sub.add_parser("list", help="list a pool's allocations",
                                 description="List the allocations of pool NAME, ordered by owner.")
    alist.add_argument("name", metavar="NAME")
    alist.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                       help="only allocations with this attribute (repeatable: all of them)")
    alist.add_argument("--family", choices=("ipv4", "ipv6"), help="only allocations holding an address of this family")
    alist.add_argument("--page-size", type=_positive_int, default=500, metavar="N",
                       help="allocations fetched per call (default 500, at most 1000)")
    _add_output(alist)
    alist.set_defaults(func=run, handler=_alloc_list)

    ashow = alloc_sub.add_parser("show", help="show what an owner holds", description="Show what OWNER holds.")
    ashow.add_argument("name", metavar="NAME")
    ashow.add_argument("owner", metavar="OWNER")
    _add_output(ashow)
    ashow.set_defaults(func=run, handler=_alloc_show)

    release = sub.add_parser("release", help="release what an owner holds",
                             description="Release what OWNER holds in pool NAME (every family, or those named). "
                                         "Releasing an owner that holds nothing succeeds.")
    release.add_argument("name", metavar="NAME")
    release.add_argument("owner", metavar="OWNER")
    release.add_argument("--family", action="append", choices=("ipv4", "ipv6"), default=None,
                         help="release only this family (repeatable)")
    _add_output(release)
    release.set_defaults(func=run, handler=_release)

    gc = sub.add_parser("gc", help="release allocations whose owners are gone",
                        description="Release every allocation of pool NAME whose owner is not kept and that is "
                                    "older than the grace period (only NODE's with --node, only those with "
                                    "every --selector attribute).")
    gc.add_argument("name", metavar="NAME")
    gc.add_argument("--keep", action="append", default=[], metavar="OWNER", help="a live owner (repeatable)")
    gc.add_argument("--keep-file", metavar="PATH", help="live owners, one per line ('-' for stdin)")
    gc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="keep allocations younger than this (default: the server's 60)")
    gc.add_argument("--node", metavar="NODE", help="only this node's allocations (a shim: its own node always)")
    gc.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                    help="only allocations with this attribute (repeatable: all of them)")
    _add_output(gc)
    gc.set_defaults(func=run, handler=_gc)

    blocks = sub.add_parser("blocks", help="list a pool's blocks (one route each)",
                            description="List the blocks of pool NAME, or of one node: CIDR, family, node, used "
                                        "and free addresses.")
    blocks.add_argument("name", metavar="NAME")
    blocks.add_argument("--node", metavar="NODE", help="only this node's blocks")
    _add_output(blocks)
    blocks.set_defaults(func=run, handler=_blocks)

    node = sub.add_parser("node", help="release a node's blocks", description="Nodes.")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="{release}")
    node_release = node_sub.add_parser(
        "release", help="free the empty blocks of a node that left",
        description="Free the empty blocks of NODE in pool NAME; blocks that still hold allocations stay the "
                    "node's and are listed.")
    node_release.add_argument("name", metavar="NAME")
    node_release.add_argument("node", metavar="NODE")
    _add_output(node_release)
    node_release.set_defaults(func=run, handler=_node_release)

    watch = sub.add_parser(
        "watch", help="print a pool's allocate and release events as they happen",
        description="Print the allocate and release events of pool NAME, one line each (JSON lines with -o json), "
                    "until interrupted. When the server goes away the watch resumes where it was, missing "
                    "nothing; on Ctrl-C the resume token to continue from is printed.")
    watch.add_argument("name", metavar="NAME")
    watch.add_argument("--resume-token", metavar="TOKEN", help="continue after the event that carried this token")
    watch.add_argument("--bookmarks", action="store_true",
                       help="print bookmarks too (no change; they carry the current resume token)")
    watch.add_argument("--count", type=_positive_int, metavar="N", help="exit after N events")
    _add_output(watch)
    watch.set_defaults(func=run, handler=_watch)

    for name in ("pool", "alloc", "release", "gc", "blocks", "node", "watch"):
        _add_globals_below(sub.choices[name])


def build_parser() -> Parser:
    """The parser of the client-only ``dsipam`` command (the server's adds serve, migrate, fsck)."""
    parser = Parser(prog="dsipam", description="Dual-stack IP address management: admin commands.",
                    allow_abbrev=False)
    add_client_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the client-only ``dsipam`` command."""
    parser = build_parser()
    args = parser.parse_args(prepare_argv(sys.argv[1:] if argv is None else argv))
    result: int = args.func(args)
    return result


# -- running a command ----------------------------------------------------------------------


def _setting(args: argparse.Namespace, flag: str) -> Any:
    value = getattr(args, _dest(flag), None)
    if value is not None:
        return value
    g = next(x for x in GLOBAL_OPTIONS if x.flag == flag)
    env = os.environ.get(g.env, "")
    if not g.metavar:
        return env.lower() in ("1", "true", "yes")
    return env or None


def make_client(args: argparse.Namespace) -> IpamClient:
    """The SDK client for the connection options (flags first, then ``DSIPAM_*``)."""
    from ._channel import TlsConfig
    from ._client import IpamClient

    ca, cert, key, name = (_setting(args, f) for f in ("--ca-file", "--cert-file", "--key-file", "--server-name"))
    tls: TlsConfig | bool | None = None
    if ca or cert or key or name:
        tls = TlsConfig(ca_file=ca, cert_file=cert, key_file=key, server_name=name)
    elif _setting(args, "--tls"):
        tls = True
    timeout_text = _setting(args, "--timeout")
    timeout = 10.0
    if timeout_text is not None:
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise UsageError(f"--timeout: {timeout_text!r} is not a number of seconds") from None
        if timeout <= 0:
            raise UsageError(f"--timeout: {timeout_text} is not positive")
    token, token_file = getattr(args, _dest("--token"), None), getattr(args, _dest("--token-file"), None)
    if token is None and token_file is None:  # a token flag overrides both variables
        token, token_file = _setting(args, "--token"), _setting(args, "--token-file")
    return IpamClient(_setting(args, "--target"), tls=tls, token=token, token_file=token_file, timeout=timeout)


def _describe(err: IpamError, target: str) -> str:
    label = err.reason or err.code.name
    message = err.message
    if err.code.name == "UNAVAILABLE" and not err.reason:
        message = f"cannot reach {target}: {message}"
    after = f" (after {err.attempts} attempts)" if err.attempts > 1 else ""
    return f"{message} [{label}]{after}"


def run(args: argparse.Namespace, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Runs one admin command; returns the exit code."""
    out = stdout or sys.stdout
    err_stream = stderr or sys.stderr
    debug = bool(_setting(args, "--debug"))
    if debug:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=err_stream, format="%(name)s: %(message)s")
        logging.getLogger("dsipam.client").setLevel(logging.DEBUG)
    if getattr(args, "output", None) is None:
        args.output = _output_default()
        if args.output not in OUTPUTS:
            print(f"dsipam: error: DSIPAM_OUTPUT: {args.output!r} is not one of {', '.join(OUTPUTS)}",
                  file=err_stream)
            return EXIT_USAGE
    target = _setting(args, "--target") or os.environ.get("DSIPAM_TARGET") or "127.0.0.1:50051"
    try:
        from ._errors import IpamError

        try:
            with make_client(args) as client:
                target = client.target
                args.handler(client, args, out)
        except IpamError as exc:
            if debug:
                import traceback

                traceback.print_exc(file=err_stream)
            if exc.attempts == 0:  # found before calling the server: the command line is wrong
                print(f"dsipam: error: {exc.message}", file=err_stream)
                return EXIT_USAGE
            print(f"dsipam: {_describe(exc, target)}", file=err_stream)
            return EXIT_REFUSED
    except UsageError as exc:
        if debug:
            import traceback

            traceback.print_exc(file=err_stream)
        print(f"dsipam: error: {exc}", file=err_stream)
        return EXIT_USAGE
    except Refused as exc:
        print(f"dsipam: {exc}", file=err_stream)
        return EXIT_REFUSED
    except KeyboardInterrupt as exc:
        print(f"dsipam: {exc or 'interrupted'}", file=err_stream)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dsipam alloc list pods | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python quiet while it exits
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        print(f"dsipam: unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=err_stream)
        return EXIT_REFUSED
    return EXIT_OK


# -- the commands ---------------------------------------------------------------------------


def _control_character(text: str) -> str | None:
    """The first control character of ``text`` (newline, tab, NUL, DEL, U+2028 ...) or None."""
    import unicodedata

    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return ch
    return None


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {text!r}: expected KEY=VALUE")
        bad = _control_character(text)
        if bad is not None:  # they would break table output, one row per line
            raise UsageError(f"{flag} {text!r}: control characters such as {bad!r} are not allowed")
        out[key] = value
    return out


def _emit(args: argparse.Namespace, out: IO[str], doc: Any, text: Callable[[], str]) -> None:
    from ._output import render_document

    print(text() if args.output == "table" else render_document(doc, args.output), file=out)


def _ranges(specs: Sequence[dict[str, Any]]) -> list[Range]:
    from ._errors import InvalidArgument
    from ._types import Range

    built = []
    for i, spec in enumerate(specs):
        try:
            built.append(Range(spec["cidr"], first=spec["first"], last=spec["last"], gateway=spec["gateway"],
                               exclude=spec["exclude"], block_size=spec["block_size"]))
        except InvalidArgument as exc:
            raise UsageError(f"--range {spec['cidr']} (range {i + 1}): {exc.message}") from None
    return built


def _pool_create(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    ranges = _ranges(args.ranges)
    labels = _pairs(args.label, "--label")
    pool = client.create_pool(args.name, ranges, labels=labels, cooldown=args.cooldown,
                              node_affinity=args.node_affinity, network=args.network)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_update(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    if args.label and args.clear_labels:
        raise UsageError("--label and --clear-labels do not go together")
    labels = _pairs(args.label, "--label") if args.label else ({} if args.clear_labels else None)
    if labels is None and args.cooldown is None and args.node_affinity is None:
        raise UsageError("nothing to change: give --label, --clear-labels, --cooldown or --node-affinity")
    pool = client.update_pool(args.name, labels=labels, cooldown=args.cooldown, node_affinity=args.node_affinity)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_reserve(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    pool = client.reserve_addresses(args.name, args.addresses, force=args.force)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_unreserve(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    pool = client.unreserve_addresses(args.name, args.addresses)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_add_range(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    ranges = _ranges(args.ranges)
    pool = None
    for r in ranges:
        pool = client.add_pool_range(args.name, r)
    assert pool is not None  # --range is required
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_remove_range(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    pool = client.remove_pool_range(args.name, args.cidr)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_migrate(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import Progress, progress_doc, progress_line, render_document
    from ._types import MigrationProgress, Policy

    policy = Policy.parse(args.policy)
    table = args.output == "table"
    progress = Progress(f"migrating {args.name} to {policy.value}")
    last: MigrationProgress | None = None
    try:
        progress.update("starting", force=True)
        with client.migrate_pool(args.name, policy=policy, batch_size=args.batch_size) as stream:
            for report in stream:
                if report == last:  # the server repeats the last report as the total
                    continue
                last = report
                progress.update(progress_line(report), force=True)
                if table:
                    progress.close()
                    print(progress_line(report), file=out, flush=True)
    finally:
        progress.close()
    if last is None:  # the server ended the stream without a report
        last = MigrationProgress(0, 0, 0, 0)
    if table:
        for error in last.errors:
            print(f"  failed: {error}", file=out)
        print(f"migrated pool {args.name} to {policy.value}: {last.processed} owner(s) processed, {last.upgraded} "
              f"upgraded, {last.failed} failed", file=out)
    else:
        print(render_document(progress_doc(args.name, policy.value, last), args.output), file=out)
    if last.failed:
        shown = f"; first: {last.errors[0]}" if last.errors else ""
        raise Refused(f"migration of pool {args.name} incomplete: {last.failed} of {last.total} owner(s) failed"
                      f"{shown}")


def _pool_list(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pools_table

    pools = list(client.iter_pools(page_size=500))
    _emit(args, out, {"pools": [pool_doc(p) for p in pools]}, lambda: pools_table(pools) if pools else "no pools")


def _pool_show(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import pool_doc, pool_table

    pool = client.get_pool(args.name)
    _emit(args, out, pool_doc(pool), lambda: pool_table(pool))


def _pool_usage(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import _unicode, usage_report_doc, usage_text

    pools = [client.get_pool(args.name)] if args.name else list(client.iter_pools(page_size=500))
    _emit(args, out, usage_report_doc(pools),
          lambda: usage_text(pools, unicode=_unicode(out)) if pools else "no pools")


def _pool_delete(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    client.delete_pool(args.name, force=args.force)
    _emit(args, out, {"name": args.name, "deleted": True}, lambda: f"deleted pool {args.name}")


def _alloc_new(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import allocate_doc, allocation_table

    attributes = _pairs(args.attr, "--attr")
    result = client.allocate(args.name, args.owner, policy=args.policy, families=args.family, addresses=args.ip,
                             attributes=attributes, node=args.node)
    _emit(args, out, allocate_doc(result), lambda: allocation_table(result.allocation, created=result.created))


def _alloc_list(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import Progress, allocation_doc, allocations_table

    selector = _pairs(args.selector, "--selector")
    pool = client.get_pool(args.name)  # fails early on a missing pool, and gives the expected count
    expected = max((u.allocated for u in pool.usage if args.family in (None, u.family.value)), default=0)
    progress = Progress(f"listing allocations of {args.name}")
    items: list[Allocation] = []
    token = ""
    pages = 0
    try:
        progress.update(f"0 of about {expected}", force=True)
        while True:
            page = client.list_allocations(args.name, selector=selector, family=args.family,
                                           page_size=args.page_size, page_token=token)
            items.extend(page)
            pages += 1
            progress.update(f"{len(items)} of about {expected} ({pages} page{'s' if pages > 1 else ''})")
            token = page.next_page_token
            if not token:
                break
    finally:
        progress.close()
    _emit(
        args, out, {"pool": args.name, "allocations": [allocation_doc(a) for a in items]},
        lambda: (allocations_table(items) + f"\n({len(items)} allocation{'s' if len(items) != 1 else ''})")
        if items else f"no allocations in pool {args.name}" + (" match" if selector or args.family else ""),
    )


def _alloc_show(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import allocation_doc, allocation_table

    allocation = client.get_allocation(args.name, args.owner)
    _emit(args, out, allocation_doc(allocation), lambda: allocation_table(allocation))


def _release(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import address_doc, addresses_text

    released = client.release(args.name, args.owner, families=args.family)
    _emit(
        args, out,
        {"pool": args.name, "owner": args.owner, "released": [address_doc(a) for a in released]},
        lambda: f"released {addresses_text(released)} held by {args.owner} in {args.name}" if released
        else f"{args.owner} held nothing to release in {args.name}",
    )


def _gc(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import allocation_doc, allocations_table

    keep = list(args.keep)
    if args.keep_file:
        try:
            text = sys.stdin.read() if args.keep_file == "-" else open(args.keep_file).read()  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"--keep-file: cannot read {args.keep_file!r}: {exc.strerror}") from None
        keep += [line.strip() for line in text.splitlines() if line.strip()]
    elif not keep:
        raise UsageError("name the live owners with --keep or --keep-file (with none, every allocation older than "
                         "the grace period is released; say --keep-file /dev/null to mean that)")
    released = client.garbage_collect(args.name, keep, grace=args.grace, node=args.node,
                                      selector=_pairs(args.selector, "--selector"))
    _emit(
        args, out, {"pool": args.name, "released": [allocation_doc(a) for a in released]},
        lambda: (allocations_table(released) + f"\nreleased {len(released)} allocation(s)") if released
        else "released nothing",
    )


def _blocks(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import block_doc, blocks_table

    blocks: list[Block] = list(client.iter_blocks(args.name, node=args.node, page_size=500))
    whose = f" of node {args.node}" if args.node else ""
    _emit(
        args, out, {"pool": args.name, "node": args.node, "blocks": [block_doc(b) for b in blocks]},
        lambda: blocks_table(blocks) if blocks else f"no blocks{whose} in pool {args.name}",
    )


def _node_release(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    from ._output import release_node_doc, release_node_text

    result = client.release_node(args.name, args.node)
    _emit(args, out, release_node_doc(args.name, args.node, result),
          lambda: release_node_text(args.name, args.node, result))


def _watch(client: IpamClient, args: argparse.Namespace, out: IO[str]) -> None:
    import logging

    from ._output import event_doc, event_line, to_json_line, to_yaml

    client.get_pool(args.name)  # a missing pool or an unreachable server fails now, within --timeout
    # Resumptions after the server went away are worth a line on stderr.
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("dsipam: %(message)s"))
    notes.setLevel(logging.INFO)
    logger = logging.getLogger("dsipam.client")
    logger.addHandler(notes)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    stream = None
    seen = 0
    try:
        stream = client.follow_allocations(args.name, resume_token=args.resume_token, bookmarks=args.bookmarks)
        with stream as events:
            for event in events:
                if args.output == "json":
                    text = to_json_line(event_doc(event))
                elif args.output == "yaml":
                    text = "---\n" + to_yaml(event_doc(event))
                else:
                    text = event_line(event)
                print(text, file=out, flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    return
    except KeyboardInterrupt:
        token = stream.resume_token if stream is not None else args.resume_token
        raise KeyboardInterrupt(f"interrupted; resume with --resume-token {token}" if token
                                else "interrupted") from None
    finally:
        logger.removeHandler(notes)
