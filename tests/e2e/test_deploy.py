"""The deployment artefacts: the Dockerfile's structure (dockerfile-parse), every Kubernetes
manifest against the Kubernetes 1.30 schemas offline (kubernetes-validate, strict), how
the manifests fit together, and the image's gRPC health check against a real server.

Docker cannot run here, so the image itself is never built by the tests.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml


def _need(module: str, package: str):  # type: ignore[no-untyped-def]
    """The module; in CI its absence is an error, elsewhere it skips these tests."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{package} is not installed (pip install {package})", allow_module_level=True)


kubernetes_validate = _need("kubernetes_validate", "kubernetes-validate")
dockerfile_parse = _need("dockerfile_parse", "dockerfile-parse")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
SERVER_PORT = 50051
RUNTIME_UID = 10001
SETTINGS_SOURCE = (ROOT / "server" / "dsipam" / "server" / "settings.py").read_text() + (
    ROOT / "server" / "dsipam" / "server" / "store" / "db.py"
).read_text()


# -- Dockerfile -----------------------------------------------------------------------------


def _stages() -> list[dict]:
    """The Dockerfile as stages: {"from": ..., "name": ..., "instructions": [(INSTRUCTION, value), ...]}."""
    parser = dockerfile_parse.DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: list[dict] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            image, _, name = item["value"].partition(" AS ")
            stages.append({"from": image.strip(), "name": name.strip(), "instructions": []})
        elif stages and item["instruction"] != "COMMENT":
            stages[-1]["instructions"].append((item["instruction"], item["value"]))
    return stages


def _args() -> dict[str, str]:
    parser = dockerfile_parse.DockerfileParser(path=str(ROOT / "Dockerfile"))
    out = {}
    for item in parser.structure:
        if item["instruction"] == "FROM":
            break
        if item["instruction"] == "ARG":
            key, _, value = item["value"].partition("=")
            out[key] = value
    return out


def _last(stage: dict, instruction: str) -> str | None:
    values = [v for i, v in stage["instructions"] if i == instruction]
    return values[-1] if values else None


def test_dockerfile_is_multistage_on_the_project_python() -> None:
    stages = _stages()
    assert [s["name"] for s in stages] == ["build", "cni-plugin", "cni-bundle", "runtime"]
    base = _args()["PYTHON_IMAGE"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r"3\.(\d+)", requires).group(0)
    assert re.fullmatch(rf"python:{re.escape(minor)}-slim(-\w+)?", base), (base, requires)
    assert stages[0]["from"] == "${PYTHON_IMAGE}" and stages[3]["from"] == "${PYTHON_IMAGE}"
    assert stages[2]["from"] == "build"
    # The compiled plugin is built from its sources alone, on the same Debian release as the base
    # image, and put into the bundle.
    codename = re.fullmatch(r"python:[\d.]+-slim-(\w+)", base).group(1)
    assert stages[1]["from"] == f"debian:{codename}-slim"
    plugin_run = " ".join(v for i, v in stages[1]["instructions"] if i == "RUN")
    assert "golang-google-grpc-dev" in plugin_run and "go build" in plugin_run and "-o /out/dsipam-cni" in plugin_run
    assert [v for i, v in stages[1]["instructions"] if i == "COPY"] == ["clients/cni/go clients/cni/go"]
    assert ("--from=cni-plugin /out/dsipam-cni /opt/dsipam/cni-bundle/bin/dsipam-cni"
            in [v for i, v in stages[2]["instructions"] if i == "COPY"])
    # The bundle copies the interpreter of that same minor version.
    bundle_run = " ".join(v for i, v in stages[2]["instructions"] if i == "RUN")
    assert f"python{minor}" in bundle_run
    # The runtime gets the built virtualenv and the bundle from the earlier stages, not the sources.
    copies = [v for i, v in stages[3]["instructions"] if i == "COPY"]
    assert "--from=build /opt/dsipam/venv /opt/dsipam/venv" in copies
    assert "--from=cni-bundle /opt/dsipam/cni-bundle /opt/dsipam/cni-bundle" in copies
    assert not any(c.split()[0] == "." for c in copies), "the runtime stage copies the whole source tree"


def test_cni_bundle_copies_every_package_the_plugin_imports(tmp_path: Path) -> None:
    """A site-packages made of exactly what the cni-bundle stage copies is enough for the plugin,
    TLS transport included, with nothing but the standard library besides (python -S)."""
    import grpc

    bundle_run = " ".join(v for i, v in _stages()[2]["instructions"] if i == "RUN")
    copied = re.findall(r'"\$sp/([A-Za-z0-9_./]+)"', bundle_run)
    assert {"dsipam/cni", "dsipam/v1", "grpc", "google"} <= set(copied)
    venv_site = Path(grpc.__file__).resolve().parent.parent
    sources = {"dsipam/cni": ROOT / "clients/cni/dsipam/cni", "dsipam/v1": ROOT / "clients/python/dsipam/v1"}
    site = tmp_path / "site-packages"
    for entry in copied:
        target = site / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(sources.get(entry, venv_site / entry))
    probe = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import dsipam.cni, dsipam.cni._plugin, dsipam.cni._grpc_client, grpc, dsipam.v1.ipam_pb2_grpc\n"
        "print(grpc.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, f"the cni-bundle stage misses a package:\n{done.stderr}"
    assert done.stdout.startswith(str(site))


def test_dockerfile_runs_as_non_root_user_created_in_the_image() -> None:
    runtime = _stages()[-1]
    user = _last(runtime, "USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid == str(RUNTIME_UID) and gid == str(RUNTIME_UID)  # numeric, so runAsNonRoot can verify it
    created = " ".join(v for i, v in runtime["instructions"] if i == "RUN")
    assert f"--uid {RUNTIME_UID}" in created and f"--gid {RUNTIME_UID}" in created
    names = [i for i, _ in runtime["instructions"]]
    assert names.index("USER") > max(k for k, n in enumerate(names) if n in ("RUN", "COPY")), "USER must come last"


def test_dockerfile_entry_point_is_dsipam_serve_on_the_grpc_port() -> None:
    runtime = _stages()[-1]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = json.loads(_last(runtime, "ENTRYPOINT"))
    cmd = json.loads(_last(runtime, "CMD"))
    assert entry == ["dsipam"] and "dsipam" in scripts
    assert cmd == ["serve"]
    env = dockerfile_parse.DockerfileParser(path=str(ROOT / "Dockerfile")).envs
    assert env["DSIPAM_LISTEN"] == f"[::]:{SERVER_PORT}"
    assert env["PATH"].startswith("/opt/dsipam/venv/bin")
    assert _last(runtime, "EXPOSE") == str(SERVER_PORT)
    assert _last(runtime, "STOPSIGNAL") == "SIGTERM"  # the server drains on SIGTERM


def test_dockerfile_health_check_uses_grpc_health() -> None:
    runtime = _stages()[-1]
    health = _last(runtime, "HEALTHCHECK")
    assert health is not None
    command = json.loads(health.split("CMD", 1)[1].strip())
    assert command == ["dsipam-healthcheck"]
    copies = dict(reversed(v.split()) for i, v in runtime["instructions"] if i == "COPY" and not v.startswith("--"))
    source = ROOT / copies["/usr/local/bin/dsipam-healthcheck"]
    assert "grpc_health.v1" in source.read_text()
    assert source.read_text().startswith("#!/opt/dsipam/venv/bin/python")


def test_dockerfile_sources_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".venv", ".git", "tests"):
        assert must in ignored, f".dockerignore should exclude {must}"
    for stage in _stages():
        for instruction, value in stage["instructions"]:
            if instruction != "COPY" or value.startswith("--from"):
                continue
            *sources, _ = shlex.split(value)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not any(src == i or src.startswith(i.rstrip("/") + "/") for i in ignored), (
                    f"COPY {src} is ignored"
                )


def test_compose_builds_the_image_and_runs_migrations_first() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["server"]["build"] == "." and services["migrate"]["build"] == "."
    assert services["server"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # The image's ENTRYPOINT is dsipam: commands are its arguments.
    assert services["migrate"]["command"] == ["migrate"] and services["server"]["command"] == ["serve"]
    assert services["server"]["image"] == services["migrate"]["image"]  # one build serves both


# -- Kubernetes manifests -------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[dict]:
    out = []
    for path in _manifest_files():
        out.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def _one(kind: str, name: str | None = None) -> dict:
    found = [r for r in _resources() if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_against_kubernetes_schemas(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError


def test_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_one("Deployment", "dsipam"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": SERVER_PORT}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_migration_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _manifest_files()} - {"migration-job.yaml"}
    images = {c["image"].split(":")[0] for r in _resources() for c in _pod_spec(r).get("containers", [])}
    assert images == {kustomization["images"][0]["name"]}


def _pod_spec(resource: dict) -> dict:
    if resource["kind"] in ("Deployment", "DaemonSet", "Job"):
        return resource["spec"]["template"]["spec"]
    return {}


def test_server_deployment_probes_resources_and_budget() -> None:
    deployment = _one("Deployment", "dsipam")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]
    assert _matches(spec["selector"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == SERVER_PORT
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DSIPAM_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    # Probes: the image's gRPC health client through the unix socket that the server listens on.
    listen = _one("ConfigMap", "dsipam-settings")["data"]["DSIPAM_LISTEN"].split(",")
    assert f"[::]:{SERVER_PORT}" in listen
    (socket,) = [a for a in listen if a.startswith("unix://")]
    socket_dir = socket.removeprefix("unix://").rsplit("/", 1)[0]
    assert container["readinessProbe"]["exec"]["command"] == ["dsipam-healthcheck", socket, "dsipam.v1.IpamService"]
    assert container["livenessProbe"]["exec"]["command"] == ["dsipam-healthcheck", socket, "liveness"]  # does not follow the database
    assert container["startupProbe"]["exec"]["command"] == ["dsipam-healthcheck", socket]
    run = next(m for m in container["volumeMounts"] if m["mountPath"] == socket_dir)
    assert "emptyDir" in next(v for v in pod["spec"]["volumes"] if v["name"] == run["name"])
    # TLS on the TCP port: the Secret's files where DSIPAM_TLS_CERT/KEY point.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    for var, key in (("DSIPAM_TLS_CERT", "tls.crt"), ("DSIPAM_TLS_KEY", "tls.key")):
        directory, filename = env[var].rsplit("/", 1)
        assert filename == key and secrets[mounts[directory]] == "dsipam-tls"
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["memory"]
    assert container["resources"]["requests"]["cpu"]
    security = {**pod["spec"]["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == RUNTIME_UID
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert pod["spec"]["enableServiceLinks"] is False
    grace = int(_one("ConfigMap", "dsipam-settings")["data"]["DSIPAM_SHUTDOWN_GRACE"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    budget = _one("PodDisruptionBudget", "dsipam")
    assert _matches(budget["spec"]["selector"], pod["metadata"]["labels"])
    assert budget["spec"]["minAvailable"] == 1 < spec["replicas"]


def test_service_config_and_secret_feed_the_server() -> None:
    deployment = _one("Deployment", "dsipam")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    service = _one("Service", "dsipam")
    assert _matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == SERVER_PORT and port["targetPort"] == container["ports"][0]["name"]
    assert service["spec"]["ipFamilyPolicy"] in ("PreferDualStack", "RequireDualStack")
    settings = _one("ConfigMap", "dsipam-settings")
    assert container["envFrom"] == [{"configMapRef": {"name": "dsipam-settings"}}]
    for key in settings["data"]:
        assert key.startswith("DSIPAM_") and f'"{key}"' in SETTINGS_SOURCE, f"{key} is not a server setting"
    secret = _one("Secret", "dsipam-database")
    url_ref = next(e for e in container["env"] if e["name"] == "DSIPAM_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert url_ref["name"] == "dsipam-database" and url_ref["key"] in secret["stringData"]


def test_auth_secret_is_mounted_where_the_server_reads_it(tmp_path: Path) -> None:
    deployment = _one("Deployment", "dsipam")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = next(e["value"] for e in container["env"] if e["name"] == "DSIPAM_AUTH_CONFIG")
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = _one("Secret", volume["secret"]["secretName"])
    filename = path.rsplit("/", 1)[1]
    assert filename in secret["stringData"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # mode 0440 files readable
    from dsipam.server import security

    config_file = tmp_path / filename
    config_file.write_text(secret["stringData"][filename])
    config = security.load_auth_config(config_file)  # the server's own parser accepts it
    assert config.tokens and config.unix_socket_role is None
    shims = [t for t in config.tokens if t.role is security.Role.SHIM]
    assert len(shims) >= 2 and all(t.node for t in shims)  # one shim identity per node, each naming it
    assert len({t.node for t in shims}) == len(shims) and len({t.digest for t in shims}) == len(shims)


def test_migration_job_uses_the_direct_database_url() -> None:
    job = _one("Job", "dsipam-migrate")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"] and pod["restartPolicy"] == "Never"
    ref = next(e for e in container["env"] if e["name"] == "DSIPAM_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "dsipam-database", "key": "migrate-database-url"}
    assert ref["key"] in _one("Secret", "dsipam-database")["stringData"]


def test_network_policy_admits_clients_and_nodes_on_the_grpc_port() -> None:
    server_labels = _one("Deployment", "dsipam")["spec"]["template"]["metadata"]["labels"]
    deny = _one("NetworkPolicy", "dsipam-default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    policy = _one("NetworkPolicy", "dsipam-server")
    assert _matches(policy["spec"]["podSelector"], server_labels)
    rule, metrics = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": SERVER_PORT}]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert [list(p) for p in metrics["from"]] == [["namespaceSelector"]]
    blocks = [p["ipBlock"]["cidr"] for p in rule["from"] if "ipBlock" in p]
    assert any(":" in b for b in blocks) and any("." in b for b in blocks)  # nodes of both families
    assert any(p.get("podSelector", {}).get("matchLabels") == {"dsipam.io/client": "true"} for p in rule["from"])


def test_network_policies_admit_prometheus_to_every_metrics_port() -> None:
    """The default deny covers every pod of the namespace: each workload's metrics port (the server's
    9090, the controller's 8080, the scrape targets of the PodMonitors) needs a policy that admits the
    namespaces labelled dsipam.io/metrics-scraper, else the dsipam-controller job scrapes nothing."""
    scraper = {"dsipam.io/metrics-scraper": "true"}
    policies = [r for r in _resources() if r["kind"] == "NetworkPolicy"]
    checked = []
    for workload in _resources():
        if workload["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        pod = workload["spec"]["template"]
        if pod["spec"].get("hostNetwork"):
            continue  # policies do not apply to host-network pods
        labels = pod["metadata"]["labels"]
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                if port.get("name") != "metrics":
                    continue
                admitted = any(
                    _matches(policy["spec"]["podSelector"], labels)
                    and any(any(_matches(peer.get("namespaceSelector", {"matchLabels": {"-": "-"}}), scraper)
                                for peer in rule.get("from", []))
                            and {"protocol": "TCP", "port": port["containerPort"]} in rule.get("ports", [])
                            for rule in policy["spec"].get("ingress", []))
                    for policy in policies)
                assert admitted, (f"{workload['kind']}/{workload['metadata']['name']}: no NetworkPolicy admits "
                                  f"Prometheus to its metrics port {port['containerPort']}")
                checked.append(workload["metadata"]["name"])
    assert {"dsipam", "dsipam-controller"} <= set(checked), checked


def test_cni_daemonset_installs_into_the_node_cni_directories() -> None:
    daemonset = _one("DaemonSet", "dsipam-cni")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["dsipam-cni-install"]
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    root = env["DSIPAM_CNI_HOST_ROOT"]
    for host in ("/opt/cni/bin", "/etc/cni/net.d", "/opt/dsipam-cni", "/etc/dsipam-cni"):
        name = next(n for n, p in host_paths.items() if p == host)
        assert mounts[name] == root + host
    config = _one("ConfigMap", "dsipam-cni")
    template = config["data"]["conflist.template"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    template_dir, template_file = env["DSIPAM_CNI_TEMPLATE"].rsplit("/", 1)
    template_volume = volumes[next(n for n, m in mounts.items() if m == template_dir)]
    assert template_volume["configMap"]["name"] == "dsipam-cni"
    assert template_volume["configMap"]["items"] == [{"key": "conflist.template", "path": template_file}]
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"  # picks token.<node name>
    credentials = volumes[next(n for n, m in mounts.items() if m == env["DSIPAM_CNI_CREDENTIALS"])]
    assert credentials["secret"] == {"secretName": "dsipam-cni-credentials", "optional": True, "defaultMode": 0o400}
    service = _one("Service", "dsipam")
    assert env["DSIPAM_CNI_TLS_SERVER_NAME"] == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    rendered = json.loads(
        template.replace("@SERVER@", "[fd00::a]:50051").replace("@POOL@", "pods").replace("@CNI_VERSION@", "1.0.0")
    )
    ipam = rendered["plugins"][0]["ipam"]
    assert ipam["type"] == "dsipam" and ipam["endpoint"] == "[fd00::a]:50051"  # the installer links dsipam
    assert ipam["ipFamilyPolicy"] == "RequireDualStack" and ipam["ipFamilies"] == ["IPv4", "IPv6"]
    assert {r["dst"] for r in ipam["routes"]} == {"0.0.0.0/0", "::/0"}
    assert config["data"]["DSIPAM_CNI_CONFLIST_NAME"].endswith(".conflist")


# -- the image's health check, against a real server -----------------------------------------


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30)


def test_healthcheck_reports_serving_server(server_proc) -> None:  # type: ignore[no-untyped-def]
    whole = _healthcheck(server_proc.target)
    assert whole.returncode == 0 and "SERVING" in whole.stdout, whole.stderr
    service = _healthcheck(server_proc.target, "dsipam.v1.IpamService")
    assert service.returncode == 0 and "SERVING" in service.stdout, service.stderr
    unknown = _healthcheck(server_proc.target, "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    from support import free_port

    closed = _healthcheck(f"127.0.0.1:{free_port()}")
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr
