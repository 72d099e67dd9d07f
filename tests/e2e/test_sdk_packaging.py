"""The SDK as its own distribution (clients/python: dsipam-client): the wheel holds the SDK,
the generated stubs and py.typed and nothing of the server; installed alone it talks to a real
server and runs the CLI; and mypy --strict passes on the hand-written part."""

from __future__ import annotations

import email
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from support import ROOT

CLIENT = ROOT / "clients" / "python"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds the dsipam-client wheel from a copy of clients/python (the tree stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (built,) = (tmp / "dist").glob("dsipam_client-*.whl")
    return built


def test_the_wheel_holds_the_sdk_and_stubs_and_no_server(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"dsipam/client/py.typed", "dsipam/client/__init__.py", "dsipam/client/_client.py",
            "dsipam/client/_aio.py", "dsipam/client/_cli.py", "dsipam/client/_stream.py", "dsipam/v1/ipam_pb2.py",
            "dsipam/v1/ipam_pb2.pyi"} <= names
    assert not [n for n in names if n.startswith(("dsipam/server", "dsipam/migrations", "dsipam/cni"))]
    assert "dsipam/__init__.py" not in names  # dsipam stays a namespace package
    requires = " ".join(meta.get_all("Requires-Dist") or [])
    assert "grpcio" in requires and "protobuf" in requires
    for server_only in ("sqlalchemy", "asyncpg", "alembic", "uvloop"):
        assert server_only not in requires.lower()
    assert "dsipam = dsipam.client._cli:main" in entry_points


def test_installed_alone_it_talks_to_a_real_server(wheel: Path, target: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # -S: no site processing, so neither the editable install of the whole project nor its .pth
    # files are seen; the dependencies come from the environment's site-packages by path.
    deps = sysconfig.get_paths()["purelib"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DSIPAM_", "PYTHON"))},
           "PYTHONPATH": f"{site}{os.pathsep}{deps}", "DSIPAM_TARGET": target}
    code = (
        "import json, sys\n"
        "import dsipam.client as sdk\n"
        "from dsipam.client._cli import main\n"
        "with sdk.IpamClient() as ipam:\n"
        "    ipam.create_pool('alone', ['198.18.0.0/24', 'fd00::/120'])\n"
        "    pair = ipam.allocate('alone', 'o', policy='require').allocation\n"
        "rc = main(['alloc', 'list', 'alone', '-o', 'json'])\n"
        "try:\n"
        "    import dsipam.server\n"
        "    server = True\n"
        "except ImportError:\n"
        "    server = False\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'asyncpg', 'alembic'))\n"
        "print(json.dumps({'rc': rc, 'sdk': sdk.__file__, 'server': server, 'heavy': heavy,\n"
        "                  'pair': [str(a.ip) for a in pair.addresses]}))\n"
    )
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    listed, summary = run.stdout.rsplit("\n{", 1)[0], json.loads("{" + run.stdout.rsplit("\n{", 1)[1])
    assert summary["rc"] == 0 and summary["server"] is False and summary["heavy"] == []
    assert summary["sdk"].startswith(str(site))
    owners = json.loads(listed)["allocations"]
    assert [a["owner"] for a in owners] == ["o"]
    assert [a["ip"] for a in owners[0]["addresses"]] == summary["pair"]


def test_mypy_strict_passes_on_the_sdk() -> None:
    missing = [m for m in ("mypy", "grpc-stubs", "google-stubs") if importlib.util.find_spec(m.replace("-", "_"))
               is None and not (Path(sysconfig.get_paths()["purelib"]) / m).is_dir()]
    if missing:
        pytest.skip(f"needs {missing} (pip install 'dsipam-client[typing]': types-grpcio, types-protobuf, mypy)")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=CLIENT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout
    config = (CLIENT / "pyproject.toml").read_text()
    assert "strict = true" in config and 'packages = ["dsipam.client"]' in config
