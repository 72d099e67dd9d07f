"""Entry point of the ``dsipam-cni`` executable (and of ``python -m dsipam.cni``).

Run by a container runtime (``CNI_COMMAND`` set, no arguments) it is the CNI IPAM plugin.
``dsipam-cni install DIR`` writes the fast launcher ``DIR/dsipam-cni`` and the link ``DIR/dsipam``.
Nothing is imported here beyond what the command at hand needs.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the plugin, or the ``install`` subcommand; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        from ._install import cli

        return cli(args)
    from ._plugin import MAX_CONFIG, run

    try:  # one byte more than the plugin takes, so that it can tell the configuration is too large
        stdin = sys.stdin.buffer.read(MAX_CONFIG + 1) if sys.stdin is not None else b""
    except OSError:
        stdin = b""
    code, out = run(environment(), stdin)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    return code


def exit_now(code: int) -> None:
    """Ends the process with ``code`` once stdout and stderr are flushed, without the interpreter's
    finalization (~2 ms of CPU tearing down modules that a one-shot plugin never needs again).

    Nothing is lost: the output is flushed here (a failing flush raises as usual), the plugin
    closes its connection itself and registers no ``atexit`` handlers, and the kernel closes the
    rest. The runtime waits for the plugin's exit before it goes on, so this is the plugin's
    wall time, and the bridge plugin's, too (docs/cni.md, "Start-up").
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    import posix

    posix._exit(code)


def environment() -> dict[str, str]:
    """The process environment, read through ``posix``: importing ``os`` costs ~1 ms per run."""
    os = sys.modules.get("os")
    if os is not None:
        return dict(os.environ)
    import posix

    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in posix.environ.items()}


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a subcommand (install): an ordinary exit
        sys.exit(main())
    exit_now(main())
