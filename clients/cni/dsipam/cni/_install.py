"""``dsipam-cni install DIR``: puts the plugin where a runtime's CNI_PATH finds it.

It writes ``DIR/dsipam-cni``, a launcher that starts this Python with ``-IS`` (no site
initialisation: the editable-install finder and ``.pth`` processing alone cost ~15 ms) and the
package's own directory on ``sys.path``, and the link ``DIR/dsipam`` so that
``"ipam": {"type": "dsipam"}`` finds it. The launcher ends the process without the
interpreter's finalization once the output is flushed (``__main__.exit_now``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NAMES = ("dsipam-cni", "dsipam")

LAUNCHER = """#!{python} -IS
# dsipam CNI IPAM plugin, written by `dsipam-cni install`. Regenerate rather than edit.
import sys
sys.path[:0] = {paths!r}
from dsipam.cni.__main__ import exit_now, main
exit_now(main([]))
"""


def package_root() -> str:
    """The sys.path entry that holds this ``dsipam/cni`` package."""
    return str(Path(__file__).resolve().parent.parent.parent)


def launcher_text(python: str | None = None) -> str:
    """The launcher script for ``python`` (default: this interpreter)."""
    python = python or sys.executable
    if len(python) > 200 or any(c.isspace() for c in python):
        raise ValueError(f"--python: {python!r} cannot go in a #! line (too long or contains spaces)")
    return LAUNCHER.format(python=python, paths=[package_root()])


def compiled_plugin(path: str) -> bytes:
    """The contents of a compiled plugin (``scripts/build-cni``); raises ValueError when ``path``
    is not an executable ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x7fELF") or not os.access(path, os.X_OK):
        raise ValueError(f"--compiled: {path!r} is not an executable ELF file (build one with scripts/build-cni)")
    return data


def install(directory: str | os.PathLike[str], python: str | None = None, compiled: str | None = None) -> list[Path]:
    """Writes the launcher (or a copy of the ``compiled`` plugin) and the ``dsipam`` link into
    ``directory``; returns both paths.

    Each file is replaced atomically, so a runtime never runs a half-written plugin.
    """
    # A bad --python or --compiled fails before anything is created.
    data = compiled_plugin(compiled) if compiled else launcher_text(python).encode()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    launcher = target / NAMES[0]
    tmp = target / f".{NAMES[0]}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, launcher)
    link = target / NAMES[1]
    tmp_link = target / f".{NAMES[1]}.{os.getpid()}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(NAMES[0])
    os.replace(tmp_link, link)
    return [launcher, link]


DESCRIPTION = """\
Without arguments, and with CNI_COMMAND set, dsipam-cni is the CNI IPAM plugin that a
container runtime runs. "dsipam-cni install DIR" writes DIR/dsipam-cni (the plugin's
launcher) and DIR/dsipam (a link to it); put DIR on the runtime's CNI_PATH. With
--compiled BINARY, DIR/dsipam-cni is a copy of the compiled plugin (scripts/build-cni).
"""


def _parser():  # type: ignore[no-untyped-def]
    import argparse

    parser = argparse.ArgumentParser(prog="dsipam-cni", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{install}")
    install_parser = sub.add_parser("install", help="write the plugin into DIR",
                                    description="Write DIR/dsipam-cni and the link DIR/dsipam (DIR is created "
                                                "if need be). A DIR that starts with '-' goes after '--'.")
    install_parser.add_argument("directory", metavar="DIR", help="the directory, such as /opt/cni/bin")
    install_parser.add_argument("--python", metavar="PATH",
                                help="the interpreter the launcher runs (default: this one, %(default)s)",
                                default=sys.executable)
    install_parser.add_argument("--compiled", metavar="BINARY",
                                help="install this compiled plugin (scripts/build-cni) instead of the launcher")
    parser.set_defaults(install_parser=install_parser)
    return parser


def cli(args: list[str]) -> int:
    """``dsipam-cni install [--python PATH] DIR`` and ``--help``: 0, or 2 for a wrong command line."""
    try:
        parser = _parser()
        ns, extra = parser.parse_known_args(args)
        if extra:  # said by the install parser, with its usage (the top level's would be no help)
            ns.install_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        paths = install(ns.directory, ns.python, ns.compiled)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"dsipam-cni install: {exc}\n")
        return 1
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0
