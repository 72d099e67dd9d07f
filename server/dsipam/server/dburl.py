"""Database URLs without the database layer: what ``dsipam`` checks before it imports SQLAlchemy,
so that a URL it refuses is refused at once (store/db.py imports normalise_multihost from here and
parses the rest)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# The URL parameters whose values are secrets: never shown in a message (cli._shown).
SECRET_PARAMETERS = ("password", "sslpassword")


def normalise_multihost(url: str) -> str:
    """Gives every multi-host form one shape: ``?host=h1,h2&port=p1,p2`` with an empty netloc host.

    libpq accepts ``postgresql://u@h1:p1,h2:p2/db`` and ``?host=h1&host=h2``-style lists; SQLAlchemy and
    asyncpg agree only on the comma-separated query form, which libpq (psql, pg_dump) also reads."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    hosts = [v for k, v in query if k == "host"]
    ports = [v for k, v in query if k == "port"]
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if "," in hostport:  # libpq's h1:p1,h2:p2 in the authority
        for item in hostport.split(","):
            h, _, p = item.rpartition(":") if ":" in item and not item.endswith("]") else (item, "", "")
            hosts.append(h or item)
            ports.append(p or "5432")
        hostport = ""
    elif len(hosts) > 1 or any("," in h for h in hosts):
        flat = [x for h in hosts for x in h.split(",")]
        hosts, split_ports = [], []
        for item in flat:
            if ":" in item and not item.startswith("/"):
                h, _, p = item.rpartition(":")
                hosts.append(h)
                split_ports.append(p)
            else:
                hosts.append(item)
                split_ports.append("")
        given = [x for p in ports for x in p.split(",")] if ports else []
        ports = [sp or (given[i] if i < len(given) else (given[0] if given else "5432"))
                 for i, sp in enumerate(split_ports)]
    else:
        return url
    rest = [(k, v) for k, v in query if k not in ("host", "port")]
    rest += [("host", ",".join(hosts)), ("port", ",".join(ports))]
    netloc = (userinfo + "@" if userinfo else "") + hostport
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(rest, safe=","), parts.fragment))
