"""``dsipam controller``: flags and DSIPAM_CONTROLLER_* settings (a flag wins over its variable)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# (flag, env, type, default, help)
_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], Any, str], ...] = (
    ("--kubeconfig", "KUBECONFIG", str, None, "kubeconfig file; unset: the in-cluster ServiceAccount"),
    ("--namespace", "DSIPAM_CONTROLLER_NAMESPACE", str, None,
     "namespace of the Lease (default: POD_NAMESPACE, the ServiceAccount's namespace, or default)"),
    ("--lease-name", "DSIPAM_CONTROLLER_LEASE_NAME", str, "dsipam-controller", "name of the Lease"),
    ("--identity", "DSIPAM_CONTROLLER_IDENTITY", str, None, "this replica's name in the Lease "
     "(default: POD_NAME, else host_pid)"),
    ("--lease-duration", "DSIPAM_CONTROLLER_LEASE_DURATION", float, 15.0,
     "seconds a Lease holds without renewal; a standby takes over after it"),
    ("--renew-deadline", "DSIPAM_CONTROLLER_RENEW_DEADLINE", float, 10.0,
     "seconds the leader keeps acting without a successful renewal"),
    ("--retry-period", "DSIPAM_CONTROLLER_RETRY_PERIOD", float, 2.0, "seconds between Lease renewals and tries"),
    ("--grace", "DSIPAM_CONTROLLER_GRACE", float, 60.0,
     "seconds an allocation of a gone pod or node is kept before it is released"),
    ("--resync-interval", "DSIPAM_CONTROLLER_RESYNC_INTERVAL", float, 300.0, "seconds between full resyncs"),
    ("--status-interval", "DSIPAM_CONTROLLER_STATUS_INTERVAL", float, 30.0,
     "seconds between IPPool status (usage) refreshes"),
    ("--release-timeout", "DSIPAM_CONTROLLER_RELEASE_TIMEOUT", float, 5.0,
     "seconds the leader tries to give the Lease up on shutdown before it exits anyway"),
    ("--listen", "DSIPAM_CONTROLLER_LISTEN", str, "0.0.0.0:8080", "host:port of /metrics, /healthz and /readyz"),
    ("--watch-timeout", "DSIPAM_CONTROLLER_WATCH_TIMEOUT", int, 300,
     "seconds a watch request lasts before it is renewed from its resourceVersion"),
    ("--cluster-id", "DSIPAM_CONTROLLER_CLUSTER_ID", str, None,
     "this cluster's name in dsipam: the k8s.cluster attribute of its Service allocations and the "
     "ipam.dsipam.io/cluster label of its pools (default: the UID of the kube-system Namespace)"),
    ("--lb-class", "DSIPAM_CONTROLLER_LB_CLASS", str, "ipam.dsipam.io/lb",
     "spec.loadBalancerClass of the LoadBalancer Services that get addresses from dsipam"),
    ("--lb-default-implementation", "DSIPAM_CONTROLLER_LB_DEFAULT_IMPLEMENTATION", boolean, False,
     "true: LoadBalancer Services without a class too (dsipam is the cluster's default implementation)"),
    ("--lb-default-pool", "DSIPAM_CONTROLLER_LB_DEFAULT_POOL", str, None,
     "pool of the LoadBalancer Services that name none (default: the IPPool marked spec.services: Default)"),
    ("--lb-concurrency", "DSIPAM_CONTROLLER_LB_CONCURRENCY", int, 16, "LoadBalancer Services reconciled at once"),
    ("--log-level", "DSIPAM_LOG_LEVEL", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("--log-format", "DSIPAM_LOG_FORMAT", str, "text", "text or json"),
)

_LB_CLASS = re.compile(r"(?=.{1,253}/)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_POOL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _dest(flag: str) -> str:
    return "controller_" + flag.lstrip("-").replace("-", "_")


def add_controller_command(sub: Any) -> None:
    """Adds ``controller`` to the ``dsipam`` command's subparsers."""
    p = sub.add_parser("controller", help="run the Kubernetes controller (IPPool, pod-leak and node reconciliation)",
                       description="Runs the Kubernetes controller; see docs/kubernetes.md. It reaches dsipam "
                                   "with the connection options (--target, --token-file, ... / DSIPAM_TARGET, ...).")
    for flag, env, _, default, text in _OPTIONS:
        p.add_argument(flag, dest=_dest(flag), help=f"{text} (env {env}" + (f"; default {default})" if default
                                                                              is not None else ")"))
    _add_connection_options(p)
    p.set_defaults(func=cmd_controller)


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    """The admin commands' connection options (and --debug), after ``controller`` too. SUPPRESS as
    default: a value given before the subcommand is kept when none is given after it."""
    from dsipam.client._cli import GLOBAL_OPTIONS
    from dsipam.client._cli import _dest as client_dest

    group = p.add_argument_group("connection options (before or after 'controller')")
    for g in GLOBAL_OPTIONS:
        text = f"{g.help} (env {g.env}{'=1' if not g.metavar else ''})"
        if g.flag == "--debug":
            text = f"print tracebacks; log at DEBUG unless --log-level is given (env {g.env}=1)"
        if g.metavar:
            group.add_argument(g.flag, dest=client_dest(g.flag), metavar=g.metavar, default=argparse.SUPPRESS,
                               help=text)
        else:
            group.add_argument(g.flag, dest=client_dest(g.flag), action="store_true", default=argparse.SUPPRESS,
                               help=text)


def settings_from(args: argparse.Namespace) -> Any:
    from ._controller import Settings, default_namespace

    values: dict[str, Any] = {}
    explicit_level = getattr(args, _dest("--log-level"), None) or os.environ.get("DSIPAM_LOG_LEVEL") or None
    for flag, env, conv, default, _ in _OPTIONS:
        raw = getattr(args, _dest(flag), None)
        source = flag
        if raw is None and os.environ.get(env):
            raw, source = os.environ[env], env
        if raw is None:
            values[flag] = default
            continue
        try:
            value = conv(raw)
        except ValueError:
            kind = "true or false" if conv is boolean else f"a {conv.__name__}"
            raise SystemExit(f"dsipam controller: {source}: {raw!r} is not {kind}") from None
        if conv in (float, int) and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"dsipam controller: {source}: {raw} is not a finite number >= 0")
        values[flag] = value
    if explicit_level is None and _debug(args):  # --debug: the retry attempts and other DEBUG lines too
        values["--log-level"] = "DEBUG"
    if values["--log-format"] not in ("text", "json"):
        raise SystemExit(f"dsipam controller: --log-format: {values['--log-format']!r} is not text or json")
    s = Settings(
        kubeconfig=values["--kubeconfig"], namespace=values["--namespace"] or default_namespace(),
        lease_name=values["--lease-name"], identity=values["--identity"] or os.environ.get("POD_NAME", ""),
        lease_duration=values["--lease-duration"], renew_deadline=values["--renew-deadline"],
        retry_period=values["--retry-period"], grace=values["--grace"], resync_interval=values["--resync-interval"],
        status_interval=values["--status-interval"], listen=values["--listen"],
        watch_timeout=values["--watch-timeout"], release_timeout=values["--release-timeout"],
        lb_class=values["--lb-class"], lb_default_implementation=values["--lb-default-implementation"],
        lb_default_pool=values["--lb-default-pool"] or "", lb_concurrency=values["--lb-concurrency"],
        cluster_id=values["--cluster-id"] or "",
    )
    if s.cluster_id and not _CLUSTER_ID.fullmatch(s.cluster_id):
        raise SystemExit(f"dsipam controller: --cluster-id: {s.cluster_id[:80]!r} is not 1-63 letters, digits, "
                         "'-', '_' or '.' starting and ending with a letter or digit (a label value)")
    if not _LB_CLASS.fullmatch(s.lb_class) or len(s.lb_class.rsplit("/", 1)[-1]) > 63:
        raise SystemExit(f"dsipam controller: --lb-class: {s.lb_class[:80]!r} is not a qualified name such as "
                         "ipam.dsipam.io/lb (a DNS subdomain, '/', a name of 1-63 characters)")
    if s.lb_default_pool and not _POOL.fullmatch(s.lb_default_pool):
        raise SystemExit(f"dsipam controller: --lb-default-pool: {s.lb_default_pool[:80]!r} is not a pool name "
                         "(a lowercase DNS label)")
    if not 1 <= s.lb_concurrency <= 1024:
        raise SystemExit(f"dsipam controller: --lb-concurrency: {s.lb_concurrency} is not 1-1024")
    if not 0 < s.retry_period < s.renew_deadline < s.lease_duration:
        raise SystemExit("dsipam controller: need 0 < --retry-period < --renew-deadline < --lease-duration "
                         f"(got {s.retry_period}, {s.renew_deadline}, {s.lease_duration})")
    if s.resync_interval <= 0 or s.status_interval <= 0 or s.watch_timeout <= 0 or s.release_timeout <= 0:
        raise SystemExit("dsipam controller: --resync-interval, --status-interval, --watch-timeout and "
                         "--release-timeout must be positive")
    return s, values["--log-level"].upper(), values["--log-format"]


def _debug(args: argparse.Namespace) -> bool:
    if getattr(args, "client_debug", None):
        return True
    return os.environ.get("DSIPAM_DEBUG", "").lower() in ("1", "true", "yes")


def cmd_controller(args: argparse.Namespace) -> int:
    from ._controller import serve

    settings, level, fmt = settings_from(args)
    try:
        from dsipam.server.observability import setup_logging

        setup_logging(level, fmt)
    except ImportError:  # the SDK without the server: plain logging
        import logging

        logging.basicConfig(level=level, stream=sys.stderr)

    async def main() -> int:
        try:  # the gRPC aio channel belongs to the running loop: made here
            ipam = make_async_client(args)
        except Exception as exc:  # noqa: BLE001 - a bad connection option: one line
            raise SystemExit(f"dsipam controller: {exc}") from None
        return await serve(settings, ipam)

    return asyncio.run(main())


def make_async_client(args: argparse.Namespace) -> Any:
    """The async SDK client for the connection options (flags first, then DSIPAM_*), as ``make_client``."""
    from dsipam.client import AsyncIpamClient
    from dsipam.client._channel import TlsConfig
    from dsipam.client._cli import _dest as client_dest
    from dsipam.client._cli import _setting

    ca, cert, key, name = (_setting(args, f) for f in ("--ca-file", "--cert-file", "--key-file", "--server-name"))
    tls: Any = None
    if ca or cert or key or name:
        tls = TlsConfig(ca_file=ca, cert_file=cert, key_file=key, server_name=name)
    elif _setting(args, "--tls"):
        tls = True
    timeout_text = _setting(args, "--timeout")
    timeout = float(timeout_text) if timeout_text is not None else 10.0
    token, token_file = getattr(args, client_dest("--token"), None), getattr(args, client_dest("--token-file"), None)
    if token is None and token_file is None:
        token, token_file = _setting(args, "--token"), _setting(args, "--token-file")
    return AsyncIpamClient(_setting(args, "--target"), tls=tls, token=token, token_file=token_file, timeout=timeout)
