"""The CNI commands: ADD, DEL, CHECK, VERSION, GC and STATUS, turned into dsipam calls.

:func:`run` takes the environment and stdin and returns the exit code and what to print,
so that it can be driven without a process.
"""

from . import _config, _errors, _jsonio
from ._errors import CniError

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# The environment each command needs (CNI spec, "Parameters").
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
}
# The variables the plugin reads; each must be UTF-8 (a name, an address, an ID).
ENV_CHECKED = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS", "K8S_NODE_NAME")
# The first spec version that has each command.
_SINCE = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}
ABORTED_RETRIES = 3
VALID_ATTACHMENTS = "cni.dev/valid-attachments"

# Attributes recorded with each allocation.
ATTR_CONTAINER = "cni.containerID"
ATTR_IFNAME = "cni.ifname"
ATTR_NETWORK = "cni.network"
ATTR_NODE = "cni.node"
_K8S_ARGS = {"K8S_POD_NAMESPACE": "k8s.namespace", "K8S_POD_NAME": "k8s.pod", "K8S_POD_UID": "k8s.podUID"}


def run(environ, stdin: bytes) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Runs one plugin invocation: (exit code, stdout text)."""
    version = _config.LATEST_VERSION
    try:
        for name in ENV_CHECKED:
            try:
                environ.get(name, "").encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8, kept by surrogateescape
                raise CniError(_errors.INVALID_ENVIRONMENT, f"{name}: not valid UTF-8") from None
        command = environ.get("CNI_COMMAND", "")
        if not command:
            raise CniError(_errors.INVALID_ENVIRONMENT, "CNI_COMMAND: required")
        if command not in COMMANDS:
            raise CniError(_errors.INVALID_ENVIRONMENT, f"CNI_COMMAND: unknown command {command!r}",
                           "expected one of " + ", ".join(COMMANDS))
        if command == "VERSION":
            return 0, _jsonio.dumps({"cniVersion": version, "supportedVersions": list(_config.SUPPORTED_VERSIONS)})
        for name in _REQUIRED_ENV.get(command, ()):
            if not environ.get(name):
                raise CniError(_errors.INVALID_ENVIRONMENT, f"{name}: required for {command}")
        netconf = _decode(stdin)
        if isinstance(netconf, dict) and isinstance(netconf.get("cniVersion"), str) and netconf["cniVersion"]:
            version = netconf["cniVersion"]
        cfg = _config.parse(netconf, environ)
        since = _SINCE.get(command)
        if since and _config.version_tuple(cfg.cni_version) < since:
            raise CniError(_errors.INCOMPATIBLE_VERSION,
                           f"cniVersion: {cfg.cni_version} does not have {command}",
                           f"{command} needs cniVersion {'.'.join(map(str, since))} or later")
        if command in _REQUIRED_ENV:
            _check_attachment(environ["CNI_CONTAINERID"], environ["CNI_IFNAME"])
        handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}[command]
        result = handler(cfg, netconf, environ)  # type: ignore[arg-type]
        return 0, (_jsonio.dumps(result) if result is not None else "")
    except CniError as exc:
        return 1, _jsonio.dumps(exc.to_json(version))
    except Exception as exc:  # noqa: BLE001 - whatever happens, the runtime gets CNI error JSON
        err = CniError(999, f"internal error: {type(exc).__name__}: {exc}")
        return 1, _jsonio.dumps(err.to_json(version))


# The network configuration read from stdin: a runtime's is a few KiB, and a GC list of the
# largest request the server takes (512 KiB) is far below this.
MAX_CONFIG = 4 << 20


def _decode(stdin: bytes) -> object:
    if len(stdin) > MAX_CONFIG:
        raise CniError(_errors.DECODE_FAILURE, "network configuration on stdin: larger than 4 MiB")
    try:
        return _jsonio.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(_errors.DECODE_FAILURE, f"network configuration on stdin: {exc}") from None


def _check_attachment(container_id: str, ifname: str) -> None:
    problem = container_id_problem(container_id)
    if problem:
        raise CniError(_errors.INVALID_ENVIRONMENT, f"CNI_CONTAINERID: {problem}")
    problem = ifname_problem(ifname)
    if problem:
        raise CniError(_errors.INVALID_ENVIRONMENT, f"CNI_IFNAME: {problem}")


def container_id_problem(container_id: str) -> str:
    """What is wrong with a container ID by the spec's rule, or ""."""
    if not container_id:
        return "required"
    if not (container_id[0].isascii() and container_id[0].isalnum()) or not all(
        c.isascii() and (c.isalnum() or c in "_.-") for c in container_id
    ):
        return f"{container_id[:80]!r} must be alphanumeric, then alphanumerics, '_', '.' or '-'"
    return ""


def ifname_problem(ifname: str) -> str:
    """What is wrong with an interface name by the spec's rule, or ""."""
    if not ifname:
        return "required"
    if len(ifname) > 15 or ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
        return f"{ifname[:80]!r} is not a valid interface name"
    return ""


def owner_of(container_id: str, ifname: str) -> str:
    """The dsipam owner of one attachment."""
    return f"{container_id}/{ifname}"


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS ``K=V;K2=V2``."""
    out = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(_errors.INVALID_ENVIRONMENT, f"CNI_ARGS: {pair[:80]!r} is not KEY=VALUE")
        out[key] = value
    return out


def requested_addresses(cfg, netconf: dict, cni_args: dict[str, str]) -> list[str]:  # type: ignore[no-untyped-def]
    """Static addresses: ``ipam.addresses``, ``runtimeConfig.ips``, ``args.cni.ips`` and CNI_ARGS ``IP=``."""
    found: list[tuple[str, str]] = [("ipam.addresses", a) for a in cfg.addresses]
    runtime = netconf.get("runtimeConfig")
    if isinstance(runtime, dict) and isinstance(runtime.get("ips"), list):
        found += [(f"runtimeConfig.ips[{i}]", a) for i, a in enumerate(runtime["ips"])]
    args = netconf.get("args")
    cni = args.get("cni") if isinstance(args, dict) else None
    if isinstance(cni, dict) and isinstance(cni.get("ips"), list):
        found += [(f"args.cni.ips[{i}]", a) for i, a in enumerate(cni["ips"])]
    if cni_args.get("IP"):
        found += [("CNI_ARGS IP", a.strip()) for a in cni_args["IP"].split(",") if a.strip()]
    out: list[str] = []
    for where, text in found:
        if not isinstance(text, str):
            raise CniError(_errors.INVALID_CONFIG, f"{where}: must be a string, not {_config.kind(text)}")
        address = _config.requested_address(text)
        if not address:
            code = _errors.INVALID_ENVIRONMENT if where == "CNI_ARGS IP" else _errors.INVALID_CONFIG
            raise CniError(code, f"{where}: {text[:80]!r} is not an IP address")
        if address not in out:
            out.append(address)
    return out


def _with_retries(call):  # type: ignore[no-untyped-def]
    """Runs ``call`` again when the server reports a lost race (ABORTED); every call made is idempotent."""
    from . import _h2

    for attempt in range(ABORTED_RETRIES + 1):
        try:
            return call()
        except _h2.RpcError as exc:
            if exc.code != _h2.ABORTED or attempt == ABORTED_RETRIES:
                raise


def _rpc(cfg, method: str, call):  # type: ignore[no-untyped-def]
    from . import _h2

    try:
        return _with_retries(call)
    except _h2.RpcError as exc:
        raise _errors.from_rpc(exc, method, cfg.endpoint) from None
    except ValueError as exc:  # the answer's bytes (_wire.WireError, or a string that is not UTF-8)
        raise unparsable(method, exc) from None


def unparsable(method: str, exc: Exception) -> CniError:
    """An answer that does not parse as the expected message: the server's fault (110)."""
    return CniError(_errors.SERVER_ERROR, f"dsipam {method}: the answer does not parse ({exc})")


def build_result(cfg, allocation) -> dict:  # type: ignore[no-untyped-def]
    """The IPAM result for an allocation in the configuration's CNI version."""
    legacy = _config.version_tuple(cfg.cni_version) < (1, 0, 0)
    ips = []
    versions = []
    for a in allocation.addresses:
        item: dict[str, object] = {"address": f"{a.ip}/{a.prefix_length}"}
        if legacy:
            item = {"version": str(a.version), **item}
        if a.gateway:
            item["gateway"] = a.gateway
        ips.append(item)
        versions.append(a.version)
    routes = [r for r in cfg.routes if _config.cidr_version(r["dst"]) in versions]
    if cfg.default_routes:
        have = {r["dst"] for r in routes}
        for version in versions:
            dst = "0.0.0.0/0" if version == 4 else "::/0"
            if dst not in have:
                routes.append({"dst": dst})
                have.add(dst)
    result: dict[str, object] = {"cniVersion": cfg.cni_version, "ips": ips}
    if routes:
        result["routes"] = routes
    result["dns"] = dict(cfg.dns)
    return result


def cmd_add(cfg, netconf: dict, environ) -> dict:  # type: ignore[no-untyped-def]
    """ADD: Allocate for ``<containerID>/<ifname>`` and print the IPAM result."""
    from . import _client

    container_id, ifname = environ["CNI_CONTAINERID"], environ["CNI_IFNAME"]
    cni_args = parse_cni_args(environ.get("CNI_ARGS", ""))
    addresses = requested_addresses(cfg, netconf, cni_args)
    # cni.network is recorded even when the network has no name (""): GC selects by it.
    attributes = {ATTR_CONTAINER: container_id, ATTR_IFNAME: ifname, ATTR_NODE: cfg.node, ATTR_NETWORK: cfg.network}
    for arg, attribute in _K8S_ARGS.items():
        if cni_args.get(arg):
            attributes[attribute] = cni_args[arg]
    client = _client.connect(cfg)
    try:
        allocation = _rpc(cfg, "Allocate", lambda: client.allocate(
            cfg.pool, owner_of(container_id, ifname), cfg.policy, cfg.families, addresses, attributes, cfg.node))
    finally:
        client.close()
    return build_result(cfg, allocation)


def cmd_del(cfg, netconf: dict, environ) -> None:  # type: ignore[no-untyped-def]
    """DEL: Release. Releasing what is not held, or from a pool that is gone, succeeds."""
    from . import _client

    client = _client.connect(cfg)
    try:
        _rpc(cfg, "Release", lambda: client.release(cfg.pool, owner_of(environ["CNI_CONTAINERID"],
                                                                       environ["CNI_IFNAME"])))
    except CniError as exc:
        if exc.code != _errors.POOL_NOT_FOUND:
            raise
    finally:
        client.close()
    return None


def cmd_check(cfg, netconf: dict, environ) -> None:  # type: ignore[no-untyped-def]
    """CHECK: the allocation exists and holds exactly the addresses of ``prevResult``."""
    from . import _client

    prev = netconf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(_errors.INVALID_CONFIG, "prevResult: required for CHECK" if prev is None
                       else "prevResult: must be an object")
    prev_ips = prev.get("ips", [])
    if not isinstance(prev_ips, list):
        raise CniError(_errors.INVALID_CONFIG, "prevResult.ips: must be a list")
    expected = set()
    for i, ip in enumerate(prev_ips):
        where = f"prevResult.ips[{i}]"
        if not isinstance(ip, dict):
            raise CniError(_errors.INVALID_CONFIG, f"{where}: must be an object, not {_config.kind(ip)}")
        address = ip.get("address")
        if not isinstance(address, str):
            raise CniError(_errors.INVALID_CONFIG, f"{where}.address: " + (
                "required" if address is None else f"must be a string, not {_config.kind(address)}"))
        if not _config.cidr_version(address):
            raise CniError(_errors.INVALID_CONFIG, f"{where}.address: {address[:80]!r} is not a CIDR")
        host = address.split("/")[0]
        expected.add(f"{_config.canonical_ip(host)}/{_config.prefix_length(address)}")
    owner = owner_of(environ["CNI_CONTAINERID"], environ["CNI_IFNAME"])
    client = _client.connect(cfg)
    try:
        allocation = _rpc(cfg, "GetAllocation", lambda: client.get_allocation(cfg.pool, owner))
    finally:
        client.close()
    held = {f"{_config.canonical_ip(a.ip)}/{a.prefix_length}" for a in allocation.addresses}
    if held != expected:
        raise CniError(_errors.ALLOCATION_MISMATCH,
                       f"{owner} holds {', '.join(sorted(held)) or 'nothing'} in pool {cfg.pool!r}, "
                       f"but prevResult lists {', '.join(sorted(expected)) or 'nothing'}")
    return None


ATTACHMENTS_ALIAS = "cni.dev/attachments"


def valid_owners(netconf: dict) -> list[str]:
    """The owners of the attachments the runtime says are still valid.

    The list is ``cni.dev/valid-attachments``; libcni also sends it as ``cni.dev/attachments``
    (the name in an early draft of the spec), and an owner listed under either key is kept.
    ``null`` is an empty list: libcni sends a Go nil slice, i.e. ``null``, when the runtime has
    no live attachment on the network, which is when everything of this node and network is
    stale. Neither key present is error 7: the spec makes the list part of GC's input, and
    guessing "nothing is valid" from its absence would release every allocation in scope.
    """
    keys = [key for key in (VALID_ATTACHMENTS, ATTACHMENTS_ALIAS) if key in netconf]
    if not keys:
        raise CniError(_errors.INVALID_CONFIG, f"{VALID_ATTACHMENTS}: required for GC",
                       "the runtime passes the live attachments, [] (or null) when there are none; "
                       "nothing was released")
    owners: dict[str, None] = {}
    for key in keys:
        attachments = netconf[key]
        if attachments is None:
            continue
        if not isinstance(attachments, list):
            raise CniError(_errors.INVALID_CONFIG, f"{key}: must be a list, not {_config.kind(attachments)}")
        for i, item in enumerate(attachments):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise CniError(_errors.INVALID_CONFIG, f"{where}: must be an object, not {_config.kind(item)}")
            cid, ifname = item.get("containerID"), item.get("ifname")
            for field, value, check in (("containerID", cid, container_id_problem), ("ifname", ifname, ifname_problem)):
                if not isinstance(value, str):
                    problem = "required" if value is None else f"must be a string, not {_config.kind(value)}"
                else:
                    problem = check(value)
                if problem:
                    raise CniError(_errors.INVALID_CONFIG, f"{where}.{field}: {problem}")
            owners[owner_of(cid, ifname)] = None
    return list(owners)


def cmd_gc(cfg, netconf: dict, environ) -> None:  # type: ignore[no-untyped-def]
    """GC: release the allocations of attachments that are not valid any more.

    Both scopes are one ``GarbageCollect`` with the valid owners and the grace. ``gcScope: node``
    (the default) confines it to what this plugin allocated for this network on this node: the
    request's ``node`` and an ``attribute_selector`` of ``cni.node`` and ``cni.network``, so that
    nodes sharing a pool never collect each other's pods, nor two networks on one node each
    other's; a shim token (node-scoped) may do that. ``gcScope: pool`` hands only the valid
    owners over: every other allocation of the pool older than the grace is released (a shim
    token's GC is confined to its node by the server anyway).
    """
    from . import _client

    valid = valid_owners(netconf)
    client = _client.connect(cfg)
    try:
        if cfg.gc_scope == "pool":
            _rpc(cfg, "GarbageCollect", lambda: client.garbage_collect(cfg.pool, valid, cfg.gc_grace))
        else:
            selector = gc_selector(cfg)
            _rpc(cfg, "GarbageCollect", lambda: client.garbage_collect(cfg.pool, valid, cfg.gc_grace, cfg.node,
                                                                       selector))
    finally:
        client.close()
    return None


def gc_selector(cfg) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The attributes that mark this node's and this network's allocations (recorded by ADD)."""
    return {ATTR_NODE: cfg.node, ATTR_NETWORK: cfg.network}


def cmd_status(cfg, netconf: dict, environ) -> None:  # type: ignore[no-untyped-def]
    """STATUS: the service answers and the pool has free addresses for what ADD would ask; else 50."""
    from . import _client, _h2

    client = _client.connect(cfg)
    try:
        usage = _with_retries(lambda: client.pool_usage(cfg.pool))
    except ValueError as exc:
        raise unparsable("GetPool", exc) from None
    except _h2.RpcError as exc:
        if exc.code == _h2.PERMISSION_DENIED:
            # The service answered and knows us, but our role may not read pools (GetPool needs
            # "controller"): it is reachable, and whether the pool is full stays unknown.
            return None
        err = _errors.from_rpc(exc, "GetPool", cfg.endpoint)
        raise CniError(_errors.NOT_AVAILABLE, err.msg, f"{err.details} (would be CNI error {err.code})") from None
    finally:
        client.close()
    free = {u.version: u.free for u in usage}
    wanted = [{1: 4, 2: 6}[f] for f in cfg.families] or [u.version for u in usage]
    if cfg.policy == 3:  # RequireDualStack
        needed = [4, 6]
    elif cfg.policy == 2:  # PreferDualStack: any one family will do
        needed = [] if any(free.get(v, 0) for v in wanted) else wanted[:1]
    else:
        needed = wanted[:1]
    empty = [v for v in needed if not free.get(v, 0)]
    if empty or not usage:
        names = "/".join(f"IPv{v}" for v in empty) or "any"
        raise CniError(_errors.NOT_AVAILABLE, f"pool {cfg.pool!r} has no free {names} address",
                       ", ".join(f"IPv{u.version}: {u.free} of {u.size} free" for u in usage))
    return None
