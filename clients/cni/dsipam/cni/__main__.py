"""Entry point of the ``dsipam-cni`` executable (and of ``python -m dsipam.cni``).

Run by a container runtime (``CNI_COMMAND`` set, no arguments) it is the CNI IPAM plugin.
``dsipam-cni install DIR`` writes the fast launcher ``DIR/dsipam-cni`` and the link ``DIR/dsipam``.
Nothing is imported here beyond what the command at hand needs.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the plugin, or the ``install`` subcommand; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        from ._install import cli

        return cli(args)
    import os

    from ._plugin import run

    try:
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError:
        stdin = b""
    code, out = run(os.environ, stdin)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
