"""Backup and restore: scripts/backup_restore_test.py takes a pg_dump under allocation load,
restores it into a new database and checks the copy (fsck, schema, consistency query).
The test also breaks the restored copy on purpose, to show that those checks notice."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import uuid
from pathlib import Path

from support import ADMIN_URL, psql

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "backup_restore_test.py"


def _script_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("backup_restore_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _databases(prefix: str) -> list[str]:
    return psql(ADMIN_URL, f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%' ORDER BY 1").split()


def test_dump_under_load_restores_to_a_consistent_copy() -> None:
    prefix = f"dsipam_brt_{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--clients", "4", "--warmup-calls", "100", "--prefix", prefix, "--keep-restored"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    kept = re.search(r"kept restored copy: (\S+)", out)
    try:
        assert done.returncode == 0 and out.rstrip().endswith("restore test: OK"), out
        during = [int(n) for n in re.findall(r"(\d+) calls completed during the dump", out)]
        assert during and during[-1] > 0, out  # the dump really ran under load
        for pool in ("pods", "v6only"):
            assert f"restored fsck {pool}: clean" in out, out
        assert "restored schema matches the models" in out
        assert kept is not None, out
        restored = kept.group(1)
        assert _databases(f"{prefix}_src_") == []  # the source is gone; only the kept copy is left
        assert _databases(f"{prefix}_copy_") == [restored.rsplit("/", 1)[1]]
        allocations = int(psql(restored, "SELECT count(*) FROM ipam_allocations"))
        assert allocations > 0
        assert f"restored copy holds {allocations} allocations" in out

        # Break the copy: clear the bit of one allocated IPv4 address. Both checks must see it.
        broken = psql(
            restored,
            """
            WITH one AS (SELECT a.pool_id, a.ipv4 FROM ipam_allocations a JOIN ipam_pools p ON p.id = a.pool_id
                          WHERE p.name = 'pods' AND a.ipv4 IS NOT NULL ORDER BY a.owner LIMIT 1)
            UPDATE ipam_blocks b
               SET bitmap = set_bit(b.bitmap, CAST(one.ipv4 - b.base AS integer), 0), free_count = b.free_count + 1
              FROM one
             WHERE b.pool_id = one.pool_id AND b.family = 4 AND one.ipv4 <<= b.base
            RETURNING host(one.ipv4)
            """,
        )
        broken = broken.splitlines()[0]  # psql adds the command tag after RETURNING rows
        assert broken.count(".") == 3, broken
        fsck = subprocess.run(
            [sys.executable, "-m", "dsipam.server", "fsck", "pods", "--database-url", restored],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert fsck.returncode == 1 and "fsck pods: clean" not in fsck.stdout, fsck.stdout + fsck.stderr
        assert f"{broken} is held but not marked taken" in fsck.stdout, fsck.stdout
        mismatches = psql(restored, _script_module().consistency_sql(restored))
        assert mismatches.startswith("pods IPv4:"), mismatches
    finally:
        for name in _databases(prefix):
            psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    assert _databases(prefix) == []
