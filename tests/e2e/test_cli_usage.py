"""``dsipam pool usage [POOL]``: per-family utilisation bars in the terminal and JSON, as a
subprocess against a real server, with cooldown, reservations, a full IPv4 family and an IPv6
family at the API's 2^64-1 cap (exact integers)."""

from __future__ import annotations

import json
import re

from test_cli import WAIT, dsipam, ok, refused

from dsipam.client import IpamClient
from dsipam.client._output import USAGE_BAR_WIDTH, used_percent

UTF8 = {"PYTHONIOENCODING": "utf-8"}
GLYPHS = {"█": "allocated", "▓": "cooldown", "▒": "reserved", "░": "free"}
LINE = re.compile(r"^  (IPv[46])  ([█▓▒░#=+.]+)  (\S+) used$")


def _make_pools(target: str) -> None:
    """Made with the SDK (fast); only the command under test runs as a subprocess."""
    from dsipam.client import PoolExhausted

    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("web", ["198.18.0.0/26", "fd00:a::/48"], cooldown=600)
        ipam.create_pool("tiny", ["198.18.1.0/30", "fd00:b::/120"])
        for i in range(20):
            ipam.allocate("web", f"w{i}", policy="require")
        for i in range(5):  # released: in cooldown for 600 s
            ipam.release("web", f"w{i}")
        ipam.reserve_addresses("web", ["198.18.0.60/30"])
        for i in range(2):  # a /30 holds two addresses: IPv4 of tiny is full
            ipam.allocate("tiny", f"t{i}", policy="require")
        try:
            ipam.allocate("tiny", "t2", policy="require")
            raise AssertionError("tiny's IPv4 family should be exhausted")
        except PoolExhausted:
            pass


def _families(text: str) -> dict[tuple[str, str], tuple[str, str, list[str]]]:
    """(pool, family) -> (bar, percent, the count lines under it)."""
    out: dict[tuple[str, str], tuple[str, str, list[str]]] = {}
    pool = current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "allocated" not in line:
            pool = line.split()[0]
            continue
        m = LINE.match(line)
        if m:
            current = (pool, m[1])
            out[current] = (m[2], m[3], [])
        elif line.startswith("        ") and current:
            out[current][2].append(line.strip())
    return out


def test_pool_usage_draws_a_bar_per_family_with_exact_counts(target: str) -> None:
    _make_pools(target)
    text = ok(dsipam("pool", "usage", target=target, env=UTF8))
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert text.splitlines()[-1] == "█ allocated  ▓ cooldown  ▒ reserved  ░ free"
    shown = _families(text)
    with IpamClient(target, timeout=WAIT) as ipam:
        pools = {p.name: p for p in ipam.iter_pools()}
    assert {k[0] for k in shown} == {"web", "tiny"}
    for name, pool in pools.items():
        for u in pool.usage:
            bar, percent, counts = shown[(name, u.family.label)]
            assert len(bar) == USAGE_BAR_WIDTH, bar
            numbers = dict((label, int(n)) for n, label in re.findall(r"(\d+) (allocated|cooldown|reserved|free|in all)",
                                                                        " ".join(counts)))
            assert numbers == {"allocated": u.allocated, "cooldown": u.cooldown, "reserved": u.reserved,
                               "free": u.free, "in all": u.size}, (name, u, counts)
            used = u.allocated + u.cooldown + u.reserved
            assert percent == used_percent(used, u.size)
            for glyph, state in GLYPHS.items():  # every non-zero state shows, a zero one does not
                assert (glyph in bar) == (getattr(u, state) > 0), (name, u.family, state, bar)
            # cells proportional to the counts: within one cell, plus the cells given to states too
            # small for one of their own (which show all the same)
            wants = {glyph: getattr(u, state) * USAGE_BAR_WIDTH / u.size for glyph, state in GLYPHS.items()}
            given = sum(1 for w in wants.values() if 0 < w < 0.5)
            for glyph, want in wants.items():
                assert abs(bar.count(glyph) - want) <= 1 + given, (glyph, bar, want)
    # web IPv4: 62 addresses, 15 allocated, 5 cooling down, 3 reserved (.60-.62; .63 is the
    # broadcast address) -> 23 used, 37.1%
    assert shown[("web", "IPv4")][1] == "37.1%"
    # tiny IPv4 is full; web's IPv6 /48 is capped at 2^64-1 addresses: a tiny exact share
    assert shown[("tiny", "IPv4")][0] == "█" * USAGE_BAR_WIDTH and shown[("tiny", "IPv4")][1] == "100%"
    web6 = pools["web"].usage_of("ipv6")
    assert web6.size == 2**64 - 1 and f"{web6.size} in all" in " ".join(shown[("web", "IPv6")][2])
    assert shown[("web", "IPv6")][1] == "1.1e-16%"  # 15 allocated + 5 in cooldown of 2^64-1


def test_pool_usage_of_one_pool_in_ascii_and_json(target: str) -> None:
    _make_pools(target)
    text = ok(dsipam("pool", "usage", "tiny", target=target, env={"PYTHONIOENCODING": "ascii"}))
    assert "web" not in text and text.splitlines()[0] == "tiny"
    assert re.search(r"^  IPv4  #{40}  100% used$", text, re.M), text
    assert text.splitlines()[-1] == "# allocated  = cooldown  + reserved  . free"
    doc = json.loads(ok(dsipam("pool", "usage", "web", "-o", "json", target=target)))
    with IpamClient(target, timeout=WAIT) as ipam:
        pool = ipam.get_pool("web")
    (entry,) = doc["pools"]
    assert entry["name"] == "web"
    for fam, u in zip(entry["families"], pool.usage, strict=True):
        assert fam["family"] == u.family.value
        assert (fam["size"], fam["allocated"], fam["cooldown"], fam["reserved"], fam["free"]) == (
            u.size, u.allocated, u.cooldown, u.reserved, u.free)
        assert fam["used"] == u.allocated + u.cooldown + u.reserved
        assert isinstance(fam["size"], int) and isinstance(fam["used_percent"], float)
    assert entry["families"][0]["used_percent"] == 37.1
    assert entry["families"][1]["size"] == 18446744073709551615  # exact, past 2^53
    assert entry["families"][1]["used_percent"] == 1.084e-16
    refused(dsipam("pool", "usage", "nope", target=target), 1, "nope")
    assert ok(dsipam("pool", "usage", "-o", "json", target=target)).count('"name"') == 2
