"""Issue 14, must show 6: a CNI shim authenticated by a bound ServiceAccount token acts on its
node's owners and is refused on another node's. A real kube-apiserver + etcd (tests/kube.py), a
real dsipam server (its auth config's ``kubernetes`` section; it reviews tokens under the
least-privilege RBAC of deploy/kubernetes/cni.yaml, with a token of its own ServiceAccount) and
real PostgreSQL.

Nodes and Pods bound to them are created in the API; tokens come from the TokenRequest API with
a boundObjectRef to the pod (what the kubelet's projected volume asks for). Refused: a wrong
audience, an expired token (signed with the cluster's real signing key), a non-listed
ServiceAccount, a token bound to no node, a forged token (listed claims, another key) and
garbage: all UNAUTHENTICATED. After the pod is deleted its token is refused (TokenReview; the
window is measured). A hypothesis flood of JWT-shaped bearer values is UNAUTHENTICATED (or
UNAVAILABLE TOKEN_REVIEW_BUSY past the review bucket) and the TokenReviews that reach the API
server, counted there, stay within the bucket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_helpers import REQUIRE, error_info, pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kube import ApiServer, load_yaml_files
from support import ServerProcess, metric_sum, spawn_server

from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CNI_YAML = ROOT / "deploy" / "kubernetes" / "cni.yaml"
POOL = "kube-shims"
CACHE_SECONDS = 2
REVIEWS_PER_SECOND, REVIEW_BURST = 5, 10
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _b64(value: object) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sign_jwt(claims: dict, key_pem: bytes) -> str:
    """An RS256 JWT signed with ``key_pem`` (the cluster's ServiceAccount key, or another)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key = serialization.load_pem_private_key(key_pem, password=None)
    signing_input = f"{_b64({'alg': 'RS256', 'kid': ''})}.{_b64(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
    return f"{signing_input}.{_b64(signature)}"


def claims_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@dataclass
class Cluster:
    api: ApiServer
    namespace: str
    nodes: dict[str, str]  # "a"/"b" -> node name
    pods: dict[str, tuple[str, str]]  # "a"/"b"/"other"/"nowhere" -> (pod name, uid)
    tokens: dict[str, str]
    server: ServerProcess
    admin_token: str

    def reviews_at_api_server(self) -> float:
        """TokenReviews the API server has answered (its own apiserver_request_total)."""
        ctx = ssl.create_default_context(cafile=str(self.api.ca_path))
        req = urllib.request.Request(f"{self.api.url}/metrics",
                                     headers={"Authorization": f"Bearer {self.api.admin_token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("apiserver_request_total{") and 'resource="tokenreviews"' in line)

    def server_metric(self, name: str) -> float:
        text = self.server.metrics_text()
        assert text is not None, "the dsipam server's metrics cannot be scraped"
        return metric_sum(text, name)


async def _setup(api: ApiServer, ns: str, nodes: dict[str, str]) -> tuple[dict, dict]:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.rest import ApiException

    async with api.api_client() as raw:
        core = client.CoreV1Api(raw)
        for name in (ns, "dsipam-system"):
            try:
                await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            except ApiException as exc:
                if exc.status != 409:
                    raise
        for sa in ("dsipam-cni", "not-listed"):
            await core.create_namespaced_service_account(ns, client.V1ServiceAccount(
                metadata=client.V1ObjectMeta(name=sa)))
        for node in nodes.values():
            await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
        pods = {}
        for key, sa, node in (("a", "dsipam-cni", nodes["a"]), ("b", "dsipam-cni", nodes["b"]),
                              ("other", "not-listed", nodes["a"]), ("nowhere", "dsipam-cni", None)):
            pod = await core.create_namespaced_pod(ns, client.V1Pod(
                metadata=client.V1ObjectMeta(name=f"dsipam-cni-{key}"),
                spec=client.V1PodSpec(node_name=node, service_account_name=sa,
                                      containers=[client.V1Container(name="install", image="dsipam:test")])))
            pods[key] = (pod.metadata.name, pod.metadata.uid)
    tokens = {
        "a": await api.async_service_account_token(ns, "dsipam-cni", audiences=["dsipam"], bound_pod=pods["a"],
                                                   seconds=3600),
        "b": await api.async_service_account_token(ns, "dsipam-cni", audiences=["dsipam"], bound_pod=pods["b"],
                                                   seconds=3600),
        "wrong_audience": await api.async_service_account_token(ns, "dsipam-cni", audiences=["not-dsipam"],
                                                                bound_pod=pods["a"]),
        "not_listed": await api.async_service_account_token(ns, "not-listed", audiences=["dsipam"],
                                                            bound_pod=pods["other"]),
        "no_node": await api.async_service_account_token(ns, "dsipam-cni", audiences=["dsipam"],
                                                         bound_pod=pods["nowhere"]),
        "unbound": await api.async_service_account_token(ns, "dsipam-cni", audiences=["dsipam"]),
        # The server's own identity, under the RBAC that cni.yaml gives it (TokenReview create only).
        "server": await api.async_service_account_token("dsipam-system", "dsipam"),
    }
    return pods, tokens


@pytest.fixture(scope="module")
def cluster(kube_api: ApiServer, db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("kube-shim")
    ns = f"shimid-{uuid.uuid4().hex[:8]}"
    nodes = {"a": f"{ns}-node-a", "b": f"{ns}-node-b"}
    rbac = [d for d in load_yaml_files([CNI_YAML]) if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"]["name"] for d in rbac} == {"dsipam-tokenreview"}
    asyncio.run(kube_api.async_apply(rbac))
    pods, tokens = asyncio.run(_setup(kube_api, ns, nodes))
    admin = security.new_token()
    sock = tmp / "dsipam.sock"
    config = tmp / "auth.yaml"
    config.write_text(yaml.safe_dump({
        "tokens": [{"name": "ops", "role": "admin", "hash": security.hash_token(admin)}],
        "kubernetes": {
            "serviceAccounts": [{"namespace": ns, "name": "dsipam-cni", "role": "shim"}],
            "audience": "dsipam",
            "kubeconfig": str(kube_api.write_kubeconfig(tmp / "kubeconfig", tokens["server"])),
            "cacheSeconds": CACHE_SECONDS,
            "reviewsPerSecond": REVIEWS_PER_SECOND,
            "reviewBurst": REVIEW_BURST,
        }}))
    server = spawn_server(db_url, tmp, extra_env={"DSIPAM_AUTH_CONFIG": str(config)},
                          args=("--listen", f"unix://{sock}"))
    server.target = f"unix://{sock}"
    try:
        yield Cluster(kube_api, ns, nodes, pods, tokens, server, admin)
    finally:
        server.terminate()


def _stub(cluster: Cluster) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    with grpc.insecure_channel(cluster.server.target) as channel:
        yield ipam_pb2_grpc.IpamServiceStub(channel)


@pytest.fixture
def stub(cluster: Cluster, clean_db: str) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    yield from _stub(cluster)


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(fn) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def allocate(stub: ipam_pb2_grpc.IpamServiceStub, token: str, owner: str, node: str = "") -> pb.Allocation:
    return stub.Allocate(pb.AllocateRequest(pool=POOL, owner=owner, ip_family_policy=REQUIRE, node=node),
                         metadata=md(token), timeout=15).allocation


def test_the_bound_token_names_the_pods_node(cluster: Cluster) -> None:
    """What TokenRequest gives on this API server (v1.36): the pod's node is in the token."""
    claims = claims_of(cluster.tokens["a"])
    assert claims["aud"] == ["dsipam"] and claims["kubernetes.io"]["node"]["name"] == cluster.nodes["a"]
    assert "node" not in claims_of(cluster.tokens["no_node"])["kubernetes.io"]


def test_a_shim_acts_on_its_nodes_owners_only(cluster: Cluster, stub: ipam_pb2_grpc.IpamServiceStub) -> None:
    a, b = cluster.tokens["a"], cluster.tokens["b"]
    node_a, node_b = cluster.nodes["a"], cluster.nodes["b"]
    stub.CreatePool(pool(POOL, "198.18.40.0/24", "fd00:40::/120", cooldown=0), metadata=md(cluster.admin_token))
    mine = allocate(stub, a, "pod-a/eth0")  # no node in the request: the token's node
    assert mine.node == node_a and len(mine.addresses) == 2
    assert allocate(stub, b, "pod-b/eth0").node == node_b
    got = stub.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="pod-a/eth0"), metadata=md(a), timeout=15)
    assert got.node == node_a

    # Another node's owners and another node's allocations: PERMISSION_DENIED, nothing changes.
    for call in (lambda: stub.Release(pb.ReleaseRequest(pool=POOL, owner="pod-a/eth0"), metadata=md(b), timeout=15),
                 lambda: stub.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="pod-a/eth0"), metadata=md(b),
                                            timeout=15),
                 lambda: allocate(stub, a, "pod-x/eth0", node=node_b),
                 lambda: stub.ListPools(pb.ListPoolsRequest(), metadata=md(a), timeout=15)):  # a controller's
        err = code_of(call)
        assert err.code() == DENIED, (err.code(), err.details())
        assert error_info(err).reason == "PERMISSION_DENIED"
    still = stub.GetAllocation(pb.GetAllocationRequest(pool=POOL, owner="pod-a/eth0"), metadata=md(a), timeout=15)
    assert still.node == node_a and list(still.addresses) == list(mine.addresses)
    stub.Release(pb.ReleaseRequest(pool=POOL, owner="pod-a/eth0"), metadata=md(a), timeout=15)
    # Verified once, then from the cache (and the pipeline's fast path) until cacheSeconds.
    assert cluster.server_metric("dsipam_kube_token_cache_hits_total") > 0


@pytest.mark.parametrize(("which", "words"), [
    ("wrong_audience", "audience"),
    ("not_listed", "ServiceAccount"),
    ("no_node", "bound to a pod on a node"),
    ("unbound", "bound to a pod on a node"),
    ("expired", "expired"),
    ("forged", "did not authenticate"),
    ("garbage", "not a known bearer token"),
    ("garbage_jwt", "not a JWT"),
])
def test_bad_tokens_are_unauthenticated(cluster: Cluster, stub: ipam_pb2_grpc.IpamServiceStub, which: str,
                                        words: str) -> None:
    now = int(time.time())
    listed = {"aud": ["dsipam"], "iss": cluster.api.issuer, "sub": f"system:serviceaccount:{cluster.namespace}:dsipam-cni",
              "iat": now - 7200, "nbf": now - 7200, "exp": now + 600,
              "kubernetes.io": {"namespace": cluster.namespace, "node": {"name": cluster.nodes["a"]},
                                "pod": {"name": cluster.pods["a"][0], "uid": cluster.pods["a"][1]}}}
    if which == "expired":  # signed with the cluster's real key: only its exp is wrong
        token = sign_jwt({**listed, "exp": now - 60}, (cluster.api.pki / "sa.key").read_bytes())
    elif which == "forged":  # every claim right, signed with another key
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = sign_jwt({**listed, "jti": uuid.uuid4().hex}, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif which == "garbage":
        token = "dsipam_" + uuid.uuid4().hex
    elif which == "garbage_jwt":
        token = "eyJhbGciOiJSUzI1NiJ9.not-json!.c2ln"
    else:
        token = cluster.tokens[which]
    for _ in range(2):  # the second time from the refusal cache where a review was made
        err = code_of(lambda: stub.GetPool(pb.GetPoolRequest(name="any"), metadata=md(token), timeout=15))
        assert err.code() == UNAUTH, (err.code(), err.details())
        assert words in err.details() and error_info(err).reason == "UNAUTHENTICATED"


def test_refused_before_any_review_where_the_token_cannot_be_listed(cluster: Cluster,
                                                                   stub: ipam_pb2_grpc.IpamServiceStub) -> None:
    """Wrong audience, non-listed ServiceAccount, garbage: no TokenReview reaches the API server."""
    before = cluster.reviews_at_api_server()
    for token in (cluster.tokens["wrong_audience"], cluster.tokens["not_listed"], "a.b.c", "x" * 5000):
        for _ in range(20):
            err = code_of(lambda t=token: stub.GetPool(pb.GetPoolRequest(name="any"), metadata=md(t), timeout=15))
            assert err.code() == UNAUTH
    assert cluster.reviews_at_api_server() == before


def test_a_deleted_pods_token_is_refused(cluster: Cluster, stub: ipam_pb2_grpc.IpamServiceStub,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from kubernetes_asyncio import client

    token = cluster.tokens["b"]
    err = code_of(lambda: stub.GetPool(pb.GetPoolRequest(name="missing"), metadata=md(token), timeout=15))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # authenticated (a shim may GetPool), the pool is missing

    async def delete() -> None:
        async with cluster.api.api_client() as api:
            await client.CoreV1Api(api).delete_namespaced_pod(cluster.pods["b"][0], cluster.namespace,
                                                              grace_period_seconds=0)

    asyncio.run(delete())
    deleted = time.monotonic()
    # The API server caches a successful token authentication for 10 s; dsipam for cacheSeconds.
    bound = 10 + CACHE_SECONDS + 8
    while True:
        err = code_of(lambda: stub.GetPool(pb.GetPoolRequest(name="missing"), metadata=md(token), timeout=15))
        if err.code() == UNAUTH:
            break
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() - deleted < bound, f"the deleted pod's token is still accepted after {bound} s"
        time.sleep(0.25)
    window = time.monotonic() - deleted
    assert "did not authenticate" in err.details()
    with capsys.disabled():
        print(f"\n  deleted pod's token refused after {window:.1f} s (API server cache 10 s + cacheSeconds "
              f"{CACHE_SECONDS})")


jwt_parts = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=120),
    st.dictionaries(st.sampled_from(["alg", "aud", "exp", "sub", "iss", "kid"]),
                    st.one_of(st.integers(), st.text(max_size=30), st.just("dsipam"), st.just(["dsipam"])),
                    max_size=6).map(_b64),
)


def test_jwt_shaped_bearer_values_are_refused_with_bounded_reviews(cluster: Cluster) -> None:
    """Arbitrary JWT-shaped values, and plausible forgeries (listed ServiceAccount, audience,
    expiry: the most an attacker can make without the key), through the real server: only
    UNAUTHENTICATED, or UNAVAILABLE TOKEN_REVIEW_BUSY past the bucket; the TokenReviews counted
    at the API server stay within reviewBurst + reviewsPerSecond x elapsed."""
    listed_sub = f"system:serviceaccount:{cluster.namespace}:dsipam-cni"
    forged = st.builds(lambda jti, exp: ".".join((_b64({"alg": "RS256"}), _b64(
        {"aud": ["dsipam"], "sub": listed_sub, "exp": int(time.time()) + exp, "jti": jti}), "c2ln")),
        st.uuids().map(str), st.integers(60, 10**6))
    seen: dict[str, int] = {}
    with grpc.insecure_channel(cluster.server.target) as channel:
        stub = ipam_pb2_grpc.IpamServiceStub(channel)
        before = cluster.reviews_at_api_server()
        start = time.monotonic()

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.tuples(jwt_parts, jwt_parts, jwt_parts).map(".".join), forged))
        def one(token: str) -> None:
            t0 = time.perf_counter()
            err = code_of(lambda: stub.GetPool(pb.GetPoolRequest(name="x"), metadata=md(token), timeout=15))
            reason = error_info(err).reason
            assert (err.code(), reason) in ((UNAUTH, "UNAUTHENTICATED"),
                                            (grpc.StatusCode.UNAVAILABLE, "TOKEN_REVIEW_BUSY")), err.details()
            seen[reason] = seen.get(reason, 0) + 1
            assert time.perf_counter() - t0 < 5

        one()
        elapsed = time.monotonic() - start
        reviews = cluster.reviews_at_api_server() - before
    assert seen.get("UNAUTHENTICATED", 0) > 0
    assert reviews <= REVIEW_BURST + REVIEWS_PER_SECOND * elapsed + 1, (reviews, elapsed, seen)
    assert cluster.server_metric("dsipam_kube_token_reviews_total") >= reviews
    print(f"\n  {sum(seen.values())} bearer values in {elapsed:.1f} s: {seen}; TokenReviews at the API server: "
          f"{reviews:g}")


def test_installer_puts_the_projected_token_on_the_node_and_follows_its_rotation(
        cluster: Cluster, tmp_path: Path) -> None:
    """deploy/docker/install-cni.sh with the DaemonSet's projected token (no token in the Secret):
    the node gets that token (0600) and the conflist points at it; when the kubelet rotates the
    token, the node's copy follows (DSIPAM_CNI_TOKEN_REFRESH), and the plugin, which reads
    tokenFile on each call, sends the new one."""
    import os
    import signal
    import subprocess

    from test_deploy_cni_install import INSTALL, WRAPPER, _bundle, _template

    from dsipam.cni._config import parse as parse_config

    bundle = _bundle(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
    projected = tmp_path / "projected"
    projected.mkdir()
    (projected / "token").write_text(cluster.tokens["a"])
    template = tmp_path / "conflist.template"
    template.write_text(_template())
    env = {"PATH": os.environ["PATH"], "DSIPAM_CNI_HOST_ROOT": str(tmp_path / "node"),
           "DSIPAM_CNI_BUNDLE_SRC": str(bundle), "DSIPAM_CNI_WRAPPER_SRC": str(WRAPPER),
           "DSIPAM_CNI_TEMPLATE": str(template), "DSIPAM_CNI_CREDENTIALS": str(creds),
           "DSIPAM_CNI_SA_TOKEN": str(projected / "token"), "DSIPAM_CNI_TOKEN_REFRESH": "1",
           "DSIPAM_CNI_SERVER": "198.18.0.10:50051", "NODE_NAME": cluster.nodes["a"]}
    log = tmp_path / "install.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["sh", str(INSTALL)], env=env, stdout=out, stderr=subprocess.STDOUT)
    node_token = tmp_path / "node/etc/dsipam-cni/token"
    conflist = tmp_path / "node/etc/cni/net.d/90-dsipam.conflist"
    try:
        deadline = time.monotonic() + 60
        while "installed; waiting" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        assert "auth: ServiceAccount token over TLS" in log.read_text()
        assert node_token.read_text() == cluster.tokens["a"] and node_token.stat().st_mode & 0o777 == 0o600
        plugins = json.loads(conflist.read_text())
        netconf = {"cniVersion": plugins["cniVersion"], "name": plugins["name"], **plugins["plugins"][0]}
        netconf["ipam"]["tokenFile"] = str(node_token)  # the plugin's view of the node's root
        assert parse_config(netconf).token == cluster.tokens["a"]
        # The kubelet's rotation: a new file renamed into place.
        (projected / ".new").write_text(cluster.tokens["b"])
        os.replace(projected / ".new", projected / "token")
        deadline = time.monotonic() + 15
        while node_token.read_text() != cluster.tokens["b"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert node_token.stat().st_mode & 0o777 == 0o600 and "rotated" in log.read_text()
        assert parse_config(netconf).token == cluster.tokens["b"]  # read again on the next call
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
