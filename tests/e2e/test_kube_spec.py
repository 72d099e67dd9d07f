"""Hypothesis over the controller's input paths: IPPool specs (through the real API server's schema
and CEL rules, then the controller's own parsing) and its settings (flags and DSIPAM_CONTROLLER_*)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kube import ApiServer, install_controller_manifests
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import InvalidArgument
from dsipam.kube._ippool import desired_ranges, parse_duration
from dsipam.kube.cli import add_controller_command, settings_from

G, V, P = "ipam.dsipam.io", "v1alpha1", "ippools"

cidr_text = st.one_of(
    st.builds(lambda a, p: str(ipaddress.ip_network(f"198.18.{a}.0/{p}", strict=False)), st.integers(0, 255),
              st.integers(16, 30)),
    st.builds(lambda a, p: f"fd00:{a:x}::/{p}", st.integers(0, 0xFFFF), st.integers(96, 126)),
    st.builds(lambda a, p: f"198.18.0.{a}/{p}", st.integers(0, 255), st.integers(0, 40)),  # host bits, bad prefix
    st.text(max_size=20),
)
addr_text = st.one_of(st.builds(lambda a: f"198.18.{a}.1", st.integers(0, 255)), st.just("fd00::5"),
                      st.text(max_size=12))
duration_text = st.one_of(st.builds(lambda n, u: f"{n}{u}", st.integers(0, 200), st.sampled_from(["ms", "s", "m", "h"])),
                          st.text(max_size=10))
range_obj = st.fixed_dictionaries({"cidr": cidr_text}, optional={
    "first": addr_text, "last": addr_text, "gateway": addr_text, "exclude": st.lists(addr_text, max_size=3),
    "blockSize": st.integers(-1, 70000)})
spec_obj = st.fixed_dictionaries({"ranges": st.lists(range_obj, max_size=3)}, optional={
    "cooldown": duration_text, "nodeAffinity": st.sampled_from(["Borrow", "Strict", "borrow", "x"])})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=spec_obj)
def test_accepted_specs_parse_and_rejected_ones_name_a_field(kube_api: ApiServer, tmp_path: Path, spec: dict) -> None:
    async def check() -> None:
        await install_controller_manifests(kube_api, tmp_path)
        async with kube_api.api_client() as api:
            custom = client.CustomObjectsApi(api)
            body = {"apiVersion": f"{G}/{V}", "kind": "IPPool", "metadata": {"name": "hypo"}, "spec": spec}
            try:
                await custom.create_cluster_custom_object(G, V, P, body)
            except ApiException as exc:
                assert exc.status == 422, exc.body
                assert "spec." in exc.body, exc.body
                return
            try:
                # Accepted by the API server: the controller's parsing agrees, or says which field is wrong
                # in words that dsipam would use (never a crash).
                try:
                    ranges = desired_ranges(spec)
                    assert len(ranges) == len(spec["ranges"]) >= 1
                    for r, raw in zip(ranges, spec["ranges"], strict=True):
                        assert r.cidr == ipaddress.ip_network(raw["cidr"])
                except InvalidArgument as exc:
                    assert "spec.ranges[" in str(exc)
                if "cooldown" in spec:
                    assert 0 <= parse_duration(spec["cooldown"]) <= 86400
            finally:
                await custom.delete_cluster_custom_object(G, V, P, "hypo")

    asyncio.run(check())


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_parse_duration_is_total(text: str) -> None:
    try:
        value = parse_duration(text)
    except InvalidArgument as exc:
        assert "spec.cooldown" in str(exc)
    else:
        assert value >= 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_controller_command(p.add_subparsers(dest="command"))
    return p


FLAGS = ["--grace", "--resync-interval", "--status-interval", "--lease-duration", "--renew-deadline",
         "--retry-period", "--watch-timeout", "--log-format", "--listen", "--release-timeout", "--lb-class",
         "--lb-default-implementation", "--lb-default-pool", "--lb-concurrency", "--cluster-id"]


@settings(max_examples=200, deadline=None)
@given(flag=st.sampled_from(FLAGS), value=st.one_of(st.sampled_from(["nan", "inf", "1e400", "0", " 5 ", "1_0"]),
                                                     st.text(max_size=12)).filter(lambda v: not v.startswith("-")))
def test_settings_accept_or_name_the_flag(flag: str, value: str) -> None:
    args = _parser().parse_args(["controller", flag, value])
    try:
        s, level, fmt = settings_from(args)
    except SystemExit as exc:
        message = str(exc.code)
        assert message.startswith("dsipam controller: ") and (flag in message or "--" in message), message
    else:
        assert 0 < s.retry_period < s.renew_deadline < s.lease_duration
        assert fmt in ("text", "json")
        for number in (s.grace, s.resync_interval, s.status_interval, s.lease_duration):
            assert math.isfinite(number) and number >= 0


def test_environment_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSIPAM_CONTROLLER_GRACE", "7.5")
    monkeypatch.setenv("DSIPAM_CONTROLLER_NAMESPACE", "ipam")
    args = _parser().parse_args(["controller", "--resync-interval", "9"])
    s, _, _ = settings_from(args)
    assert (s.grace, s.namespace, s.resync_interval) == (7.5, "ipam", 9.0)
    monkeypatch.setenv("DSIPAM_CONTROLLER_GRACE", "soon")
    with pytest.raises(SystemExit, match="DSIPAM_CONTROLLER_GRACE"):
        settings_from(_parser().parse_args(["controller"]))


def test_deployment_speaks_the_controllers_settings() -> None:
    """deploy/kubernetes/controller.yaml's Deployment runs `dsipam controller` with variables it
    reads, probes paths it serves, on the port it listens on."""
    import yaml
    from kube import DEPLOY

    from dsipam.client._cli import GLOBAL_OPTIONS
    from dsipam.kube.cli import _OPTIONS

    docs = [d for d in yaml.safe_load_all((DEPLOY / "controller.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    container = pod["containers"][0]
    assert container["args"] == ["controller"]
    known = {env for _, env, *_ in _OPTIONS} | {g.env for g in GLOBAL_OPTIONS} | {"POD_NAME", "POD_NAMESPACE"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= known, set(env) - known
    port = int(env["DSIPAM_CONTROLLER_LISTEN"].rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in ("DSIPAM_TOKEN_FILE", "DSIPAM_CA_FILE"):
        assert any(env[var].startswith(m + "/") for m in mounts), var
    # The Lease Role names the controller's default Lease.
    role = next(d for d in docs if d["kind"] == "Role")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named[0]["resourceNames"] == ["dsipam-controller"]


def test_docs_name_every_metric_and_setting() -> None:
    """docs/kubernetes.md stays true: each metric the controller defines and each of its settings."""
    from kube import DEPLOY

    from dsipam.kube._metrics import Metrics
    from dsipam.kube.cli import _OPTIONS

    doc = (DEPLOY.parent.parent / "docs" / "kubernetes.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    assert names, "no metrics?"
    for name in names:
        base = name.removeprefix("dsipam_controller_")
        assert f"dsipam_controller_{base}" in doc or f"..._{base}" in doc, name
    for flag, env, *_ in _OPTIONS:
        assert f"`{flag}`" in doc and f"`{env}`" in doc, flag


def test_connection_options_after_controller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`dsipam controller --target X --token-file F --debug` works as `dsipam --target X ... controller`
    (as the admin commands take them), the one after the subcommand wins, and its --help lists them."""
    from dsipam.kube.cli import make_async_client
    from dsipam.server.cli import build_parser

    for var in ("DSIPAM_TARGET", "DSIPAM_TOKEN_FILE", "DSIPAM_DEBUG", "DSIPAM_LOG_LEVEL", "DSIPAM_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    parser = build_parser()
    after = parser.parse_args(["controller", "--target", "198.18.0.9:50051", "--token-file", str(token),
                               "--timeout", "3", "--debug", "--grace", "5"])
    assert (after.client_target, after.client_token_file, after.client_timeout, after.client_debug) == (
        "198.18.0.9:50051", str(token), "3", True)
    s, level, _ = settings_from(after)
    assert s.grace == 5.0 and level == "DEBUG"  # --debug logs the retry attempts too
    before = parser.parse_args(["--target", "198.18.0.8:1", "controller", "--log-level", "warning"])
    assert before.client_target == "198.18.0.8:1" and not before.client_debug
    assert settings_from(before)[1] == "WARNING"
    both = parser.parse_args(["--target", "198.18.0.8:1", "controller", "--target", "198.18.0.9:2"])
    assert both.client_target == "198.18.0.9:2"
    explicit = parser.parse_args(["controller", "--debug", "--log-level", "info"])
    assert settings_from(explicit)[1] == "INFO"

    async def target_of(args: argparse.Namespace) -> str:
        c = make_async_client(args)
        try:
            return str(c.target)
        finally:
            await c.close()

    assert "198.18.0.9:50051" in asyncio.run(target_of(after))
    with pytest.raises(SystemExit):
        parser.parse_args(["controller", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--target", "--token-file", "--tls", "--ca-file", "--timeout", "--debug"):
        assert flag in help_text, flag


def test_docs_ippool_example_is_meaningful() -> None:
    """docs/kubernetes.md's IPPool example: each range's gateway and excludes lie inside its first-last
    (an exclude outside them would exclude nothing), and the controller's own parsing accepts it."""
    import yaml
    from kube import DEPLOY

    doc = (DEPLOY.parent.parent / "docs" / "kubernetes.md").read_text()
    block = doc.split("## IPPool reference", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    obj = yaml.safe_load(block)
    assert obj["kind"] == "IPPool"
    for r in obj["spec"]["ranges"]:
        net = ipaddress.ip_network(r["cidr"])
        first = ipaddress.ip_address(r.get("first", net[0]))
        last = ipaddress.ip_address(r.get("last", net[-1]))
        for entry in r.get("exclude", []):
            ex = ipaddress.ip_network(entry, strict=True)
            assert first <= ex[0] and ex[-1] <= last, (entry, str(first), str(last))
    assert desired_ranges(obj["spec"])
