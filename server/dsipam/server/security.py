"""Who may call what: roles, the method table, bearer tokens, client certificates and TLS.

A caller's identity (a role, and for a shim the node it serves) comes from (in this order):

1. an ``authorization: Bearer <token>`` header whose token matches a hashed token of the
   auth config (a token that matches nothing is refused, even on an mTLS connection);
2. on the unix socket listener, ``unix_socket_role`` and ``unix_socket_node`` (default: no
   role, so the socket needs a token too); the socket file's permissions decide who can connect;
3. the client certificate of an mTLS connection, by its subject CN or a subject alternative
   name (DNS, URI, e-mail or IP), mapped in the auth config.

A shim identity is scoped to one node: every shim token, shim certificate mapping and a shim
unix socket must name its ``node``, and a config with a shim that names none is refused (a
cluster-wide shim is what a controller is). The authorizer records the caller's node in
:data:`caller_node` for the servicer, which confines shims to their node's allocations
(docs/security.md, "Node-scoped shims"). Controllers and admins have no node: cluster-wide.

No identity is UNAUTHENTICATED; an identity whose role is too low for the method is
PERMISSION_DENIED. Health and reflection are open to everybody. The one place that says
which role a method needs is :data:`METHOD_ROLES`; a method missing from it needs ``admin``.

The auth config is YAML (or JSON, which is YAML too)::

    tokens:
      - name: shim-node-a                    # shown in logs
        role: shim
        node: node-a                         # required for shims: the node it serves
        hash: salted-sha256:<salt hex>:<sha256(salt || token) hex>   # or sha256:<hex>
    clients:
      - cn: dsipam-controller                # or  san: spiffe://cluster/sa/controller
        role: controller
      - cn: node-b.shim
        role: shim
        node: node-b
    unix_socket_role: none                   # the default: the unix socket needs a token too
    # unix_socket_role: shim  with  unix_socket_node: node-a  for a node-local server
    kubernetes:                              # ServiceAccount tokens, reviewed by the API server
      serviceAccounts:                       # only these; a shim's node is its token's bound node
        - {namespace: dsipam-system, name: dsipam-cni, role: shim}
      audience: dsipam                       # the projected token's audience
      # kubeconfig: /path  (default: in-cluster); cacheSeconds, reviewsPerSecond, ... (kube_auth.py)

A bearer token that is a JWT and matches no hashed token is, with a ``kubernetes`` section,
reviewed by the Kubernetes API server (:mod:`dsipam.server.kube_auth`): a TokenReview for the
audience, the ServiceAccount must be listed, and a shim's node is the token's bound node
(``authentication.kubernetes.io/node-name``), so that no per-node secret needs distributing.

``dsipam token new ROLE [--node NODE]`` prints a fresh random token and its config entry. Tokens are
256-bit random strings, so a fast salted hash is as good as a slow one and keeps every
call cheap; verified tokens are also remembered in memory.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .kube_auth import KubeAuthConfig, KubeAuthError, KubeTokenVerifier, looks_like_jwt
from .rpc.errors import to_grpc_status

SERVICE_PREFIX = "/dsipam.v1.IpamService/"
"""Every IpamService method path starts with this."""

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Services anybody may call: health checks and reflection."""


class Role(enum.IntEnum):
    """Roles are ordered: each one may do everything the lower ones may."""

    SHIM = 1
    CONTROLLER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_role(value: Any, where: str) -> Role:
    """``shim``, ``controller`` or ``admin`` (any case)."""
    if isinstance(value, str):
        try:
            return Role[value.strip().upper()]
        except KeyError:
            pass
    raise ValueError(f"{where}: {value!r} is not a role (shim, controller or admin)")


METHOD_ROLES: Mapping[str, Role] = {
    # shim: what a node-local CNI shim needs, confined to the owners of the shim's node
    # (rpc/servicer.py): Allocate for its node, Release/GetAllocation of its node's owners,
    # GarbageCollect of its node's owners only.
    "Allocate": Role.SHIM,
    "Release": Role.SHIM,
    "GetAllocation": Role.SHIM,
    "GarbageCollect": Role.SHIM,  # CNI GC (gcScope: pool): a shim collects only its node's owners
    "GetPool": Role.SHIM,  # CNI STATUS reads a pool's free addresses
    # controller: lists, node release, watch and migration, over every node.
    "ListPools": Role.CONTROLLER,
    "ListAllocations": Role.CONTROLLER,
    "ListBlocks": Role.CONTROLLER,
    "ReleaseNode": Role.CONTROLLER,
    "WatchAllocations": Role.CONTROLLER,
    "MigratePool": Role.CONTROLLER,
    # admin: the shape of pools.
    "CreatePool": Role.ADMIN,
    "UpdatePool": Role.ADMIN,
    "DeletePool": Role.ADMIN,
    "AddPoolRange": Role.ADMIN,
    "RemovePoolRange": Role.ADMIN,
    "ReserveAddresses": Role.ADMIN,
    "UnreserveAddresses": Role.ADMIN,
}
"""The least role for each IpamService method. A method not listed needs admin."""


def required_role(method: str) -> Role | None:
    """The least role for a full method path such as ``/dsipam.v1.IpamService/Allocate``;
    None for open methods (health, reflection); admin for anything else."""
    if method.startswith(SERVICE_PREFIX):
        return METHOD_ROLES.get(method[len(SERVICE_PREFIX) :], Role.ADMIN)
    if method.startswith(OPEN_PREFIXES):
        return None
    return Role.ADMIN


# -- tokens ----------------------------------------------------------------------------


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return "dsipam_" + secrets.token_urlsafe(32)


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The config form of a token: ``salted-sha256:<salt hex>:<sha256(salt || token) hex>``."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.sha256(salt + token.encode()).hexdigest()
    return f"salted-sha256:{salt.hex()}:{digest}"


caller_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsipam_caller_node", default=None)
"""The node of the shim the current call serves; None for a cluster-wide caller (controller,
admin, or no authentication at all). Set by :meth:`Authorizer.authorize` in the call's own
task (each gRPC call runs in a context of its own), read by the servicer."""

MAX_NODE_CHARS = 253


def parse_node(value: Any, role: Role, where: str) -> str | None:
    """The ``node`` of a config entry with ``role``: required (a node name) for a shim, refused
    for controller and admin (they act on every node)."""
    if role is not Role.SHIM:
        if value is not None:
            raise ValueError(f"{where}: only shim identities are scoped to a node; role {role.label} acts on "
                             "every node (remove node)")
        return None
    if value is None or value == "":
        raise ValueError(f"{where}: required for role shim: a shim acts only on the allocations of the node it "
                         "serves (a caller for every node is a controller)")
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a node name (a string), not {type(value).__name__}")
    if value == "*":
        raise ValueError(f"{where}: '*' is not a node: a shim for every node would be a controller")
    if len(value) > MAX_NODE_CHARS or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{where}: a node name is 1-{MAX_NODE_CHARS} printable ASCII characters without spaces")
    return value


@dataclass(frozen=True)
class Grant:
    """What a client certificate name maps to: a role, and the node of a shim."""

    role: Role
    node: str | None = None


@dataclass(frozen=True)
class TokenEntry:
    """One hashed token of the auth config."""

    name: str
    role: Role
    digest: bytes
    salt: bytes | None  # None: plain sha256(token)
    node: str | None = None  # a shim's node (required for shims); None: every node

    def matches(self, token: bytes, plain_digest: bytes) -> bool:
        if self.salt is None:
            return hmac.compare_digest(self.digest, plain_digest)
        return hmac.compare_digest(self.digest, hashlib.sha256(self.salt + token).digest())


def _parse_hash(value: Any, where: str) -> tuple[bytes, bytes | None]:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected sha256:<hex> or salted-sha256:<salt hex>:<hex>")
    kind, _, rest = value.strip().partition(":")
    try:
        if kind == "sha256":
            digest, salt = bytes.fromhex(rest), None
        elif kind == "salted-sha256":
            salt_hex, _, digest_hex = rest.partition(":")
            digest, salt = bytes.fromhex(digest_hex), bytes.fromhex(salt_hex)
            if not salt:
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{where}: expected sha256:<hex> or salted-sha256:<salt hex>:<hex>") from None
    if len(digest) != 32:
        raise ValueError(f"{where}: the digest must be 64 hex digits (sha256)")
    return digest, salt


# -- config ----------------------------------------------------------------------------


@dataclass
class AuthConfig:
    """Hashed tokens and client-certificate names, each with a role (and a shim's node)."""

    tokens: list[TokenEntry] = field(default_factory=list)
    cert_cn: dict[str, Grant] = field(default_factory=dict)
    cert_san: dict[str, Grant] = field(default_factory=dict)
    unix_socket_role: Role | None = None
    unix_socket_node: str | None = None
    kubernetes: KubeAuthConfig | None = None  # ServiceAccount tokens reviewed by the API server

    @property
    def maps_certificates(self) -> bool:
        return bool(self.cert_cn or self.cert_san)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "auth config") -> AuthConfig:
        """Builds the config from parsed YAML/JSON; errors name the field at fault."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping with tokens and/or clients")
        unknown = set(data) - {"tokens", "clients", "unix_socket_role", "unix_socket_node", "kubernetes"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        cfg = cls()
        for i, entry in enumerate(_list(data.get("tokens"), f"{source}: tokens")):
            where = f"{source}: tokens[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a mapping with name, role and hash")
            role = parse_role(entry.get("role"), f"{where}.role")
            node = parse_node(entry.get("node"), role, f"{where}.node")
            digest, salt = _parse_hash(entry.get("hash"), f"{where}.hash")
            cfg.tokens.append(TokenEntry(str(entry.get("name") or f"token{i}"), role, digest, salt, node))
        for i, entry in enumerate(_list(data.get("clients"), f"{source}: clients")):
            where = f"{source}: clients[{i}]"
            if not isinstance(entry, dict) or ("cn" in entry) == ("san" in entry):
                raise ValueError(f"{where}: expected a mapping with role and one of cn or san")
            role = parse_role(entry.get("role"), f"{where}.role")
            node = parse_node(entry.get("node"), role, f"{where}.node")
            key = "cn" if "cn" in entry else "san"
            name = entry[key]
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}.{key}: expected a non-empty string")
            (cfg.cert_cn if key == "cn" else cfg.cert_san)[name] = Grant(role, node)
        unix = data.get("unix_socket_role", "none")
        cfg.unix_socket_role = None if unix in (None, "none", "") else parse_role(unix, f"{source}: unix_socket_role")
        if cfg.unix_socket_role is None:
            if data.get("unix_socket_node") is not None:
                raise ValueError(f"{source}: unix_socket_node: needs unix_socket_role shim")
        else:
            cfg.unix_socket_node = parse_node(data.get("unix_socket_node"), cfg.unix_socket_role,
                                              f"{source}: unix_socket_node")
        if data.get("kubernetes") is not None:
            cfg.kubernetes = KubeAuthConfig.from_mapping(data["kubernetes"], f"{source}: kubernetes")
        if not cfg.tokens and not cfg.maps_certificates and cfg.kubernetes is None:
            raise ValueError(f"{source}: no tokens, no clients and no kubernetes: nobody could call the service")
        return cfg


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list")
    return value


def load_auth_config(path: str | os.PathLike[str]) -> AuthConfig:
    """Reads the auth config file (YAML or JSON)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"auth config {source}: {exc.strerror}") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error
        raise ValueError(f"auth config {source}: not YAML/JSON: {exc}") from None
    return AuthConfig.from_mapping(data, f"auth config {source}")


# -- TLS -------------------------------------------------------------------------------


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS credentials for the TCP listeners; with a client CA, client certificates are required
    (and verified against it) at the handshake."""
    def read(path: str, flag: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{flag} {path}: {exc.strerror}") from None

    cert = read(cert_file, "--tls-cert")
    key = read(key_file, "--tls-key")
    ca = read(client_ca_file, "--tls-client-ca") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# -- the check on every call -----------------------------------------------------------

_CACHE_MAX = 1024


class Authorizer:
    """Decides, for one call, who the caller is and whether its role may call the method."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._plain = {t.digest: t for t in config.tokens if t.salt is None}
        self._salted = [t for t in config.tokens if t.salt is not None]
        self._known: dict[str, TokenEntry] = {}
        self.kube = KubeTokenVerifier(config.kubernetes) if config.kubernetes is not None else None

    def token_entry(self, token: str) -> TokenEntry | None:
        """The config entry for a bearer token, or None. A Kubernetes token is found here only
        while it is cached as verified (:meth:`authorize` reviews a new one)."""
        entry = self._known.get(token)
        if entry is not None:
            return entry
        if self.kube is not None and looks_like_jwt(token):
            return self.kube.cached(token)
        raw = token.encode()
        plain = hashlib.sha256(raw).digest()
        found = self._plain.get(plain)
        if found is None:
            for candidate in self._salted:
                if candidate.matches(raw, plain):
                    found = candidate
                    break
        if found is not None:
            if len(self._known) >= _CACHE_MAX:
                self._known.clear()
            self._known[token] = found
        return found

    def certificate_grant(self, auth_context: Mapping[str, Iterable[bytes]]) -> tuple[Grant | None, str]:
        """The role (and node) mapped to a verified client certificate (CN first, then SANs), and its name."""
        names = [v.decode(errors="replace") for v in auth_context.get("x509_common_name", ())]
        for cn in names:
            grant = self.config.cert_cn.get(cn)
            if grant is not None:
                return grant, f"cert:CN={cn}"
        for raw in auth_context.get("x509_subject_alternative_name", ()):
            san = raw.decode(errors="replace")
            grant = self.config.cert_san.get(san)
            if grant is not None:
                return grant, f"cert:SAN={san}"
        return None, f"cert:CN={names[0]}" if names else ""

    async def authorize(
        self,
        authorization: str | None,
        context: grpc.aio.ServicerContext,
        method: str,
        required: Role,
        identified: Callable[[str], None] | None = None,
    ) -> str:
        """Returns the caller's name for logs, or ends the call with UNAUTHENTICATED or PERMISSION_DENIED.
        ``identified`` is told the caller's name as soon as it is known (before a denial). The
        caller's node (a shim's; None for cluster-wide callers) is set in :data:`caller_node`."""
        role: Role | None = None
        node: str | None = None
        who = ""
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            entry = self.token_entry(token) if scheme.lower() == "bearer" and token else None
            if entry is None and self.kube is not None and scheme.lower() == "bearer" and looks_like_jwt(token):
                try:
                    entry = await self.kube.verify(token)
                except KubeAuthError as exc:
                    await _deny(context, exc.code, exc.message, exc.reason)
            if entry is None:
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED,
                            "authorization: not a known bearer token", "UNAUTHENTICATED")
            assert entry is not None
            role, node, who = entry.role, entry.node, f"token:{entry.name}"
        elif self.config.unix_socket_role is not None and context.peer().startswith("unix:"):
            role, node, who = self.config.unix_socket_role, self.config.unix_socket_node, "unix"
        elif self.config.maps_certificates:
            auth = context.auth_context()
            if auth.get("x509_common_name") or auth.get("x509_subject_alternative_name"):
                grant, who = self.certificate_grant(auth)
                if identified is not None and who:
                    identified(who)
                if grant is not None:
                    role, node = grant.role, grant.node
                else:
                    await _deny(context, grpc.StatusCode.PERMISSION_DENIED,
                                f"{who or 'client certificate'}: no role is mapped to this certificate",
                                "PERMISSION_DENIED")
        if role is None:
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED,
                        "authorization: a bearer token (or a client certificate) is required", "UNAUTHENTICATED")
        assert role is not None
        if role is Role.SHIM and node is None:  # the config cannot hold one; never let one act cluster-wide
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, f"{who}: a shim identity without a node",
                        "PERMISSION_DENIED")
        caller_node.set(node)
        if identified is not None:
            identified(who)
        if role < required:
            name = method[len(SERVICE_PREFIX):] if method.startswith(SERVICE_PREFIX) else method
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED,
                        f"{name}: needs role {required.label}; {who} has role {role.label}", "PERMISSION_DENIED")
        return who


async def _deny(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> None:
    status = to_grpc_status(code, message, reason, {})
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


# -- wiring ----------------------------------------------------------------------------

INSECURE_ANNOUNCEMENT = "dsipam: WARNING: authentication is off (--insecure)"


def authorizer_from_settings(settings: Any) -> Authorizer | None:
    """The authorizer for ``settings``; None when authentication is off (insecure).

    An auth config always switches authentication on (``DSIPAM_INSECURE=1`` only matters
    without one); with neither, the server refuses to start.
    """
    if settings.auth_config:
        try:
            return Authorizer(load_auth_config(settings.auth_config))
        except ValueError as exc:
            raise SystemExit(f"dsipam: {exc}") from None
    if settings.insecure:
        return None
    raise SystemExit(
        "dsipam: refusing to start: no authentication is configured. Give --auth-config FILE "
        "(env DSIPAM_AUTH_CONFIG) with hashed tokens and/or client-certificate roles, or --insecure "
        "(env DSIPAM_INSECURE=1) to switch authentication off."
    )


def credentials_from_settings(settings: Any) -> grpc.ServerCredentials | None:
    """TLS credentials for the TCP listeners, or None for plaintext."""
    if settings.tls_client_ca and not settings.tls_cert:
        raise SystemExit("dsipam: --tls-client-ca needs --tls-cert and --tls-key")
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SystemExit("dsipam: --tls-cert and --tls-key go together")
    try:
        return server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ValueError as exc:
        raise SystemExit(f"dsipam: {exc}") from None


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, unix_mode: int) -> int:
    """Adds a listener: TLS on TCP when ``credentials`` are given; a unix socket is always
    plaintext and gets file mode ``unix_mode`` (who may connect is who may write to it)."""
    if address.startswith("unix:"):
        port = server.add_insecure_port(address)
        path = address[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if path and not path.startswith("@"):  # "@name" is Linux's abstract namespace: no file
            os.chmod(path, unix_mode)
        return port
    if credentials is not None:
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)


def token_config_entry(role: Role, name: str, node: str | None = None) -> tuple[str, str]:
    """A new token and the YAML lines of its config entry; a shim's names its ``node``
    (ValueError when a shim has none, or another role has one)."""
    node = parse_node(node or None, role, "--node")
    token = new_token()
    node_line = f"    node: {json.dumps(node)}\n" if node is not None else ""
    entry = f"  - name: {name}\n    role: {role.label}\n{node_line}    hash: {hash_token(token)}\n"
    return token, entry


__all__ = [
    "METHOD_ROLES",
    "OPEN_PREFIXES",
    "SERVICE_PREFIX",
    "AuthConfig",
    "Authorizer",
    "Grant",
    "Role",
    "TokenEntry",
    "authorizer_from_settings",
    "bind",
    "caller_node",
    "credentials_from_settings",
    "hash_token",
    "load_auth_config",
    "new_token",
    "parse_node",
    "parse_role",
    "required_role",
    "server_credentials",
    "token_config_entry",
]
