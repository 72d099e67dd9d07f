"""Connection settings shared by both clients: target, TLS, bearer tokens and channel options."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._errors import InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"
"""The target used when none is given (and ``DSIPAM_TARGET`` is unset)."""

USER_AGENT = "dsipam-python/0.1.0"

ChannelOptions = Sequence[tuple[str, Any]]
"""gRPC channel arguments, such as ``[("grpc.max_receive_message_length", 8 << 20)]``."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings, all from files (PEM).

    Attributes:
        ca_file: CA bundle that signs the server's certificate; None for the system roots.
        cert_file: client certificate for mutual TLS (needs ``key_file``).
        key_file: private key of ``cert_file``.
        server_name: the name to verify the server's certificate against when it differs from
            the target's host (for example when connecting by IP address).
    """

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files and builds the channel credentials."""
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                "tls: cert_file and key_file go together (mutual TLS needs both)", metadata={"field": "tls"}
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file"),
            private_key=_read(self.key_file, "key_file"),
            certificate_chain=_read(self.cert_file, "cert_file"),
        )


def _read(path: str | os.PathLike[str] | None, where: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{where}: cannot read {os.fspath(path)!r}: {exc.strerror}",
                              metadata={"field": where}) from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(address: str) -> str:
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0]


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")
# Schemes gRPC resolves itself; anything else before a colon is a host name.
_URI_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p")


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _bad(target: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"target: {target!r}: {why}", metadata={"field": "target"})


def _check_host_port(address: str, target: str, *, port_required: bool = True) -> str:
    """Checks ``host:port`` (``[v6]:port`` for IPv6); returns the host."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise _bad(target, "an IPv6 address in brackets needs its closing ']'")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise _bad(target, f"[{host}] is not an IPv6 address") from None
        if not rest and not port_required:
            return host
        if not rest.startswith(":"):
            raise _bad(target, "expected [IPv6]:port")
        port = rest[1:]
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            if port_required:
                raise _bad(target, "has no port (expected host:port or unix:///path)")
            host, port = address, ""
        if ":" in host:
            raise _bad(target, "write an IPv6 address in brackets: [::1]:50051")
        if not host:
            raise _bad(target, "the host is empty (expected host:port)")
        if not (_is_ip(host) or _HOSTNAME.fullmatch(host)):
            raise _bad(target, f"{host!r} is neither an IP address nor a host name")
    if port or port_required:
        if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _bad(target, f"the port {port!r} is not a number from 1 to 65535")
    return host


def _check_uri(target: str, scheme: str, rest: str) -> None:
    """Checks the gRPC URIs a typo would otherwise turn into retries and C-core log lines."""
    if scheme == "unix":
        if rest.startswith("//") and not rest.startswith("///"):
            raise _bad(target, "unix://NAME has a host part; write unix:///absolute/path or unix:relative/path")
        if not rest.lstrip("/"):
            raise _bad(target, "the socket path is empty")
    elif scheme == "unix-abstract":
        if not rest:
            raise _bad(target, "the abstract socket name is empty")
    elif scheme == "dns":
        name = rest[2:].split("/", 1)[1] if rest.startswith("//") and "/" in rest[2:] else rest.lstrip("/")
        _check_host_port(name, target, port_required=False)
    elif scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
        for address in addresses:
            host = _check_host_port(address.strip(), target)
            try:
                version = ipaddress.ip_address(host.split("%", 1)[0]).version
            except ValueError:
                raise _bad(target, f"{host!r} is not an IP address ({scheme}: takes addresses only)") from None
            if f"ipv{version}" != scheme:
                raise _bad(target, f"{host} is not an {scheme.upper().replace('V', 'v')} address")


def normalise_target(target: str) -> tuple[str, bool]:
    """Returns the gRPC target and whether it names several addresses.

    Accepts ``host:port``, ``[v6]:port``, ``unix:///path``, any gRPC URI such as
    ``ipv4:127.0.0.1:50051,127.0.0.1:50052`` or ``dns:///ipam.example:50051``, and a plain
    comma-separated list of IP ``host:port`` addresses (made into an ``ipv4:``/``ipv6:`` URI).
    A malformed target (no port, a port out of range, an IPv6 address without brackets,
    ``unix://relative``, spaces or control characters) raises InvalidArgument before any call.
    """
    target = target.strip()
    if not target:
        raise InvalidArgument("target: required (host:port or unix:///path)", metadata={"field": "target"})
    if any(ch.isspace() or not ch.isprintable() for ch in target):
        raise _bad(target, "contains spaces or control characters")
    scheme, sep, rest = target.partition(":")
    if sep and scheme not in _URI_SCHEMES and rest.startswith("//") and _SCHEME.fullmatch(scheme):
        tls = " (TLS is --tls / tls=True, not https://)" if scheme.lower() in ("https", "grpcs") else ""
        raise _bad(target, f"the scheme {scheme + '://'!r} is not supported{tls}; give host:port, [IPv6]:port, "
                           "unix:///absolute/path, unix-abstract:NAME or a gRPC URI such as dns:///host:port")
    if sep and scheme in _URI_SCHEMES:
        _check_uri(target, scheme, rest)
        return target, scheme == "dns" or (scheme in ("ipv4", "ipv6") and "," in rest)
    if "," not in target:
        _check_host_port(target, target)
        return target, False
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    if not addresses:
        raise _bad(target, "names no address (expected host:port or unix:///path)")
    hosts = [_split_host(a) for a in addresses]
    if not all(_is_ip(h) for h in hosts):
        raise InvalidArgument(
            f"target: {target!r}: a list of addresses must be IP host:port pairs "
            "(use dns:///name:port for a name with several addresses)",
            metadata={"field": "target"},
        )
    for address in addresses:
        _check_host_port(address, target)
    versions = {ipaddress.ip_address(h).version for h in hosts}
    if len(versions) > 1:
        raise InvalidArgument(f"target: {target!r} mixes IPv4 and IPv6 addresses", metadata={"field": "target"})
    return f"ipv{versions.pop()}:{','.join(addresses)}", True


def channel_options(
    *,
    several: bool,
    lb_policy: str | None,
    tls: TlsConfig | None,
    extra: ChannelOptions | None,
) -> list[tuple[str, Any]]:
    """The channel arguments: short reconnect backoff (so retries see a restarted server soon),
    round-robin over several addresses, the TLS name override, then the caller's own."""
    options: list[tuple[str, Any]] = [
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    policy = lb_policy or ("round_robin" if several else None)
    if policy:
        options.append(("grpc.lb_policy_name", policy))
    if policy == "round_robin":
        # Client-side health checking: a replica whose health turns NOT_SERVING (draining on
        # SIGTERM, or its database unreachable) gets no new calls while the others serve.
        import json

        options.append(("grpc.service_config", json.dumps({
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": "dsipam.v1.IpamService"},
        })))
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    options.extend(extra or ())
    return options


def resolve_tls(tls: TlsConfig | bool | None) -> TlsConfig | None:
    """``True`` means TLS with the system roots; ``False``/``None`` plaintext."""
    if tls is True:
        return TlsConfig()
    if tls is False or tls is None:
        return None
    return tls


@dataclass(frozen=True)
class Auth:
    """Bearer token settings: a fixed token, or a file read before each call (so that a
    rotated token, such as a Kubernetes projected service account token, is picked up)."""

    token: str | None = None
    token_file: str | os.PathLike[str] | None = None

    def metadata(self) -> list[tuple[str, str]]:
        """The ``authorization`` metadata for one call (empty without a token)."""
        token = self.token
        if self.token_file is not None:
            raw = _read(self.token_file, "token_file")
            token = (raw or b"").decode().strip()
        if not token:
            return []
        return [("authorization", f"Bearer {token}")]
