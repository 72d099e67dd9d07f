"""Kubernetes ServiceAccount tokens as dsipam identities (docs/security.md, "Kubernetes node identity").

A CNI shim authenticates with the projected ServiceAccount token of its node's dsipam-cni
DaemonSet pod (audience ``dsipam``). The server asks the Kubernetes API server about the token
with a **TokenReview** (``authentication.k8s.io/v1``, ``spec.audiences: [<audience>]``) and takes

- the identity from ``status.user.username`` (``system:serviceaccount:<namespace>:<name>``),
  which must be one of the ServiceAccounts listed in the auth config (each with a role);
- for role ``shim``, the node from ``status.user.extra["authentication.kubernetes.io/node-name"]``:
  the node of the pod the token is bound to. A shim token without it is refused.

TokenReview (rather than verifying the JWT locally against the issuer's JWKS) is chosen because
the API server then also refuses a token whose pod was deleted (or whose ServiceAccount was
deleted or re-created): a revoked DaemonSet pod's token stops working within the cache window.

What keeps this cheap and bounded under a flood of made-up tokens:

1. **No network for what cannot be a listed token**: the token must be a JWT (three base64url
   parts, at most :data:`MAX_TOKEN_CHARS`), whose unverified claims name the audience, a
   ServiceAccount that is listed (``sub``) and an ``exp`` in the future. Garbage, a wrong
   audience, an expired token, another ServiceAccount are UNAUTHENTICATED without a review.
2. **Caches keyed by sha256(token)** (32 bytes, not the token), LRU-bounded: verified tokens until
   min(exp, ``cacheSeconds``) (these also take the pipeline's fast path); refused tokens for
   ``refusedCacheSeconds``.
3. **One review per token at a time** (concurrent calls with the same new token share it), at
   most ``maxConcurrentReviews`` in flight, and a **token bucket** of ``reviewsPerSecond`` /
   ``reviewBurst`` reviews: past it a new token is UNAVAILABLE (retryable, reason
   ``TOKEN_REVIEW_BUSY``), counted, never queued without bound. A token the API server has
   accepted before (remembered by hash until its ``exp``, in an LRU of ``maxCachedTokens``) is
   reviewed again every ``cacheSeconds`` outside the bucket: forged tokens (whose claims anyone
   can write) that keep the bucket empty delay only tokens never seen, never the shims already
   verified.

An API server that cannot be reached (or refuses the review: missing RBAC) is UNAVAILABLE,
logged at ERROR and counted (``dsipam_kube_token_reviews_total{result="error"}``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from .security import Role, TokenEntry

log = logging.getLogger("dsipam.kube_auth")

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""TokenReview ``status.user.extra`` key of the node a bound pod token's pod runs on."""
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"
MAX_TOKEN_CHARS = 8192
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class KubeAuthError(Exception):
    """A refusal: the gRPC code, a message naming the field, and the reason of the error details."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


def _unauthenticated(message: str) -> KubeAuthError:
    return KubeAuthError(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {message}", "UNAUTHENTICATED")


# -- config ----------------------------------------------------------------------------

_KEYS = {"serviceAccounts", "audience", "kubeconfig", "context", "cacheSeconds", "refusedCacheSeconds",
         "maxCachedTokens", "reviewsPerSecond", "reviewBurst", "maxConcurrentReviews", "timeoutSeconds"}


@dataclass
class KubeAuthConfig:
    """The ``kubernetes`` section of the auth config."""

    accounts: dict[str, Role] = field(default_factory=dict)  # "system:serviceaccount:ns:name" -> role
    audience: str = "dsipam"
    kubeconfig: str = ""  # "": in-cluster (the server pod's own ServiceAccount)
    context: str = ""
    cache_seconds: float = 30.0
    refused_cache_seconds: float = 30.0
    max_cached_tokens: int = 10_000
    reviews_per_second: float = 20.0
    review_burst: int = 50
    max_concurrent_reviews: int = 8
    timeout_seconds: float = 5.0

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> KubeAuthConfig:
        from .security import parse_role

        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping with serviceAccounts")
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        cfg = cls()
        accounts = data.get("serviceAccounts")
        if not isinstance(accounts, list) or not accounts:
            raise ValueError(f"{where}.serviceAccounts: required: a list of {{namespace, name, role}}")
        for i, entry in enumerate(accounts):
            at = f"{where}.serviceAccounts[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{at}: expected a mapping with namespace, name and role")
            extra = set(entry) - {"namespace", "name", "role"}
            if extra:
                raise ValueError(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
            namespace, name = entry.get("namespace"), entry.get("name")
            if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
                raise ValueError(f"{at}.namespace: expected a namespace name (a DNS label), not {namespace!r}")
            if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name):
                raise ValueError(f"{at}.name: expected a ServiceAccount name (a DNS subdomain), not {name!r}")
            role = parse_role(entry.get("role"), f"{at}.role")
            username = f"{SA_PREFIX}{namespace}:{name}"
            if username in cfg.accounts:
                raise ValueError(f"{at}: {namespace}/{name} is listed twice")
            cfg.accounts[username] = role
        audience = data.get("audience", cfg.audience)
        if not isinstance(audience, str) or not audience or len(audience) > 253:
            raise ValueError(f"{where}.audience: expected a non-empty string (the projected token's audience)")
        cfg.audience = audience
        for key, attr in (("kubeconfig", "kubeconfig"), ("context", "context")):
            value = data.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"{where}.{key}: expected a string")
            setattr(cfg, attr, value)
        cfg.cache_seconds = _number(data, "cacheSeconds", where, cfg.cache_seconds, 0, 3600)
        cfg.refused_cache_seconds = _number(data, "refusedCacheSeconds", where, cfg.refused_cache_seconds, 0, 3600)
        cfg.max_cached_tokens = int(_number(data, "maxCachedTokens", where, cfg.max_cached_tokens, 1, 1_000_000,
                                            integer=True))
        cfg.reviews_per_second = _number(data, "reviewsPerSecond", where, cfg.reviews_per_second, 0.01, 10_000)
        cfg.review_burst = int(_number(data, "reviewBurst", where, cfg.review_burst, 1, 100_000, integer=True))
        cfg.max_concurrent_reviews = int(_number(data, "maxConcurrentReviews", where, cfg.max_concurrent_reviews,
                                                 1, 1000, integer=True))
        cfg.timeout_seconds = _number(data, "timeoutSeconds", where, cfg.timeout_seconds, 0.1, 120)
        return cfg


def _number(data: dict, key: str, where: str, default: float, low: float, high: float,
            integer: bool = False) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (
            integer and not float(value).is_integer()):
        raise ValueError(f"{where}.{key}: expected {'an integer' if integer else 'a number'}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where}.{key}: {value} is out of range [{low:g}, {high:g}]")
    return float(value)


# -- the checks before any review -------------------------------------------------------


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts (what a ServiceAccount token is); cheap, no decoding."""
    return token.count(".") == 2 and len(token) <= MAX_TOKEN_CHARS


def _b64json(part: str, what: str) -> dict:
    if not _B64URL.fullmatch(part):
        raise _unauthenticated(f"not a JWT: the {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _unauthenticated(f"not a JWT: the {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise _unauthenticated(f"not a JWT: the {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Claims:
    """What an unverified token says about itself (trusted only after the review)."""

    username: str
    role: Role
    expires: float


def unverified_claims(token: str, cfg: KubeAuthConfig, now: float) -> Claims:
    """The token's own claims if it could be a valid token of a listed ServiceAccount for the
    audience; else :class:`KubeAuthError` UNAUTHENTICATED naming what is wrong. No network."""
    if len(token) > MAX_TOKEN_CHARS:
        raise _unauthenticated(f"the token is longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise _unauthenticated("not a known bearer token, nor a JWT")
    header = _b64json(parts[0], "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise _unauthenticated("not a JWT: the header has no signature algorithm (alg)")
    if not _B64URL.fullmatch(parts[2]):
        raise _unauthenticated("not a JWT: the signature is not base64url")
    claims = _b64json(parts[1], "payload")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if cfg.audience not in audiences:
        raise _unauthenticated(f"the Kubernetes token is not for audience {cfg.audience!r} (aud)")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or exp != exp:
        raise _unauthenticated("the Kubernetes token has no expiry (exp)")
    if exp <= now:
        raise _unauthenticated("the Kubernetes token has expired (exp)")
    sub = claims.get("sub")
    role = cfg.accounts.get(sub) if isinstance(sub, str) else None
    if role is None:
        raise _unauthenticated("the token's ServiceAccount (sub) is not one of the auth config's "
                               "kubernetes.serviceAccounts")
    return Claims(sub, role, float(exp))  # type: ignore[arg-type]


# -- bounds -----------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` never waits."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = float(burst)
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


class ExpiringLru:
    """At most ``size`` keys, each with an expiry; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes, now: float) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def pop(self, key: bytes) -> None:
        self._items.pop(key, None)

    def put(self, key: bytes, value: Any, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


# -- the verifier -------------------------------------------------------------------------

RESULTS = ("accepted", "refused", "error")
REFUSALS = ("malformed", "audience", "expired", "account", "review", "no_node", "cached", "busy")


class KubeTokenVerifier:
    """Verifies bearer tokens that are Kubernetes ServiceAccount tokens (see the module doc)."""

    def __init__(self, cfg: KubeAuthConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self._ok = ExpiringLru(cfg.max_cached_tokens)
        self._refused = ExpiringLru(cfg.max_cached_tokens)
        self._known = ExpiringLru(cfg.max_cached_tokens)  # accepted once: re-reviews skip the bucket
        self._bucket = TokenBucket(cfg.reviews_per_second, cfg.review_burst)
        self._inflight: dict[bytes, asyncio.Future[TokenEntry]] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._api: Any = None
        self._api_lock: asyncio.Lock | None = None
        self.reviews = dict.fromkeys(RESULTS, 0)  # TokenReviews sent, by outcome
        self.refusals = dict.fromkeys(REFUSALS, 0)  # tokens refused, by why
        self.cache_hits = 0

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def cached(self, token: str) -> TokenEntry | None:
        """The identity of a token verified recently (and not expired since); no network."""
        if not looks_like_jwt(token):
            return None
        entry = self._ok.get(self.key(token), self.clock())
        if entry is not None:
            self.cache_hits += 1
        return entry

    async def verify(self, token: str) -> TokenEntry:
        """The identity of ``token``, or :class:`KubeAuthError`."""
        now = self.clock()
        key = self.key(token)
        entry = self._ok.get(key, now)
        if entry is not None:
            self.cache_hits += 1
            return entry
        try:
            claims = unverified_claims(token, self.cfg, now)
        except KubeAuthError as exc:
            self.refusals[_refusal_kind(exc.message)] += 1
            raise
        refused = self._refused.get(key, now)
        if refused is not None:
            self.refusals["cached"] += 1
            raise _unauthenticated(refused)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self._known.get(key, now) is None and not self._bucket.take():
            self.refusals["busy"] += 1
            raise KubeAuthError(
                grpc.StatusCode.UNAVAILABLE,
                f"authorization: too many new Kubernetes tokens to review (more than {self.cfg.reviews_per_second:g}/s, "
                "kubernetes.reviewsPerSecond); retry with backoff", "TOKEN_REVIEW_BUSY")
        # The review runs in a task of its own: a caller that goes away does not cancel it for
        # the others waiting on the same token.
        task = asyncio.ensure_future(self._review(token, key, claims))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: bytes, task: asyncio.Future[TokenEntry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller went away

    async def _review(self, token: str, key: bytes, claims: Claims) -> TokenEntry:
        from .security import Role, TokenEntry, parse_node

        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.cfg.max_concurrent_reviews)
        async with self._semaphore:
            try:
                status = await self._token_review(token)
            except Exception as exc:  # noqa: BLE001 - any failure to get an answer
                self.reviews["error"] += 1
                log.error("TokenReview failed: %s: %s", type(exc).__name__, _short(exc))
                raise KubeAuthError(
                    grpc.StatusCode.UNAVAILABLE,
                    "authorization: the Kubernetes API server did not review the token "
                    f"({type(exc).__name__}); retry with backoff", "TOKEN_REVIEW_FAILED") from None
        now = self.clock()

        def refuse(why: str, kind: str = "review") -> KubeAuthError:
            self.reviews["refused"] += 1
            self.refusals[kind] += 1
            self._refused.put(key, why, now + self.cfg.refused_cache_seconds)
            self._known.pop(key)
            return _unauthenticated(why)

        if not getattr(status, "authenticated", False):
            raise refuse("the Kubernetes API server did not authenticate the token (TokenReview: "
                         f"{_short(getattr(status, 'error', None) or 'not authenticated')})")
        if self.cfg.audience not in (getattr(status, "audiences", None) or ()):
            raise refuse(f"the Kubernetes token is not for audience {self.cfg.audience!r} (TokenReview)")
        user = getattr(status, "user", None)
        username = getattr(user, "username", None)
        if username != claims.username:
            raise refuse("the token's ServiceAccount (TokenReview user) is not one of the auth config's "
                         "kubernetes.serviceAccounts")
        role = claims.role
        node: str | None = None
        extra = getattr(user, "extra", None) or {}
        if role is Role.SHIM:
            names = extra.get(NODE_NAME_EXTRA) or []
            if len(names) != 1:
                raise refuse("a shim's Kubernetes token must be bound to a pod on a node (TokenReview user.extra "
                             f"{NODE_NAME_EXTRA}); request it for a pod with spec.nodeName (a projected token)",
                             "no_node")
            try:
                node = parse_node(names[0], role, NODE_NAME_EXTRA)
            except ValueError as exc:
                raise refuse(str(exc), "no_node") from None
        namespace, _, name = username[len(SA_PREFIX):].partition(":")
        pods = extra.get(POD_NAME_EXTRA) or []
        label = f"sa:{namespace}/{name}" + (f"@{node}" if node else "") + (f" pod {pods[0]}" if pods else "")
        entry = TokenEntry(label, role, b"", None, node)
        self.reviews["accepted"] += 1
        self._ok.put(key, entry, min(claims.expires, now + self.cfg.cache_seconds))
        self._known.put(key, True, claims.expires)
        return entry

    async def _token_review(self, token: str) -> Any:
        """POST a TokenReview; its status."""
        from kubernetes_asyncio import client

        api = await self._client()
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[self.cfg.audience]))
        review = await client.AuthenticationV1Api(api).create_token_review(
            body, _request_timeout=self.cfg.timeout_seconds)
        return review.status

    async def _client(self) -> Any:
        if self._api is not None:
            return self._api
        if self._api_lock is None:
            self._api_lock = asyncio.Lock()
        async with self._api_lock:
            if self._api is None:
                from kubernetes_asyncio import client, config

                configuration = client.Configuration()
                if self.cfg.kubeconfig:
                    await config.load_kube_config(config_file=self.cfg.kubeconfig, context=self.cfg.context or None,
                                                  client_configuration=configuration)
                else:
                    config.load_incluster_config(client_configuration=configuration)
                self._api = client.ApiClient(configuration)
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await api.close()

    def collector(self) -> Any:
        """A Prometheus collector of the counters (for the server's registry)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        verifier = self

        class _Collector:
            def collect(self) -> Any:
                reviews = CounterMetricFamily("dsipam_kube_token_reviews", "TokenReviews sent to the Kubernetes API "
                                              "server, by result (accepted, refused, error).", labels=["result"])
                for result, count in verifier.reviews.items():
                    reviews.add_metric([result], count)
                yield reviews
                refused = CounterMetricFamily("dsipam_kube_token_refusals", "Kubernetes tokens refused, by why "
                                              "(malformed, audience, expired, account, review, no_node, cached, "
                                              "busy).", labels=["reason"])
                for reason, count in verifier.refusals.items():
                    refused.add_metric([reason], count)
                yield refused
                hits = CounterMetricFamily("dsipam_kube_token_cache_hits", "Kubernetes tokens found verified in "
                                           "the cache.")
                hits.add_metric([], verifier.cache_hits)
                yield hits
                size = GaugeMetricFamily("dsipam_kube_token_cache_entries", "Kubernetes tokens cached, by kind.",
                                         labels=["kind"])
                size.add_metric(["verified"], len(verifier._ok))
                size.add_metric(["refused"], len(verifier._refused))
                yield size

            def describe(self) -> Any:
                return []

        return _Collector()


def _refusal_kind(message: str) -> str:
    if "audience" in message:
        return "audience"
    if "expired" in message or "expiry" in message:
        return "expired"
    if "ServiceAccount" in message:
        return "account"
    return "malformed"


def _short(value: object) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


__all__ = [
    "NODE_NAME_EXTRA",
    "Claims",
    "ExpiringLru",
    "KubeAuthConfig",
    "KubeAuthError",
    "KubeTokenVerifier",
    "TokenBucket",
    "looks_like_jwt",
    "unverified_claims",
]
