"""Rendering for the CLI: stable JSON/YAML documents, terminal tables and a progress spinner.

Imports nothing from gRPC (the SDK types are only used for annotations).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import (
        Address,
        AllocateResult,
        Allocation,
        Block,
        FamilyUsage,
        IPNetwork,
        MigrationProgress,
        Pool,
        Range,
        ReleaseNodeResult,
        WatchEvent,
    )

Document = dict[str, Any]


# -- documents (the JSON/YAML shapes; keep them stable) -------------------------------------


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _opt(value: object | None) -> str | None:
    return None if value is None else str(value)


def range_doc(r: Range) -> Document:
    return {
        "cidr": str(r.cidr),
        "family": r.family.value,
        "first": _opt(r.first),
        "last": _opt(r.last),
        "gateway": _opt(r.gateway),
        "exclude": [str(x) for x in r.exclude],
        "block_size": r.block_size,
    }


def usage_doc(u: FamilyUsage) -> Document:
    return {
        "family": u.family.value,
        "size": u.size,
        "allocated": u.allocated,
        "free": u.free,
        "utilisation": round(u.utilisation, 6),
        "cooldown": u.cooldown,
        "reserved": u.reserved,
    }


def seconds(value: dt.timedelta) -> int | float:
    """A duration as seconds: an integer when it is whole."""
    total = value.total_seconds()
    return int(total) if total == int(total) else total


def pool_doc(p: Pool) -> Document:
    return {
        "name": p.name,
        "ranges": [range_doc(r) for r in p.ranges],
        "labels": dict(sorted(p.labels.items())),
        "usage": [usage_doc(u) for u in p.usage],
        "create_time": _time(p.create_time),
        "cooldown": seconds(p.cooldown),
        "node_affinity": p.node_affinity.value,
        "reservations": [str(r) for r in p.reservations],
        "network": p.network,
    }


def address_doc(a: Address) -> Document:
    return {"family": a.family.value, "ip": str(a.ip), "prefix_length": a.prefix_length, "gateway": _opt(a.gateway)}


def allocation_doc(a: Allocation) -> Document:
    return {
        "pool": a.pool,
        "owner": a.owner,
        "addresses": [address_doc(x) for x in a.addresses],
        "attributes": dict(sorted(a.attributes.items())),
        "create_time": _time(a.create_time),
        "node": a.node,
        "borrowed": a.borrowed,
    }


def allocate_doc(r: AllocateResult) -> Document:
    return {"allocation": allocation_doc(r.allocation), "created": r.created}


def block_doc(b: Block) -> Document:
    return {"cidr": str(b.cidr), "family": b.family.value, "node": b.node, "used": b.used, "free": b.free}


def release_node_doc(pool: str, node: str, r: ReleaseNodeResult) -> Document:
    return {"pool": pool, "node": node, "released": [block_doc(b) for b in r.released],
            "kept": [block_doc(b) for b in r.kept]}


def progress_doc(pool: str, policy: str, p: MigrationProgress) -> Document:
    return {"pool": pool, "policy": policy, "total": p.total, "processed": p.processed, "upgraded": p.upgraded,
            "failed": p.failed, "errors": list(p.errors)}


def event_doc(e: WatchEvent) -> Document:
    return {
        "type": e.type.value,
        "owner": e.owner or None,
        "addresses": [address_doc(a) for a in e.addresses],
        "time": _time(e.time),
        "resume_token": e.resume_token,
    }


def to_json(doc: Any) -> str:
    """Indented JSON with keys in a fixed order (the order the documents are built in)."""
    return json.dumps(doc, indent=2, ensure_ascii=False)


def to_json_line(doc: Any) -> str:
    """One line of JSON (for streams of documents: JSON lines)."""
    return json.dumps(doc, ensure_ascii=False, separators=(", ", ": "))


# -- YAML (a small emitter for the documents above; no dependency) ---------------------------

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:@+-]*\Z")  # \Z: "$" also matches before a final newline
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.match(text) and not text.endswith(":") and text.lower() not in _RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            k = _yaml_scalar(str(key))
            if isinstance(item, Mapping | list) and item:
                out.append(f"{pad}{k}:")
                out.extend(_yaml_lines(item, indent + 2))
            else:
                out.append(f"{pad}{k}: {_yaml_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping | list) and item:
                nested = _yaml_lines(item, indent + 2)
                out.append(f"{pad}- {nested[0].lstrip()}")
                out.extend(nested[1:])
            else:
                out.append(f"{pad}- {_yaml_inline(item)}")
    else:
        out.append(pad + _yaml_scalar(value))
    return out


def _yaml_inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _yaml_scalar(value)


def to_yaml(doc: Any) -> str:
    """YAML for a document of dicts, lists, strings, numbers, booleans and None."""
    if isinstance(doc, Mapping | list) and not doc:
        return _yaml_inline(doc)
    return "\n".join(_yaml_lines(doc, 0))


def render_document(doc: Any, output: str) -> str:
    """``doc`` as ``json`` or ``yaml``."""
    return to_yaml(doc) if output == "yaml" else to_json(doc)


# -- tables ---------------------------------------------------------------------------------


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = (), indent: int = 0
) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` lists right-aligned columns."""
    cells = [[str(c) for c in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = set(right)
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in align else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" " * indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``Key:  value`` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {'-' if v is None or v == '' else v}" for k, v in pairs)


def _unicode(stream: IO[str]) -> bool:
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf_8")


def bar(fraction: float, width: int = 20, *, unicode: bool | None = None) -> str:
    """A utilisation bar such as ``[#####...............]``."""
    if unicode is None:
        unicode = _unicode(sys.stdout)
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    if fraction > 0 and filled == 0:
        filled = 1  # anything in use shows
    full, empty = ("█", "░") if unicode else ("#", ".")
    return f"[{full * filled}{empty * (width - filled)}]"


def count(n: int) -> str:
    """An address count: exact below 10^12, else in scientific notation (IPv6 sizes)."""
    return str(n) if n < 10**12 else f"{n:.3e}"


def when(value: dt.datetime | None) -> str | None:
    """A timestamp for tables: UTC, to the second."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def range_rows(ranges: Iterable[Range]) -> list[list[object]]:
    return [
        [str(r.cidr), r.first, r.last, r.gateway, ",".join(str(x) for x in r.exclude), r.block_size]
        for r in ranges
    ]


def usage_rows(usage: Iterable[FamilyUsage]) -> list[list[object]]:
    return [
        [u.family.label, count(u.size), count(u.allocated), count(u.cooldown), count(u.reserved), count(u.free),
         bar(u.utilisation), f"{u.utilisation * 100:.1f}%"]
        for u in usage
    ]


def duration_text(value: dt.timedelta) -> str:
    """``30s``, ``1.5s``, ``0s (none)``."""
    total = seconds(value)
    return f"{total}s" if total else "0s (none)"


def networks_text(nets: Sequence[IPNetwork]) -> str:
    return ", ".join(str(n) for n in nets)


def pool_table(p: Pool) -> str:
    parts = [
        fields([("Pool", p.name), ("Network", p.network or "(default)"), ("Created", when(p.create_time)),
                ("Labels", labels_text(p.labels)),
                ("Cooldown", duration_text(p.cooldown)), ("Node affinity", p.node_affinity.value),
                ("Reservations", networks_text(p.reservations))]),
        "Ranges:",
        table(["CIDR", "FIRST", "LAST", "GATEWAY", "EXCLUDE", "BLOCK"], range_rows(p.ranges), right=[5], indent=2),
        "Usage:",
        table(["FAMILY", "SIZE", "ALLOCATED", "COOLDOWN", "RESERVED", "FREE", "UTILISATION", ""], usage_rows(p.usage),
              right=[1, 2, 3, 4, 5, 7], indent=2),
    ]
    return "\n".join(parts)


def _used(u: FamilyUsage | None) -> str | None:
    if u is None:
        return None
    return f"{count(u.allocated)}/{count(u.size)} ({u.utilisation * 100:.1f}%)"


def pools_table(pools: Sequence[Pool]) -> str:
    rows = [
        [p.name, " ".join(str(r.cidr) for r in p.ranges), _used(p.usage_of("ipv4")), _used(p.usage_of("ipv6")),
         when(p.create_time)]
        for p in pools
    ]
    return table(["NAME", "RANGES", "IPV4 USED", "IPV6 USED", "CREATED"], rows)


def _address_text(a: Address | None) -> str | None:
    if a is None:
        return None
    return f"{a.interface} via {a.gateway}" if a.gateway else str(a.interface)


def allocation_table(a: Allocation, *, created: bool | None = None) -> str:
    pairs: list[tuple[str, object]] = []
    if created is not None:
        pairs.append(("Result", "allocated" if created else "already held (unchanged)"))
    pairs += [("Pool", a.pool), ("Owner", a.owner)]
    pairs += [(x.family.label, _address_text(x)) for x in a.addresses]
    pairs += [("Node", node_text(a)), ("Attributes", labels_text(a.attributes)), ("Created", when(a.create_time))]
    return fields(pairs)


def node_text(a: Allocation) -> str | None:
    """The allocation's node, marked when an address was borrowed from another node's block."""
    if a.node is None:
        return None
    return f"{a.node} (borrowed)" if a.borrowed else a.node


def allocations_table(items: Sequence[Allocation]) -> str:
    rows = [
        [a.owner, a.ipv4.interface if a.ipv4 else None, a.ipv6.interface if a.ipv6 else None, node_text(a),
         when(a.create_time)]
        for a in items
    ]
    return table(["OWNER", "IPV4", "IPV6", "NODE", "CREATED"], rows)


def blocks_table(blocks: Sequence[Block]) -> str:
    rows = [[str(b.cidr), b.family.label, b.node, b.used, b.free] for b in blocks]
    return table(["CIDR", "FAMILY", "NODE", "USED", "FREE"], rows, right=[3, 4])


def release_node_text(pool: str, node: str, r: ReleaseNodeResult) -> str:
    lines = [f"released {len(r.released)} empty block(s) of node {node} in {pool}"
             + (f": {', '.join(str(b.cidr) for b in r.released)}" if r.released else "")]
    if r.kept:
        lines.append(f"kept {len(r.kept)} block(s) that still hold allocations:")
        lines.append(blocks_table(r.kept))
    return "\n".join(lines)


def progress_line(p: MigrationProgress) -> str:
    return f"processed {p.processed} of {p.total}: {p.upgraded} upgraded, {p.failed} failed"


def event_line(e: WatchEvent) -> str:
    """One line per event: time, type, owner and addresses (a bookmark shows its token)."""
    if e.is_bookmark:
        return f"{when(e.time) or '-'}  bookmark  resume-token={e.resume_token}"
    return f"{when(e.time) or '-'}  {e.type.value:<9}  {e.owner}  {addresses_text(e.addresses) or '-'}"


def addresses_text(addresses: Sequence[Address]) -> str:
    return ", ".join(str(a.interface) for a in addresses)


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A one-line spinner on a terminal (stderr by default); silent when it is not a terminal."""

    def __init__(self, label: str, stream: IO[str] | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if _unicode(self.stream) else "|/-\\"
        self.tick = 0
        self.last = 0.0
        self.shown = False

    def update(self, text: str, *, force: bool = False) -> None:
        """Shows ``label: text`` (at most ten times a second unless ``force``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        frame = self.frames[self.tick % len(self.frames)]
        self.tick += 1
        self.stream.write(f"\r\x1b[2K{frame} {self.label}: {text}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """Clears the line."""
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


# -- pool usage bars (`dsipam pool usage`) --------------------------------------------------

USAGE_STATES = ("allocated", "cooldown", "reserved", "free")
_USAGE_CELLS = {True: ("█", "▓", "▒", "░"), False: ("#", "=", "+", ".")}
USAGE_BAR_WIDTH = 40
"""Cells of a usage bar: a family's line (indent, label, bar, percentage) stays within 72 columns."""


def used_percent(used: int, size: int) -> str:
    """``used / size`` as a percentage for people, from exact integers: never ``100%`` or ``0%`` unless
    exactly so, more digits near the ends, scientific notation for tiny shares of IPv6 families."""
    import math
    from decimal import ROUND_DOWN, Decimal, localcontext

    if size <= 0:
        return "-"
    if used <= 0:
        return "0%"
    if used >= size:
        return "100%"
    with localcontext() as ctx:
        ctx.prec = 60
        pct = Decimal(used) * 100 / Decimal(size)
        if pct < Decimal("0.01"):
            return f"{pct:.1e}%".replace("e-0", "e-")
        if pct > 99:  # as many decimals as the free share needs (up to 6), rounded down: never 100%
            places = min(max(1, -math.floor((100 - pct).log10())), 6)
            return f"{pct.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)}%"
        for places in (1, 2, 3):  # the shortest rounding that does not say 0
            shown = pct.quantize(Decimal(1).scaleb(-places))
            if shown > 0:
                return f"{shown}%"
        return f"{pct:.1e}%"


def usage_cells(counts: Sequence[int], width: int = USAGE_BAR_WIDTH) -> list[int]:
    """Cells per state (allocated, cooldown, reserved, free) of a bar ``width`` wide, from exact
    counts: proportional (largest remainders), any non-zero state gets at least one cell."""
    total = sum(counts)
    if total <= 0:
        return [0, 0, 0, width]
    exact = [c * width for c in counts]
    cells = [e // total for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (exact[i] % total), reverse=True)
    for i in order[: width - sum(cells)]:
        cells[i] += 1
    for i, c in enumerate(counts):  # visible when non-zero: take the cell from the largest state
        if c > 0 and cells[i] == 0:
            cells[i] = 1
            big = max(range(len(cells)), key=lambda j: (cells[j], counts[j]))
            cells[big] -= 1
    return cells


def usage_bar(u: FamilyUsage, *, unicode: bool, width: int = USAGE_BAR_WIDTH) -> str:
    counts = [u.allocated, u.cooldown, u.reserved, u.free]
    glyphs = _USAGE_CELLS[unicode]
    return "".join(g * n for g, n in zip(glyphs, usage_cells(counts, width), strict=True))


def _wrap(parts: Sequence[str], indent: int, width: int = 80) -> list[str]:
    lines, line = [], ""
    for part in parts:
        candidate = f"{line}, {part}" if line else part
        if line and indent + len(candidate) > width:
            lines.append(line + ",")
            line = part
        else:
            line = candidate
    lines.append(line)
    return [" " * indent + text for text in lines]


def usage_text(pools: Sequence[Pool], *, unicode: bool) -> str:
    """Per pool and family: a bar of allocated, cooldown, reserved and free addresses with the
    share in use, and the exact counts under it (wrapped to 80 columns)."""
    out: list[str] = []
    for pool in pools:
        out.append(pool.name + (f"  (network {pool.network})" if pool.network else ""))
        for u in pool.usage:
            used = u.allocated + u.cooldown + u.reserved
            bar = usage_bar(u, unicode=unicode)
            if _share_unknown(u):
                out.append(f"  {u.family.label}  {bar}  share unknown: counts saturated at 2^64-1")
            else:
                out.append(f"  {u.family.label}  {bar}  {used_percent(used, u.size)} used")
            out += _wrap([f"{u.allocated} allocated", f"{u.cooldown} cooldown", f"{u.reserved} reserved",
                          f"{u.free} free", f"{u.size} in all"], indent=8)
        if not pool.usage:
            out.append("  (no ranges)")
    glyphs = _USAGE_CELLS[unicode]
    out.append("  ".join(f"{g} {name}" for g, name in zip(glyphs, USAGE_STATES, strict=True)))
    return "\n".join(out)


COUNT_CAP = 2**64 - 1  # the API's counters saturate there (an IPv6 /48 holds 2^80 addresses)


def _share_unknown(u: FamilyUsage) -> bool:
    """The family's size and what is used both read the cap: the share in use cannot be told (a
    /64 reserved in a /48 reads as 2^64-1 of 2^64-1)."""
    return u.size >= COUNT_CAP and u.allocated + u.cooldown + u.reserved >= COUNT_CAP


def usage_report_doc(pools: Sequence[Pool]) -> Document:
    """``{pools: [{name, network, families: [{family, size, allocated, cooldown, reserved, free, used,
    used_percent, saturated}]}]}``: exact integer counts, except that ``saturated`` says a count
    reads the API's cap of 2^64-1 (an at-least value); ``used_percent`` to 4 significant digits,
    never 100 unless full, null when the share cannot be told (size and use both at the cap)."""
    docs = []
    for pool in pools:
        families = []
        for u in pool.usage:
            used = u.allocated + u.cooldown + u.reserved
            pct = float(f"{used * 100 / u.size:.4g}") if u.size else None
            if pct is not None and pct >= 100 and used < u.size:  # as the text: never 100 unless full
                pct = float(used_percent(used, u.size).rstrip("%"))
            if _share_unknown(u):
                pct = None
            saturated = COUNT_CAP in (u.size, u.allocated, u.cooldown, u.reserved, u.free)
            families.append({"family": u.family.value, "size": u.size, "allocated": u.allocated,
                             "cooldown": u.cooldown, "reserved": u.reserved, "free": u.free, "used": used,
                             "used_percent": pct, "saturated": saturated})
        docs.append({"name": pool.name, "network": pool.network, "families": families})
    return {"pools": docs}
