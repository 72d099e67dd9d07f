"""The Kubernetes token verifier's parts that need no API server (server/dsipam/server/kube_auth.py):
the ``kubernetes`` section of the auth config, the checks made before any TokenReview, the
bounds (token bucket, LRU caches), and an API server that cannot be reached (a closed loopback
port: a real connection refusal). The reviews themselves are tested against a real API server in
tests/e2e/test_kube_shim_identity.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import free_port

from dsipam.server import kube_auth, security
from dsipam.server.kube_auth import (
    ExpiringLru,
    KubeAuthConfig,
    KubeAuthError,
    KubeTokenVerifier,
    TokenBucket,
    unverified_claims,
)

SA = "system:serviceaccount:dsipam-system:dsipam-cni"


def _b64(value: object) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt(claims: dict, header: dict | None = None, signature: bytes = b"not-a-signature") -> str:
    return ".".join((_b64(header or {"alg": "RS256", "kid": "k"}), _b64(claims), _b64(signature)))


def config(**extra: object) -> KubeAuthConfig:
    data = {"serviceAccounts": [{"namespace": "dsipam-system", "name": "dsipam-cni", "role": "shim"},
                                {"namespace": "dsipam-system", "name": "dsipam-controller", "role": "controller"}],
            **extra}
    return KubeAuthConfig.from_mapping(data, "kubernetes")


def good_claims(now: float, **over: object) -> dict:
    return {"aud": ["dsipam"], "exp": int(now) + 600, "iat": int(now), "nbf": int(now),
            "iss": "https://127.0.0.1:6443", "sub": SA, **over}


# -- config -----------------------------------------------------------------------------------


def test_config_defaults_and_roles() -> None:
    cfg = config()
    assert cfg.audience == "dsipam" and cfg.kubeconfig == ""
    assert cfg.accounts == {SA: security.Role.SHIM,
                            "system:serviceaccount:dsipam-system:dsipam-controller": security.Role.CONTROLLER}


def test_an_auth_config_with_only_kubernetes_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(yaml.safe_dump({"kubernetes": {"serviceAccounts": [
        {"namespace": "kube-system", "name": "dsipam-cni", "role": "shim"}], "audience": "dsipam"}}))
    cfg = security.load_auth_config(path)
    assert cfg.kubernetes is not None and not cfg.tokens
    authorizer = security.Authorizer(cfg)
    assert authorizer.kube is not None
    # Not a JWT, not a hashed token: nothing is looked up for it.
    assert authorizer.token_entry("dsipam_whatever") is None


@pytest.mark.parametrize(("data", "field"), [
    ({}, "kubernetes.serviceAccounts: required"),
    ({"serviceAccounts": []}, "kubernetes.serviceAccounts: required"),
    ({"serviceAccounts": ["x"]}, "kubernetes.serviceAccounts[0]: expected a mapping"),
    ({"serviceAccounts": [{"namespace": "Bad_NS", "name": "a", "role": "shim"}]}, "serviceAccounts[0].namespace"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "", "role": "shim"}]}, "serviceAccounts[0].name"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "root"}]}, "serviceAccounts[0].role"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim", "node": "n"}]}, "unknown key(s) node"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"},
                          {"namespace": "ns", "name": "a", "role": "admin"}]}, "listed twice"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"}], "audience": ""}, "kubernetes.audience"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"}], "cacheSeconds": -1}, "cacheSeconds"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"}], "reviewBurst": 1.5}, "reviewBurst"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"}], "reviewsPerSecond": True},
     "reviewsPerSecond"),
    ({"serviceAccounts": [{"namespace": "ns", "name": "a", "role": "shim"}], "apiServer": "x"}, "unknown key(s) apiServer"),
    ("yes", "kubernetes: expected a mapping"),
])
def test_config_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValueError) as info:
        security.AuthConfig.from_mapping({"kubernetes": data}, "auth")
    assert field in str(info.value)


# -- the checks before a review -----------------------------------------------------------------


def test_a_listed_token_passes_the_checks() -> None:
    now = time.time()
    claims = unverified_claims(jwt(good_claims(now)), config(), now)
    assert claims.username == SA and claims.role is security.Role.SHIM and claims.expires == int(now) + 600
    one_audience = unverified_claims(jwt(good_claims(now, aud="dsipam")), config(), now)
    assert one_audience.username == SA


@pytest.mark.parametrize(("claims", "words"), [
    ({"aud": ["other"]}, "audience"),
    ({"aud": "dsipam-x"}, "audience"),
    ({"aud": None}, "audience"),
    ({"exp": 1}, "expired"),
    ({"exp": "soon"}, "expiry"),
    ({"sub": "system:serviceaccount:default:default"}, "ServiceAccount"),
    ({"sub": "system:serviceaccount:dsipam-system:dsipam-cni-x"}, "ServiceAccount"),
    ({"sub": 7}, "ServiceAccount"),
])
def test_claims_that_cannot_be_listed_are_unauthenticated(claims: dict, words: str) -> None:
    now = time.time()
    with pytest.raises(KubeAuthError) as info:
        unverified_claims(jwt(good_claims(now, **claims)), config(), now)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and words in info.value.message
    assert info.value.message.startswith("authorization: ")


@pytest.mark.parametrize("token", [
    "a.b", "a..c", "..", "x" * 9000, "e30.e30.", "!!.e30.e30", "e30.e30.e30",  # {} header: no alg
    jwt({"sub": SA}, header={"alg": "none"}), _b64(b"[1]") + ".e30.e30", "e30." + _b64(b"\xff\xfe") + ".e30",
])
def test_malformed_tokens_are_unauthenticated(token: str) -> None:
    with pytest.raises(KubeAuthError) as info:
        unverified_claims(token, config(), time.time())
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


jwt_parts = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=200),
    st.text(max_size=50),
    st.dictionaries(st.sampled_from(["alg", "aud", "exp", "sub", "iss", "nbf", "kid"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
                              st.lists(st.text(max_size=20), max_size=3), st.just("dsipam"), st.just(SA)),
                    max_size=7).map(_b64),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(jwt_parts, jwt_parts, jwt_parts).map(".".join) | st.text(max_size=300))
@example("e30.e30.e30")
@example(_b64({"alg": "RS256"}) + "." + _b64({"aud": "dsipam", "exp": 1e308, "sub": SA}) + ".sig")
@example(_b64({"alg": "RS256"}) + "." + _b64({"aud": ["dsipam"], "exp": float("inf"), "sub": SA}) + ".sig")
def test_any_token_is_claims_or_unauthenticated(token: str) -> None:
    now = time.time()
    start = time.perf_counter()
    try:
        claims = unverified_claims(token, config(), now)
    except KubeAuthError as exc:
        assert exc.code is grpc.StatusCode.UNAUTHENTICATED and exc.message.startswith("authorization: ")
    else:
        assert claims.username in config().accounts and claims.expires > now
    assert time.perf_counter() - start < 0.05


# -- bounds ---------------------------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = [100.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: clock[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    clock[0] += 0.5  # one more at 2/s
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock[0] += 100  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_expiring_lru_is_bounded_and_expires() -> None:
    lru = ExpiringLru(3)
    for i in range(10):
        lru.put(bytes([i]), i, expires=50.0)
    assert len(lru) == 3 and lru.get(bytes([0]), 1.0) is None and lru.get(bytes([9]), 1.0) == 9
    assert lru.get(bytes([9]), 50.0) is None and len(lru) == 2


# -- an API server that cannot be reached ------------------------------------------------------------


def _unreachable_kubeconfig(tmp_path: Path) -> Path:
    port = free_port()  # nothing listens there: connections are refused at once
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


async def test_unreachable_api_server_is_unavailable_counted_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    verifier = KubeTokenVerifier(config(kubeconfig=str(_unreachable_kubeconfig(tmp_path)), timeoutSeconds=2))
    try:
        with pytest.raises(KubeAuthError) as info:
            await verifier.verify(jwt(good_claims(time.time())))
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and info.value.reason == "TOKEN_REVIEW_FAILED"
        assert verifier.reviews["error"] == 1
        assert any(r.levelname == "ERROR" and "TokenReview failed" in r.getMessage() for r in caplog.records)
    finally:
        await verifier.close()


async def test_a_flood_of_new_tokens_sends_at_most_the_burst_of_reviews(tmp_path: Path) -> None:
    """2,000 distinct tokens with claims that pass every local check (the worst an attacker can
    make without the signing key), 200 at a time: reviews stay within the bucket; the rest are
    UNAVAILABLE TOKEN_REVIEW_BUSY at once; nothing waits without bound and the caches stay bounded."""
    verifier = KubeTokenVerifier(config(kubeconfig=str(_unreachable_kubeconfig(tmp_path)), timeoutSeconds=2,
                                        reviewsPerSecond=5, reviewBurst=20, maxCachedTokens=100))
    now = time.time()
    codes: dict[str, int] = {}

    async def one(i: int) -> None:
        try:
            await verifier.verify(jwt(good_claims(now, jti=str(i))))
        except KubeAuthError as exc:
            codes[exc.reason] = codes.get(exc.reason, 0) + 1

    start = time.monotonic()
    try:
        for batch in range(10):
            await asyncio.gather(*(one(batch * 200 + i) for i in range(200)))
    finally:
        await verifier.close()
    elapsed = time.monotonic() - start
    sent = sum(verifier.reviews.values())
    assert sum(codes.values()) == 2000
    assert sent <= 20 + 5 * elapsed + 1, (sent, elapsed)
    assert codes["TOKEN_REVIEW_BUSY"] == 2000 - sent == verifier.refusals["busy"]
    assert not verifier._inflight and len(verifier._ok) == 0 and len(verifier._refused) <= 100
    assert elapsed < 30


async def test_one_review_for_many_calls_with_the_same_new_token(tmp_path: Path) -> None:
    verifier = KubeTokenVerifier(config(kubeconfig=str(_unreachable_kubeconfig(tmp_path)), timeoutSeconds=2))
    token = jwt(good_claims(time.time()))
    try:
        results = await asyncio.gather(*(verifier.verify(token) for _ in range(50)), return_exceptions=True)
    finally:
        await verifier.close()
    assert all(isinstance(r, KubeAuthError) and r.reason == "TOKEN_REVIEW_FAILED" for r in results)
    assert verifier.reviews["error"] == 1


def test_module_exports() -> None:
    assert set(kube_auth.__all__) <= set(dir(kube_auth))
