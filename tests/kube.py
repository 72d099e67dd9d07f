"""A real Kubernetes API server for tests: etcd + kube-apiserver on free loopback ports with their own PKI.

The API server binary is found through ``KUBEBUILDER_ASSETS`` (the envtest convention: a directory
holding ``kube-apiserver``, and ``etcd`` there or on PATH). Where none is found, the tests that need
it skip with a reason naming ``KUBEBUILDER_ASSETS``; with ``CI=true`` that is a failure instead.

Clients: ``ApiServer.configuration(token)`` gives a kubernetes_asyncio ``Configuration`` (admin by
default); ``ApiServer.service_account_token(ns, name)`` mints a token for a ServiceAccount through the
TokenRequest API, so code under test runs under that account's RBAC; ``ApiServer.write_kubeconfig``
writes a kubeconfig file for a subprocess (the controller's ``--kubeconfig``).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from support import free_port

ADMIN_USER = "admin"
VIEWER_USER = "viewer"  # a non-admin identity (group "testers"), no RBAC bindings of its own


def running_api_server() -> Iterator[ApiServer]:
    """For a pytest fixture: a started API server (found through KUBEBUILDER_ASSETS), stopped after;
    skips the test where there is none, and fails it under CI=true."""
    import pytest

    found = find_assets()
    if isinstance(found, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Kubernetes API server for the tests: {found}")
        pytest.skip(found)
    server = ApiServer(*found)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def find_assets() -> tuple[Path, Path] | str:
    """(kube-apiserver, etcd) paths, or the reason they cannot be found."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        return "KUBEBUILDER_ASSETS is not set (a directory holding kube-apiserver; .ci/run sets it to ../shared/k8s)"
    apiserver = Path(assets) / "kube-apiserver"
    if not os.access(apiserver, os.X_OK):
        return f"KUBEBUILDER_ASSETS={assets} holds no executable kube-apiserver"
    etcd = Path(assets) / "etcd"
    if not os.access(etcd, os.X_OK):
        found = shutil.which("etcd")
        if found is None:
            return f"no etcd in KUBEBUILDER_ASSETS={assets} nor on PATH (apt-get install etcd-server)"
        etcd = Path(found)
    return apiserver, etcd


def _write_pki(pki: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsipam-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, org: str | None, san: x509.SubjectAlternativeName | None, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if san is not None:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    pki.mkdir(parents=True, exist_ok=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    crt, key = leaf("kube-apiserver", None, san, server=True)
    (pki / "serving.crt").write_bytes(crt)
    (pki / "serving.key").write_bytes(key)
    crt, key = leaf(ADMIN_USER, "system:masters", None, server=False)
    (pki / "admin.crt").write_bytes(crt)
    (pki / "admin.key").write_bytes(key)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.key").write_bytes(key_pem(sa_key))
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_yaml_files(paths: Iterable[Path]) -> list[dict]:
    docs: list[dict] = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(Path(path).read_text()) if d)
    return docs


class ApiServer:
    """etcd + kube-apiserver processes in ``run_dir``; ``stop()`` ends both and deletes ``run_dir``."""

    def __init__(self, apiserver_bin: Path, etcd_bin: Path, run_dir: Path | None = None, *,
                 service_cidrs: str = "10.0.0.0/24,fd00:10::/108") -> None:
        self.apiserver_bin = apiserver_bin
        self.service_cidrs = service_cidrs  # the ClusterIP ranges (the tests': 253 IPv4 Services at most)
        self.etcd_bin = etcd_bin
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="dsipam-kube-"))
        self.pki = self.run_dir / "pki"
        self.port = free_port()
        self.etcd_port = free_port()
        self.peer_port = free_port()
        self.admin_token = secrets.token_hex(16)
        self.viewer_token = secrets.token_hex(16)
        self.etcd: subprocess.Popen | None = None
        self.apiserver: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def issuer(self) -> str:
        return self.url

    # -- processes -------------------------------------------------------------------------------
    def start(self) -> None:
        _write_pki(self.pki)
        (self.pki / "tokens.csv").write_text(
            f"{self.admin_token},{ADMIN_USER},{ADMIN_USER},system:masters\n"
            f"{self.viewer_token},{VIEWER_USER},{VIEWER_USER},testers\n")
        self.etcd = subprocess.Popen(
            [str(self.etcd_bin), "--name=default", f"--data-dir={self.run_dir / 'etcd'}",
             f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
             f"--initial-cluster=default=http://127.0.0.1:{self.peer_port}"],
            stdout=open(self.run_dir / "etcd.log", "w"), stderr=subprocess.STDOUT)
        self.start_apiserver()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        log = open(self.run_dir / f"kube-apiserver-{self.restarts}.log", "w")
        self.apiserver = subprocess.Popen(
            [str(self.apiserver_bin), "--advertise-address=127.0.0.1", "--bind-address=127.0.0.1",
             f"--secure-port={self.port}", f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
             f"--cert-dir={self.run_dir / 'certs'}",
             f"--tls-cert-file={self.pki / 'serving.crt'}", f"--tls-private-key-file={self.pki / 'serving.key'}",
             f"--client-ca-file={self.ca_path}", f"--token-auth-file={self.pki / 'tokens.csv'}",
             "--authorization-mode=RBAC", f"--service-account-issuer={self.issuer}",
             f"--service-account-key-file={self.pki / 'sa.pub'}",
             f"--service-account-signing-key-file={self.pki / 'sa.key'}",
             f"--service-cluster-ip-range={self.service_cidrs}",
             "--allow-privileged=true", "--disable-admission-plugins=ServiceAccount"],
            stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for name, proc in (("etcd", self.etcd), ("kube-apiserver", self.apiserver)):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            req = urllib.request.Request(f"{self.url}/readyz",
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver at {self.url} not ready ({last}):\n{self.logs()}")

    def stop_apiserver(self, sig: int = signal.SIGKILL) -> None:
        """Ends the API server (SIGKILL by default: every watch connection is cut mid-stream)."""
        if self.apiserver is not None and self.apiserver.poll() is None:
            self.apiserver.send_signal(sig)
            try:
                self.apiserver.wait(30)
            except subprocess.TimeoutExpired:
                self.apiserver.kill()
                self.apiserver.wait()
        self.restarts += 1

    def restart_apiserver(self, down_for: float = 0.0) -> None:
        """Kills the API server and starts it again on the same port and etcd."""
        self.stop_apiserver()
        if down_for:
            time.sleep(down_for)
        self.start_apiserver()

    def compact_etcd(self) -> int:
        """Compacts etcd's history up to its current revision (etcd's own JSON gateway): a watch
        from an older resourceVersion then ends in 410 Gone. Returns the revision."""
        import json

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{self.etcd_port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def stop(self) -> None:
        for proc in (self.apiserver, self.etcd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def logs(self, tail: int = 4000) -> str:
        out = []
        for p in sorted(self.run_dir.glob("*.log")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- clients ---------------------------------------------------------------------------------
    def configuration(self, token: str | None = None) -> Any:
        """A kubernetes_asyncio Configuration for ``token`` (the admin's by default)."""
        from kubernetes_asyncio import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_path)
        cfg.api_key = {"BearerToken": f"Bearer {token or self.admin_token}"}
        return cfg

    def api_client(self, token: str | None = None) -> Any:
        from kubernetes_asyncio import client

        return client.ApiClient(configuration=self.configuration(token))

    def kubeconfig(self, token: str | None = None, user: str = "user") -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": user, "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        }

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(yaml.safe_dump(self.kubeconfig(token)))
        path.chmod(0o600)
        return path

    async def async_service_account_token(self, namespace: str, name: str, *, seconds: int = 3600,
                                          audiences: list[str] | None = None,
                                          bound_pod: tuple[str, str] | None = None) -> str:
        """A token for ServiceAccount ``namespace/name`` (created when missing) by the TokenRequest API.

        ``bound_pod=(pod_name, pod_uid)`` binds the token to that pod (the API server then adds the
        pod's node to the token's claims where the pod is bound to one)."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.rest import ApiException

        async with self.api_client() as api:
            core = client.CoreV1Api(api)
            try:
                await core.create_namespaced_service_account(
                    namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
            except ApiException as exc:
                if exc.status != 409:
                    raise
            spec = client.V1TokenRequestSpec(audiences=audiences or [self.issuer], expiration_seconds=seconds)
            if bound_pod is not None:
                spec.bound_object_ref = client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=bound_pod[0], uid=bound_pod[1])
            resp = await core.create_namespaced_service_account_token(
                name, namespace, client.AuthenticationV1TokenRequest(spec=spec))
            return resp.status.token

    def service_account_token(self, namespace: str, name: str, **kwargs: Any) -> str:
        return asyncio.run(self.async_service_account_token(namespace, name, **kwargs))

    async def async_apply_files(self, paths: Iterable[Path], *, namespace: str | None = None) -> list[dict]:
        """Creates (or replaces) every object in the YAML files, as ``kubectl apply`` would."""
        docs = load_yaml_files(paths)
        await self.async_apply(docs, namespace=namespace)
        return docs

    async def async_apply(self, docs: Iterable[dict], *, namespace: str | None = None) -> None:
        from kubernetes_asyncio import dynamic

        async with self.api_client() as api:
            dyn = await dynamic.DynamicClient(api)
            for doc in docs:
                resource = await dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
                ns = doc["metadata"].get("namespace") or (namespace if resource.namespaced else None)
                if resource.namespaced and ns:
                    doc["metadata"]["namespace"] = ns
                from kubernetes_asyncio.client.rest import ApiException
                try:
                    await dyn.create(resource, body=doc, namespace=ns)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = await dyn.get(resource, name=doc["metadata"]["name"], namespace=ns)
                    doc["metadata"]["resourceVersion"] = current.metadata.resourceVersion
                    await dyn.replace(resource, body=doc, namespace=ns)
                    del doc["metadata"]["resourceVersion"]


# -- the controller as a process ----------------------------------------------------------------

CONTROLLER_METRICS_LINE = "dsipam controller: metrics and health on http://"


class ControllerProcess:
    """``dsipam controller`` as a real process, under the kubeconfig given (a ServiceAccount's token)."""

    def __init__(self, kubeconfig: Path, target: str, log_path: Path, *, identity: str, args: Iterable[str] = (),
                 env: dict[str, str] | None = None) -> None:
        import sys

        self.identity = identity
        self.log_path = log_path
        self.outage_expected = False  # set by a test that cuts the API server on purpose
        full_env = dict(os.environ)
        full_env.update({"DSIPAM_CONTROLLER_NAMESPACE": "dsipam-system", "DSIPAM_LOG_LEVEL": "INFO",
                         **(env or {})})
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsipam.server", "--target", target, "controller", "--kubeconfig",
                 str(kubeconfig), "--listen", "127.0.0.1:0", "--identity", identity, *args],
                env=full_env, stdout=log, stderr=subprocess.STDOUT)
        self.address = self._wait_address()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_address(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if CONTROLLER_METRICS_LINE in text:
                rest = text.split(CONTROLLER_METRICS_LINE, 1)[1]
                return rest.split("/metrics", 1)[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"controller did not start:\n{self.log()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def is_leader(self) -> bool:
        return self.proc.poll() is None and self.metric("dsipam_controller_leader") == 1.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def errors(self) -> float:
        return self.metric("dsipam_controller_errors_total")

    def check(self) -> None:
        """Fails on anything the controller counted or logged as a failure: tracebacks, reconcile
        errors, and (unless ``outage_expected``: the test cut the API server on purpose) watch and
        Lease failures. Counters are read while it runs; a stopped one is judged by its log."""
        problems = []
        if "Traceback" in self.log():
            problems.append("a traceback in the log")
        if self.proc.poll() is None:
            if self.errors():
                problems.append(f"dsipam_controller_errors_total {self.errors()}")
            if not self.outage_expected:
                if self.metric("dsipam_controller_lease_failures_total"):
                    problems.append("Lease failures")
                for reason in ("error", "disconnected"):
                    if self.metric("dsipam_controller_watch_restarts_total", reason=reason):
                        problems.append(f"watch restarts ({reason})")
        assert not problems, f"controller {self.identity}: {problems}\n{self.log()[-6000:]}"


# -- the project's manifests on the API server, and the controller's identity --------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
CONTROLLER_NS = "dsipam-system"
CONTROLLER_SA = "dsipam-controller"


async def install_controller_manifests(api: ApiServer, tmp: Path) -> Path:
    """Applies the real namespace, CRD and controller RBAC files (once per API server) and returns a
    kubeconfig holding a fresh token of the controller's ServiceAccount (TokenRequest)."""
    from kubernetes_asyncio import client

    if not getattr(api, "_controller_installed", False):
        await api.async_apply_files([DEPLOY / "namespace.yaml", DEPLOY / "crd-ippool.yaml"])
        async with api.api_client() as c:
            ext = client.ApiextensionsV1Api(c)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                crd = await ext.read_custom_resource_definition("ippools.ipam.dsipam.io")
                if any(x.type == "Established" and x.status == "True" for x in (crd.status.conditions or ())):
                    break
                await asyncio.sleep(0.1)
        # Everything in controller.yaml but the Deployment (no kubelet runs it here).
        docs = [d for d in load_yaml_files([DEPLOY / "controller.yaml"]) if d["kind"] != "Deployment"]
        await api.async_apply(docs)
        api._controller_installed = True  # type: ignore[attr-defined]
    token = await api.async_service_account_token(CONTROLLER_NS, CONTROLLER_SA)
    return api.write_kubeconfig(tmp / f"controller-{secrets.token_hex(3)}.kubeconfig", token)


async def wait_for(pred: Any, within: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Polls ``pred`` (sync or async) until it returns something truthy; returns that."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise TimeoutError(f"{what} not met within {within}s (last: {last!r})")


async def delete_all_ippools(api: ApiServer) -> None:
    """Test clean-up: every IPPool goes, finalizers stripped (the controller may be gone)."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.rest import ApiException

    async with api.api_client() as c:
        custom = client.CustomObjectsApi(c)
        items = (await custom.list_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools"))["items"]
        for item in items:
            name = item["metadata"]["name"]
            try:
                await custom.patch_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", name,
                                                         {"metadata": {"finalizers": None}},
                                                         _content_type="application/merge-patch+json")
                await custom.delete_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


CLUSTER_LABEL = "ipam.dsipam.io/cluster"


async def cluster_id(api: ApiServer) -> str:
    """The controller's default cluster id on this API server: the kube-system Namespace's UID."""
    from kubernetes_asyncio import client

    async with api.api_client() as c:
        return (await client.CoreV1Api(c).read_namespace("kube-system")).metadata.uid


async def cluster_labels(api: ApiServer) -> dict[str, str]:
    """The label that makes a pool made in dsipam directly this cluster's (its pods' and nodes'
    addresses are then reclaimed by the controller)."""
    return {CLUSTER_LABEL: await cluster_id(api)}
