"""The operator documentation says what the code does: the hot-path SQL in
docs/architecture.md is the store's, the metrics and settings in docs/operations.md exist,
and the PgBouncer arguments it lists are the ones the engine passes."""

from __future__ import annotations

import re
from pathlib import Path

from dsipam.server.store import db

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SERVER = ROOT / "server" / "dsipam" / "server"


def _squash(sql: str) -> str:
    return " ".join(re.sub(r"--[^\n]*", "", sql).split())


def _store_sql() -> str:
    return "\n".join(p.read_text() for p in sorted((SERVER / "store").glob("*.py")))


def _starts(text: str, needle: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(needle), text)]


def _subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(word in it for word in needle)


def _sql_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", markdown, re.S)


def test_architecture_hot_path_is_the_store_sql() -> None:
    doc = (DOCS / "architecture.md").read_text()
    assert "```mermaid" in doc and "flowchart" in doc
    (hot,) = [b for b in _sql_blocks(doc) if "FOR UPDATE SKIP LOCKED" in b and "set_bit" in b]
    take = re.search(r"(WITH b AS \(.*?RETURNING host\(k\.base \+ b\.bit\) AS ip;)", hot, re.S)
    assert take is not None
    store = _squash(_store_sql())
    documented = _squash(take.group(1).rstrip(";").replace("$pool", ":pool").replace("$family", ":family")).split()
    # The store's statement may say more (extra conditions), never less or in another order.
    candidates = [store[i:].split(" AS ip", 1)[0].split() + ["AS", "ip"] for i in _starts(store, "WITH b AS (")]
    assert any(_subsequence(documented, words) for words in candidates), (
        "the documented take statement is not the store's"
    )
    for fragment in (
        "FROM ipam_allocations WHERE pool_id = :pool AND owner = :owner FOR UPDATE",
        "ON CONFLICT (range_id, base) DO NOTHING",
        "ON CONFLICT (pool_id, owner) DO NOTHING",
    ):
        assert _squash(fragment) in store, fragment
    for table in ("ipam_pools", "ipam_ranges", "ipam_blocks", "ipam_allocations"):
        assert f"`{table}`" in doc and f'"{table}"' in (ROOT / "migrations/versions/0001_initial.py").read_text()


def test_operations_metrics_exist() -> None:
    doc = (DOCS / "operations.md").read_text()
    # Metrics are defined where they are counted (store/_fast.py, background.py, ...): the whole package,
    # and the controller's (clients/kubernetes/dsipam/kube/_metrics.py).
    packages = (SERVER, ROOT / "clients" / "kubernetes" / "dsipam" / "kube")
    source = "".join(p.read_text() for pkg in packages for p in sorted(pkg.rglob("*.py")))
    names = set(re.findall(r"`(dsipam_[a-z_]+)(?:\{[^`]*\})?`", doc))
    assert len(names) >= 8
    for name in names:
        base = re.sub(r"_total$", "", name)
        assert f'"{base}"' in source, f"{name} is documented but not exported"
    for rule in re.findall(r"expr: .*", doc):
        for metric in re.findall(r"dsipam_[a-z_]+", rule):
            base = re.sub(r"_(total|bucket)$", "", metric)
            assert f'"{base}"' in source, f"alert uses unknown metric {metric}"


def test_operations_settings_exist() -> None:
    doc = (DOCS / "operations.md").read_text()
    source = (SERVER / "settings.py").read_text() + (SERVER / "store" / "db.py").read_text()
    for name in set(re.findall(r"`(DSIPAM_[A-Z_]+)`", doc)):
        if name.startswith("DSIPAM_CNI_"):
            assert name in (ROOT / "deploy/docker/install-cni.sh").read_text(), name
        else:
            assert f'"{name}"' in source, f"{name} is documented but not read"


def test_operations_pgbouncer_arguments_are_the_engine_ones() -> None:
    doc = (DOCS / "operations.md").read_text()
    section = doc.split("## PgBouncer", 1)[1].split("\n## ", 1)[0]
    args = db.pgbouncer_connect_args()
    documented = set(re.findall(r"^\| `([a-z_]+)=", section, re.M))
    assert documented == set(args)
    assert args["statement_cache_size"] == 0 and args["prepared_statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() == ""
