"""The CNI DaemonSet's installer (deploy/docker/install-cni.sh) on a fake node root.

The node is a temporary directory; the runtime bundle is the interpreter that runs the
tests (python/) with a site-packages directory of our choosing, laid out as the image's
cni-bundle stage lays it out. The conflist template is the one in deploy/kubernetes/cni.yaml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "docker" / "install-cni.sh"
WRAPPER = ROOT / "deploy" / "docker" / "dsipam-cni.sh"
MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"

STUB_PLUGIN = """\
import json, os, sys
print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"],
                  "command": os.environ.get("CNI_COMMAND"), "stdin": sys.stdin.read(),
                  "executable": sys.executable, "prefix": sys.prefix}))
"""


def _template() -> str:
    for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "cni.yaml").read_text()):
        if doc and doc["kind"] == "ConfigMap":
            return doc["data"]["conflist.template"]
    raise AssertionError("no ConfigMap in cni.yaml")


def _bundle(tmp: Path, site_packages: Path | None = None) -> Path:
    """A bundle like the image's: python/ (bin/python3.X, lib/) and site-packages/."""
    if MINOR != "3.11":
        pytest.skip("the wrapper runs python3.11, the image's interpreter")
    bundle = tmp / "bundle"
    (bundle / "python" / "bin").mkdir(parents=True)
    (bundle / "python" / "bin" / f"python{MINOR}").symlink_to(Path(sys.executable).resolve())
    (bundle / "python" / "lib").symlink_to(Path(sysconfig.get_config_var("LIBDIR")), target_is_directory=True)
    if site_packages is None:
        site_packages = bundle / "site-packages"
        (site_packages / "dsipam" / "cni").mkdir(parents=True)
        (site_packages / "dsipam" / "cni" / "__main__.py").write_text(STUB_PLUGIN)
    else:
        (bundle / "site-packages").symlink_to(site_packages, target_is_directory=True)
    return bundle


def _install(tmp: Path, bundle: Path, template: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    tpl = tmp / "conflist.template"
    tpl.write_text(_template() if template is None else template)
    full = {
        "PATH": os.environ["PATH"],
        "DSIPAM_CNI_HOST_ROOT": str(tmp / "node"),
        "DSIPAM_CNI_BUNDLE_SRC": str(bundle),
        "DSIPAM_CNI_WRAPPER_SRC": str(WRAPPER),
        "DSIPAM_CNI_TEMPLATE": str(tpl),
        "DSIPAM_CNI_CREDENTIALS": str(tmp / "no-credentials"),
        "NODE_NAME": "node-a",
        **env,
    }
    return subprocess.run(["sh", str(INSTALL), "--once"], env=full, capture_output=True, text=True, timeout=120)


def _run_plugin(node: Path, command: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """Runs the installed wrapper as the runtime would, with the bundle path mapped into the fake root."""
    wrapper = (node / "opt/cni/bin/dsipam-cni").read_text().replace("'/opt/dsipam-cni/", f"'{node}/opt/dsipam-cni/")
    runnable = node / "dsipam-cni.local"
    runnable.write_text(wrapper)
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_PATH": str(node / "opt/cni/bin")}
    return subprocess.run(["sh", str(runnable)], input=stdin, env=env, capture_output=True, text=True, timeout=60)


def test_installs_runtime_plugin_and_dual_stack_conflist(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    done = _install(tmp_path, bundle, DSIPAM_SERVICE_HOST="fd00::53", DSIPAM_SERVICE_PORT_GRPC="50051")
    assert done.returncode == 0, done.stderr
    node = tmp_path / "node"
    plugin = node / "opt/cni/bin/dsipam-cni"
    assert os.access(plugin, os.X_OK)
    assert os.readlink(node / "opt/cni/bin/dsipam") == "dsipam-cni"  # "type": "dsipam" finds it
    assert "'/opt/dsipam-cni/current'" in plugin.read_text()  # the node's path, not the container's
    current = node / "opt/dsipam-cni/current"
    assert current.is_symlink() and (current / "site-packages/dsipam/cni/__main__.py").exists()
    conflist = json.loads((node / "etc/cni/net.d/90-dsipam.conflist").read_text())
    ipam = conflist["plugins"][0]["ipam"]
    assert ipam["endpoint"] == "[fd00::53]:50051"  # an IPv6 ClusterIP gets brackets
    assert ipam["pool"] == "pods" and ipam["type"] == "dsipam" and ipam["node"] == "node-a"
    assert conflist["cniVersion"] == "1.0.0"
    assert not [p.name for p in (node / "etc/cni/net.d").iterdir() if p.name.startswith(".")]  # no temporary files
    assert "VERSION:" in done.stderr
    # The installed wrapper runs the bundle's interpreter with the bundle's packages and passes CNI_* through.
    ran = _run_plugin(node, "VERSION", '{"cniVersion":"1.0.0"}')
    assert ran.returncode == 0, ran.stderr
    reply = json.loads(ran.stdout)
    assert reply["command"] == "VERSION" and reply["stdin"] == '{"cniVersion":"1.0.0"}'
    assert reply["prefix"] == str(node / "opt/dsipam-cni/current/python")


def test_reinstall_swaps_runtime_and_keeps_two_versions(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    for _ in range(3):
        done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_POOL="blue")
        assert done.returncode == 0, done.stderr
    runtime = tmp_path / "node/opt/dsipam-cni"
    versions = sorted(p.name for p in runtime.iterdir() if p.name.startswith("v"))
    assert len(versions) == 2
    assert os.readlink(runtime / "current") == versions[-1]
    conflist = json.loads((tmp_path / "node/etc/cni/net.d/90-dsipam.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["endpoint"] == "198.18.0.10:50051"
    assert conflist["plugins"][0]["ipam"]["pool"] == "blue"


def test_values_are_escaped_into_json(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_POOL='we"ird|&\\pool')
    assert done.returncode == 0, done.stderr
    conflist = json.loads((tmp_path / "node/etc/cni/net.d/90-dsipam.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["pool"] == 'we"ird|&\\pool'


@pytest.mark.parametrize(
    ("template", "env", "message"),
    [
        ('{"cniVersion": "@CNI_VERSION@", "plugins": [', {"DSIPAM_CNI_SERVER": "198.18.0.10:50051"}, "not valid JSON"),
        (None, {}, "DSIPAM_CNI_SERVER is not set"),
        (None, {"DSIPAM_CNI_SERVER": "no-port"}, "is not host:port"),
        (
            None,
            {"DSIPAM_CNI_SERVER": "198.18.0.10:50051", "DSIPAM_CNI_CONFLIST_NAME": "x.conf"},
            "must end in .conflist",
        ),
    ],
)
def test_bad_settings_fail_without_writing_a_conflist(tmp_path: Path, template, env, message) -> None:  # type: ignore[no-untyped-def]
    bundle = _bundle(tmp_path)
    done = _install(tmp_path, bundle, template, **env)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    conf_dir = tmp_path / "node/etc/cni/net.d"
    assert not conf_dir.exists() or not list(conf_dir.iterdir())


def test_broken_runtime_fails_the_install(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    (bundle / "site-packages/dsipam/cni/__main__.py").write_text("raise SystemExit('plugin is broken')\n")
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
    assert done.returncode != 0 and "failed its VERSION command" in done.stderr and "plugin is broken" in done.stderr


def _with_compiled(bundle: Path, compiled_plugin: Path) -> Path:
    """The bundle with the compiled plugin in bin/, as the image's cni-bundle stage copies it."""
    (bundle / "bin").mkdir()
    shutil.copy2(compiled_plugin, bundle / "bin" / "dsipam-cni")
    return bundle


def test_the_compiled_plugin_is_installed_when_the_bundle_has_it(tmp_path: Path, compiled_plugin: Path) -> None:
    bundle = _with_compiled(_bundle(tmp_path), compiled_plugin)
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
    assert done.returncode == 0, done.stderr
    assert "dsipam-cni, compiled" in done.stderr and "VERSION:" in done.stderr
    bin_dir = tmp_path / "node/opt/cni/bin"
    assert (bin_dir / "dsipam-cni").read_bytes() == compiled_plugin.read_bytes()
    assert os.access(bin_dir / "dsipam-cni", os.X_OK) and os.readlink(bin_dir / "dsipam") == "dsipam-cni"
    assert not [p.name for p in bin_dir.iterdir() if p.name.startswith(".")]  # no temporary files
    # Only the binary goes to the node, not the Python runtime.
    current = tmp_path / "node/opt/dsipam-cni/current"
    assert sorted(p.name for p in current.iterdir()) == ["bin"]
    # It runs as the runtime runs it, and takes the rendered conflist's ipam section.
    conflist = json.loads((tmp_path / "node/etc/cni/net.d/90-dsipam.conflist").read_text())
    netconf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"}
    ran = subprocess.run([str(bin_dir / "dsipam")], input=json.dumps(netconf), env=env, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0 and "1.0.0" in json.loads(ran.stdout)["supportedVersions"], ran


def test_the_python_plugin_can_still_be_chosen(tmp_path: Path, compiled_plugin: Path) -> None:
    bundle = _with_compiled(_bundle(tmp_path), compiled_plugin)
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_PLUGIN="python")
    assert done.returncode == 0, done.stderr
    assert "dsipam-cni, python" in done.stderr
    assert "'/opt/dsipam-cni/current'" in (tmp_path / "node/opt/cni/bin/dsipam-cni").read_text()
    assert (tmp_path / "node/opt/dsipam-cni/current/python").is_dir()
    # Switching back to the compiled plugin replaces the wrapper with the binary.
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "node/opt/cni/bin/dsipam-cni").read_bytes() == compiled_plugin.read_bytes()


@pytest.mark.parametrize(("plugin", "message"), [("go", "'go' is not compiled or python"),
                                                 ("compiled", "bin/dsipam-cni is not an executable")])
def test_a_plugin_that_cannot_be_installed_fails_before_anything_is_written(tmp_path: Path, plugin: str,
                                                                            message: str) -> None:
    done = _install(tmp_path, _bundle(tmp_path), DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_PLUGIN=plugin)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert not (tmp_path / "node").exists() or not list((tmp_path / "node").rglob("*dsipam*"))


def test_a_broken_compiled_plugin_fails_the_install_and_leaves_the_working_one(tmp_path: Path,
                                                                              compiled_plugin: Path) -> None:
    good = _with_compiled(_bundle(tmp_path), compiled_plugin)
    assert _install(tmp_path, good, DSIPAM_CNI_SERVER="198.18.0.10:50051").returncode == 0
    broken = tmp_path / "broken-bundle"
    shutil.copytree(good, broken, symlinks=True)
    (broken / "bin" / "dsipam-cni").unlink()
    (broken / "bin" / "dsipam-cni").write_text("#!/bin/sh\necho 'exec format trouble' >&2\nexit 3\n")
    (broken / "bin" / "dsipam-cni").chmod(0o755)
    done = _install(tmp_path, broken, DSIPAM_CNI_SERVER="198.18.0.10:50051")
    assert done.returncode != 0 and "failed its VERSION command" in done.stderr and "exec format trouble" in done.stderr
    bin_dir = tmp_path / "node/opt/cni/bin"
    assert (bin_dir / "dsipam-cni").read_bytes() == compiled_plugin.read_bytes()  # the node's plugin still works
    assert not [p.name for p in bin_dir.iterdir() if p.name.startswith(".")]


def test_a_broken_compiled_plugin_leaves_a_node_on_the_python_plugin_working(tmp_path: Path) -> None:
    """The check comes before the current link moves: the Python wrapper runs current/python."""
    bundle = _bundle(tmp_path)
    assert _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051").returncode == 0  # python
    runtime = tmp_path / "node/opt/dsipam-cni"
    before = os.readlink(runtime / "current")
    (bundle / "bin").mkdir()
    (bundle / "bin" / "dsipam-cni").write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    (bundle / "bin" / "dsipam-cni").chmod(0o755)
    for _ in range(3):  # a crash-looping DaemonSet pod
        done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
        assert done.returncode != 0 and "failed its VERSION command" in done.stderr
    assert os.readlink(runtime / "current") == before and (runtime / before / "python").is_dir()
    ran = _run_plugin(tmp_path / "node", "VERSION", '{"cniVersion":"1.0.0"}')
    assert ran.returncode == 0 and json.loads(ran.stdout)["command"] == "VERSION", ran
    assert not [p.name for p in runtime.iterdir() if p.name.startswith(".")]


def _real_plugin_site_packages(tmp: Path) -> Path:
    """site-packages with only the dsipam.cni package, as the image's cni-bundle stage copies it."""
    spec = importlib.util.find_spec("dsipam.cni.__main__")
    assert spec is not None and spec.origin is not None, "dsipam.cni.__main__ must exist"
    site = tmp / "real-site-packages"
    shutil.copytree(Path(spec.origin).parent, site / "dsipam" / "cni", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_real_plugin_runs_from_the_bundle_and_reads_the_conflist(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, _real_plugin_site_packages(tmp_path))
    done = _install(tmp_path, bundle, DSIPAM_SERVICE_HOST="fd00::53", DSIPAM_SERVICE_PORT_GRPC="50051")
    assert done.returncode == 0, done.stderr
    node = tmp_path / "node"
    ran = _run_plugin(node, "VERSION", '{"cniVersion":"1.0.0"}')
    assert ran.returncode == 0, ran.stderr
    assert "1.0.0" in json.loads(ran.stdout)["supportedVersions"]
    # The plugin's own parser accepts the rendered conflist, as bridge hands it over.
    from dsipam.cni import parse_config

    conflist = json.loads((node / "etc/cni/net.d/90-dsipam.conflist").read_text())
    netconf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    cfg = parse_config(netconf)
    assert (cfg.endpoint, cfg.pool, cfg.node) == ("[fd00::53]:50051", "pods", "node-a")


def test_credentials_go_to_the_node_and_into_the_conflist(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "token.node-a").write_text("dsipam_node-shim-token\n")  # this node's (NODE_NAME node-a)
    (creds / "token.node-b").write_text("dsipam_other-node-token\n")
    (creds / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
    done = _install(
        tmp_path,
        bundle,
        DSIPAM_CNI_SERVER="198.18.0.10:50051",
        DSIPAM_CNI_CREDENTIALS=str(creds),
        DSIPAM_CNI_TLS_SERVER_NAME="dsipam.dsipam-system.svc",
    )
    assert done.returncode == 0, done.stderr
    secrets = tmp_path / "node/etc/dsipam-cni"
    assert (secrets / "token").read_text() == "dsipam_node-shim-token\n"
    assert (secrets / "token").stat().st_mode & 0o777 == 0o600
    assert (secrets / "ca.crt").stat().st_mode & 0o777 == 0o644
    ipam = json.loads((tmp_path / "node/etc/cni/net.d/90-dsipam.conflist").read_text())["plugins"][0]["ipam"]
    assert ipam["transport"] == "grpc" and ipam["tokenFile"] == "/etc/dsipam-cni/token"
    assert ipam["tls"] == {"ca": "/etc/dsipam-cni/ca.crt", "serverName": "dsipam.dsipam-system.svc"}
    assert ipam["endpoint"] == "198.18.0.10:50051" and ipam["pool"] == "pods"
    assert "auth: token over TLS (token.node-a)" in done.stderr
    assert "WARNING" not in done.stderr
    assert "dsipam_other-node-token" not in "".join(
        p.read_text(errors="replace") for p in (tmp_path / "node").rglob("*") if p.is_file() and p.stat().st_size < 65536)


def test_a_node_without_its_own_token_is_refused(tmp_path: Path) -> None:
    """The Secret has tokens of other nodes only: the installer does not guess and writes nothing."""
    bundle = _bundle(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "token.node-b").write_text("dsipam_other-node-token\n")
    (creds / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_CREDENTIALS=str(creds))
    assert done.returncode != 0 and "none for this node (node-a)" in done.stderr and "token.node-a" in done.stderr
    conf_dir = tmp_path / "node/etc/cni/net.d"
    assert not conf_dir.exists() or not list(conf_dir.iterdir())
    assert not (tmp_path / "node/etc/dsipam-cni/token").exists()


def test_a_shared_token_still_works_with_a_warning(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "token").write_text("dsipam_shared\n")
    (creds / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_CREDENTIALS=str(creds))
    assert done.returncode == 0, done.stderr
    assert "WARNING" in done.stderr and "token.<node name>" in done.stderr
    assert (tmp_path / "node/etc/dsipam-cni/token").read_text() == "dsipam_shared\n"


def test_a_token_provisioned_on_the_node_is_used(tmp_path: Path) -> None:
    """No Secret: the node's provisioning put its own token and the CA in /etc/dsipam-cni."""
    bundle = _bundle(tmp_path)
    secrets = tmp_path / "node/etc/dsipam-cni"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("dsipam_provisioned\n")
    (secrets / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
    assert done.returncode == 0, done.stderr
    ipam = json.loads((tmp_path / "node/etc/cni/net.d/90-dsipam.conflist").read_text())["plugins"][0]["ipam"]
    assert ipam["tokenFile"] == "/etc/dsipam-cni/token" and ipam["tls"]["ca"] == "/etc/dsipam-cni/ca.crt"
    assert "provisioned on the node" in done.stderr
    assert (secrets / "token").read_text() == "dsipam_provisioned\n"


def test_a_token_without_a_ca_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "token.node-a").write_text("dsipam_node-shim-token\n")
    done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051", DSIPAM_CNI_CREDENTIALS=str(creds))
    assert done.returncode != 0 and "no ca.crt" in done.stderr
    conf_dir = tmp_path / "node/etc/cni/net.d"
    assert not conf_dir.exists() or not list(conf_dir.iterdir())
    assert not (tmp_path / "node/etc/dsipam-cni/token").exists()


def test_a_broken_python_runtime_leaves_the_working_one(tmp_path: Path) -> None:
    """DSIPAM_CNI_PLUGIN=python: the staged runtime answers VERSION before the current link moves,
    so a crash-looping pod with a broken image neither breaks the node nor prunes the good version."""
    bundle = _bundle(tmp_path)
    assert _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051").returncode == 0
    runtime = tmp_path / "node/opt/dsipam-cni"
    before = os.readlink(runtime / "current")
    (bundle / "site-packages/dsipam/cni/__main__.py").write_text("raise SystemExit('plugin is broken')\n")
    for _ in range(3):
        done = _install(tmp_path, bundle, DSIPAM_CNI_SERVER="198.18.0.10:50051")
        assert done.returncode != 0 and "plugin is broken" in done.stderr, done.stderr
    assert os.readlink(runtime / "current") == before
    ran = _run_plugin(tmp_path / "node", "VERSION", '{"cniVersion":"1.0.0"}')
    assert ran.returncode == 0 and json.loads(ran.stdout)["command"] == "VERSION", ran
    assert not [p.name for p in runtime.iterdir() if p.name.startswith(".")]
