"""The network configuration: the ``ipam`` section and the CNI fields the plugin reads.

Every problem is a :class:`CniError` with code 7 (or 1 for a CNI version the plugin does not
speak) whose message names the field, such as ``ipam.pool: required``. Unknown keys are ignored.
"""

import _socket

from ._errors import INCOMPATIBLE_VERSION, INVALID_CONFIG, CniError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
DEFAULT_TIMEOUT = 10.0

_POLICIES = {"singlestack": 1, "preferdualstack": 2, "requiredualstack": 3}  # dsipam.v1.IpFamilyPolicy
_FAMILIES = {"ipv4": 1, "ipv6": 2, "4": 1, "6": 2}  # dsipam.v1.IpFamily
_ROUTE_EXTRAS_1_1 = ("mtu", "advmss", "priority", "table", "scope")


def version_tuple(version: str) -> tuple[int, ...]:
    """"1.0.0" -> (1, 0, 0)."""
    return tuple(int(part) for part in version.split("."))


def _bad(field: str, problem: str) -> CniError:
    return CniError(INVALID_CONFIG, f"{field}: {problem}")


def ip_version(text: str) -> int:
    """4 or 6 for an address without prefix; 0 when it is not one."""
    if not isinstance(text, str) or not text:
        return 0
    for family, version in ((_socket.AF_INET, 4), (_socket.AF_INET6, 6)):
        try:
            _socket.inet_pton(family, text)
            return version
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the text
            continue
    return 0


def canonical_ip(text: str) -> str:
    """The address in canonical form (``fd00:0::1`` -> ``fd00::1``); ``text`` when it is not an address."""
    version = ip_version(text)
    if not version:
        return text
    family = _socket.AF_INET if version == 4 else _socket.AF_INET6
    return _socket.inet_ntop(family, _socket.inet_pton(family, text))


def cidr_version(text: str) -> int:
    """4 or 6 for ``address/prefix`` with a prefix that fits the family; 0 otherwise."""
    if not isinstance(text, str) or text.count("/") != 1:
        return 0
    address, prefix = text.split("/")
    version = ip_version(address)
    if not version or not _ascii_digits(prefix) or len(prefix.lstrip("0")) > 3 \
            or int(prefix.lstrip("0") or "0") > (32 if version == 4 else 128):
        return 0
    return version


def prefix_length(cidr: str) -> int:
    """The prefix length of a CIDR that cidr_version accepts (``/0024`` is 24)."""
    return int(cidr.split("/")[1].lstrip("0") or "0")


def _ascii_digits(text: str) -> bool:
    """0-9 only (str.isdigit also takes '²' and other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _string(section: dict, key: str, where: str, required: bool = False) -> str:
    value = section.get(key)
    if value is None:
        if required:
            raise _bad(where, "required")
        return ""
    if not isinstance(value, str):
        raise _bad(where, f"must be a string, not {kind(value)}")
    if required and not value:
        raise _bad(where, "required")
    return value


def kind(value: object) -> str:
    """"an object", "a list", … for a decoded JSON value, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number" if isinstance(value, (int, float)) else "null")


def _string_list(section: dict, key: str, where: str) -> list[str]:
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(where, f"must be a list, not {kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{where}[{i}]", f"must be a string, not {kind(item)}")
    return value


def _seconds(section: dict, key: str, where: str, default: float | None, allow_zero: bool) -> float | None:
    value = section.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(where, f"must be a number of seconds, not {kind(value)}")
    if value < 0 or (value == 0 and not allow_zero) or value > 86400:
        raise _bad(where, f"{value} is out of range")
    return float(value)


def endpoint_target(value: str) -> str:
    """The channel target for ``unix:///path``, ``/path`` or ``host:port``; raises ValueError."""
    if value.startswith("unix://"):
        path = value[len("unix://"):]
    elif value.startswith("unix:"):
        path = value[len("unix:"):]
    elif value.startswith("/"):
        path = value
    else:
        host, sep, port = value.rpartition(":")
        if not sep or host in ("", "[]") or not _ascii_digits(port) or len(port.lstrip("0")) > 5 \
                or not 0 < int(port.lstrip("0") or "0") < 65536:
            raise ValueError("expected a unix socket path, unix:///path or host:port")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError("an IPv6 host needs brackets: [fd00::1]:50051")
        return value
    if not path.startswith("/"):
        raise ValueError("a unix socket path must be absolute")
    return "unix://" + path


class IpamConfig:
    """The parsed ``ipam`` section (plus the network's name and CNI version)."""

    __slots__ = ("cni_version", "network", "endpoint", "target", "pool", "policy", "families", "addresses",
                 "routes", "default_routes", "dns", "timeout", "tls", "token", "transport", "gc_scope", "gc_grace",
                 "node")

    def __init__(self) -> None:
        self.cni_version = LATEST_VERSION
        self.network = ""
        self.endpoint = ""
        self.target = ""
        self.pool = ""
        self.policy = 1
        self.families: list[int] = []
        self.addresses: list[str] = []
        self.routes: list[dict] = []
        self.default_routes = False
        self.dns: dict = {}
        self.timeout = DEFAULT_TIMEOUT
        self.tls: dict[str, str] | None = None
        self.token = ""
        self.transport = "native"
        self.gc_scope = "node"
        self.gc_grace: float | None = None
        self.node = ""


def check_version(netconf: dict) -> str:
    """The configuration's ``cniVersion``, if the plugin speaks it."""
    version = netconf.get("cniVersion")
    if version is None or version == "":
        raise _bad("cniVersion", "required")
    if not isinstance(version, str):
        raise _bad("cniVersion", f"must be a string, not {kind(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion: {version!r} is not supported",
                       "supported versions: " + ", ".join(SUPPORTED_VERSIONS))
    return version


def parse(netconf: object, environ: dict[str, str] | None = None) -> IpamConfig:
    """Reads and validates the plugin's configuration from a decoded network configuration.

    ``environ`` supplies ``K8S_NODE_NAME`` when the configuration names no ``node``.
    """
    if not isinstance(netconf, dict):
        raise _bad("network configuration", f"must be a JSON object, not {kind(netconf)}")
    cfg = IpamConfig()
    cfg.cni_version = check_version(netconf)
    cfg.network = _string(netconf, "name", "name")
    ipam = netconf.get("ipam")
    if not isinstance(ipam, dict):
        raise _bad("ipam", "required" if ipam is None else f"must be an object, not {kind(ipam)}")

    cfg.endpoint = _string(ipam, "endpoint", "ipam.endpoint", required=True)
    try:
        cfg.target = endpoint_target(cfg.endpoint)
    except ValueError as exc:
        raise _bad("ipam.endpoint", f"{cfg.endpoint!r}: {exc}") from None
    cfg.pool = _string(ipam, "pool", "ipam.pool", required=True)

    policy = _string(ipam, "ipFamilyPolicy", "ipam.ipFamilyPolicy")
    if policy:
        key = policy.lower().replace("_", "").replace("-", "")
        if key not in _POLICIES:
            raise _bad("ipam.ipFamilyPolicy", f"{policy!r} is not SingleStack, PreferDualStack or RequireDualStack")
        cfg.policy = _POLICIES[key]
    for i, name in enumerate(_string_list(ipam, "ipFamilies", "ipam.ipFamilies")):
        family = _FAMILIES.get(name.lower())
        if family is None:
            raise _bad(f"ipam.ipFamilies[{i}]", f"{name!r} is not IPv4 or IPv6")
        if family in cfg.families:
            raise _bad(f"ipam.ipFamilies[{i}]", f"{name!r} is listed twice")
        cfg.families.append(family)
    if len(cfg.families) > 1 and cfg.policy == 1:
        raise _bad("ipam.ipFamilies", "two families need ipFamilyPolicy PreferDualStack or RequireDualStack")

    for i, text in enumerate(_string_list(ipam, "addresses", "ipam.addresses")):
        address = requested_address(text)
        if not address:
            raise _bad(f"ipam.addresses[{i}]", f"{text!r} is not an IP address")
        cfg.addresses.append(address)

    cfg.routes = _routes(ipam.get("routes"), cfg.cni_version)
    default_routes = ipam.get("defaultRoutes", False)
    if not isinstance(default_routes, bool):
        raise _bad("ipam.defaultRoutes", f"must be true or false, not {kind(default_routes)}")
    cfg.default_routes = default_routes
    cfg.dns = _dns(ipam.get("dns"))

    cfg.timeout = _seconds(ipam, "timeout", "ipam.timeout", DEFAULT_TIMEOUT, allow_zero=False)  # type: ignore[assignment]
    cfg.transport = _string(ipam, "transport", "ipam.transport") or "native"
    if cfg.transport not in ("native", "grpc"):
        raise _bad("ipam.transport", f"{cfg.transport!r} is not native or grpc")
    tls = ipam.get("tls")
    if tls is not None:
        if not isinstance(tls, dict):
            raise _bad("ipam.tls", f"must be an object, not {kind(tls)}")
        cfg.tls = {k: _string(tls, k, f"ipam.tls.{k}") for k in ("ca", "cert", "key", "serverName")}
        if bool(cfg.tls["cert"]) != bool(cfg.tls["key"]):
            raise _bad("ipam.tls", "cert and key go together")
        if cfg.target.startswith("unix:"):
            raise _bad("ipam.tls", "TLS needs a host:port endpoint")
        if "transport" in ipam and cfg.transport == "native":
            raise _bad("ipam.transport", "native speaks cleartext only; TLS needs transport grpc")
        cfg.transport = "grpc"

    cfg.token = _token(ipam, cfg)

    cfg.gc_scope = _string(ipam, "gcScope", "ipam.gcScope") or "node"
    if cfg.gc_scope not in ("node", "pool"):
        raise _bad("ipam.gcScope", f"{cfg.gc_scope!r} is not node or pool")
    cfg.gc_grace = _seconds(ipam, "gcGrace", "ipam.gcGrace", None, allow_zero=True)
    cfg.node = _string(ipam, "node", "ipam.node") or (environ or {}).get("K8S_NODE_NAME", "")
    if not cfg.node:
        import posix

        cfg.node = posix.uname().nodename
    return cfg


def _token(ipam: dict, cfg: IpamConfig) -> str:
    """The bearer token of ``token`` or ``tokenFile``; sent only where nobody can read it on the way."""
    token = _string(ipam, "token", "ipam.token")
    where = "ipam.token"
    path = _string(ipam, "tokenFile", "ipam.tokenFile")
    if path:
        if token:
            raise _bad("ipam.tokenFile", "give token or tokenFile, not both")
        where = "ipam.tokenFile"
        token = read_limited(path, where).decode("utf-8", "replace").strip()
    if not token:
        return ""
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise _bad(where, "a token is printable ASCII without spaces")
    if cfg.tls is None and not cfg.target.startswith("unix:"):
        raise _bad(where, "a bearer token is sent only over a unix socket or TLS, not cleartext TCP")
    return token


MAX_FILE = 1 << 20


def read_limited(path: str, field: str) -> bytes:
    """A file the configuration names (a token, a certificate): at most 1 MiB."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise _bad(field, f"cannot read {path!r}: {exc.strerror}") from None
    except ValueError:  # a NUL in the path: no such file can exist (EINVAL)
        raise _bad(field, f"cannot read {path!r}: Invalid argument") from None
    if len(data) > MAX_FILE:
        raise _bad(field, f"cannot read {path!r}: larger than 1 MiB")
    return data


def requested_address(text: str) -> str:
    """An address asked for (``198.18.0.9`` or ``198.18.0.9/24``: the prefix is the pool's anyway),
    without prefix; "" when ``text`` is not one."""
    if not isinstance(text, str):
        return ""
    address = text.split("/", 1)[0] if "/" in text else text
    if "/" in text and not cidr_version(text):
        return ""
    return canonical_ip(address) if ip_version(address) else ""


def _routes(value: object, cni_version: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("ipam.routes", f"must be a list, not {kind(value)}")
    out = []
    extras = version_tuple(cni_version) >= (1, 1, 0)
    for i, route in enumerate(value):
        where = f"ipam.routes[{i}]"
        if not isinstance(route, dict):
            raise _bad(where, f"must be an object, not {kind(route)}")
        dst = _string(route, "dst", f"{where}.dst", required=True)
        version = cidr_version(dst)
        if not version:
            raise _bad(f"{where}.dst", f"{dst!r} is not a CIDR")
        item: dict[str, object] = {"dst": dst}
        gw = _string(route, "gw", f"{where}.gw")
        if gw:
            if ip_version(gw) != version:
                raise _bad(f"{where}.gw", f"{gw!r} is not an IPv{version} address")
            item["gw"] = gw
        if extras:
            for key in _ROUTE_EXTRAS_1_1:
                if key in route:
                    item[key] = route[key]
        out.append(item)
    return out


def _dns(value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("ipam.dns", f"must be an object, not {kind(value)}")
    out: dict[str, object] = {}
    nameservers = _string_list(value, "nameservers", "ipam.dns.nameservers")
    for i, server in enumerate(nameservers):
        if not ip_version(server):
            raise _bad(f"ipam.dns.nameservers[{i}]", f"{server!r} is not an IP address")
    if nameservers:
        out["nameservers"] = nameservers
    domain = _string(value, "domain", "ipam.dns.domain")
    if domain:
        out["domain"] = domain
    for key in ("search", "options"):
        items = _string_list(value, key, f"ipam.dns.{key}")
        if items:
            out[key] = items
    return out
