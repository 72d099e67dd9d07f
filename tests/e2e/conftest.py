"""Fixtures of the controller's reconcile tests (test_kube_reconcile.py, test_kube_attack.py): a
controller process factory under the controller's own RBAC, a core API client, a throwaway
namespace and an SDK client. Helpers they share are in tests/kube_controller.py. Also the
compiled CNI plugin, built once per session, for the CNI plugin's tests."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kube import ApiServer, ControllerProcess, install_controller_manifests
from kube_controller import LEASE
from kubernetes_asyncio import client
from support import install_plugin

from dsipam.client import AsyncIpamClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def start(kube_api: ApiServer, target: str, tmp_path: Path,
                request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., ControllerProcess]]:
    """Starts controllers (``start(*args, identity=...)``); checks their logs and stops them after the test."""
    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    started: list[ControllerProcess] = []
    default_identity = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_kube_") + "-test"

    def _start(*args: str, identity: str = default_identity) -> ControllerProcess:
        proc = ControllerProcess(kubeconfig, target, tmp_path / f"{identity}-{len(started)}.log", identity=identity,
                                 args=[*LEASE, *args])
        started.append(proc)
        return proc

    try:
        yield _start
        for proc in started:
            proc.check()
    finally:
        for proc in started:
            proc.terminate()


@pytest.fixture
async def core(kube_api: ApiServer) -> AsyncIterator[client.CoreV1Api]:
    async with kube_api.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
async def ns(core: client.CoreV1Api) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    await core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    await core.delete_namespace(name)


@pytest.fixture
async def ipam(target: str) -> AsyncIterator[AsyncIpamClient]:
    async with AsyncIpamClient(target) as c:
        yield c


@pytest.fixture(scope="session")
def compiled_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled plugin (clients/cni/go), built by scripts/build-cni with Debian's Go packages.

    Without them the compiled plugin's tests are skipped, with the reason; under CI (which
    installs them) they fail instead.
    """
    out = tmp_path_factory.mktemp("cni-compiled") / "dsipam-cni"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build-cni"), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"scripts/build-cni failed: {proc.stderr.strip()[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return out


@pytest.fixture(scope="module")
def both_plugins(compiled_plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both plugins installed, each in its own directory: {"python": …/dsipam, "compiled": …/dsipam}."""
    return {kind: install_plugin(tmp_path_factory.mktemp(f"cni-{kind}"), compiled_plugin if kind == "compiled" else None)
            for kind in ("python", "compiled")}
