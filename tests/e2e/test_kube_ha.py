"""Must-shows 4 and 5: two controller replicas with a Lease (only the leader writes; SIGKILL of the
leader hands over within the lease duration), and watches that survive an API server restart (a pod
deleted while the watch was cut is still reconciled). Real API server, dsipam server, PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kube import (
    ApiServer,
    ControllerProcess,
    cluster_labels,
    delete_all_ippools,
    install_controller_manifests,
    wait_for,
)
from kubernetes_asyncio import client

from dsipam.client import AllocationNotFound, AsyncIpamClient, PoolNotFound

LEASE_DURATION, RENEW_DEADLINE, RETRY = 4.0, 3.0, 0.5
G, V, P = "ipam.dsipam.io", "v1alpha1", "ippools"


@pytest.fixture
async def start(kube_api: ApiServer, target: str, tmp_path: Path) -> AsyncIterator[Callable[..., ControllerProcess]]:
    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    started: list[ControllerProcess] = []

    def _start(identity: str, *args: str) -> ControllerProcess:
        proc = ControllerProcess(kubeconfig, target, tmp_path / f"{identity}.log", identity=identity, args=args)
        started.append(proc)
        return proc

    try:
        yield _start
        for proc in started:
            proc.check()
    finally:
        for proc in started:
            proc.terminate()
        await delete_all_ippools(kube_api)


@pytest.fixture
async def ipam(target: str) -> AsyncIterator[AsyncIpamClient]:
    async with AsyncIpamClient(target) as c:
        yield c


async def lease_holder(kube_api: ApiServer) -> str | None:
    async with kube_api.api_client() as api:
        lease = await client.CoordinationV1Api(api).read_namespaced_lease("dsipam-controller", "dsipam-system")
        return lease.spec.holder_identity


def ha_args() -> list[str]:
    return ["--lease-duration", str(LEASE_DURATION), "--renew-deadline", str(RENEW_DEADLINE), "--retry-period",
            str(RETRY), "--grace", "2", "--resync-interval", "2", "--status-interval", "0.5"]


WRITES = ("dsipam_controller_reconciles_total", "dsipam_controller_pool_writes_total",
          "dsipam_controller_status_writes_total", "dsipam_controller_leaks_released_total")


async def test_only_the_leader_acts_and_sigkill_hands_over(start: Callable[..., ControllerProcess],
                                                           kube_api: ApiServer, ipam: AsyncIpamClient) -> None:
    a = start(f"ha-a-{uuid.uuid4().hex[:4]}", *ha_args())
    await wait_for(a.is_leader, 30, what="first leader")  # a holds the Lease before b starts
    b = start(f"ha-b-{uuid.uuid4().hex[:4]}", *ha_args())
    await wait_for(lambda: b.get("/readyz")[0] == 200, 10, what="standby ready")
    async with kube_api.api_client() as api:
        custom = client.CustomObjectsApi(api)
        await custom.create_cluster_custom_object(G, V, P, {"apiVersion": f"{G}/{V}", "kind": "IPPool",
                                                            "metadata": {"name": "ha-one"},
                                                            "spec": {"ranges": [{"cidr": "198.18.20.0/24"}]}})
        await wait_for(lambda: _pool_exists(ipam, "ha-one"), 15, what="pool made by the leader")
        await asyncio.sleep(2 * RETRY + 1)  # the standby has had every chance to act
        assert await lease_holder(kube_api) == a.identity
        assert a.metric("dsipam_controller_pool_writes_total") >= 1 and a.metric("dsipam_controller_leader") == 1
        assert b.metric("dsipam_controller_leader") == 0 and "standby" in b.get("/readyz")[1]
        for name in WRITES:
            assert b.metric(name) == 0, name
        assert b.metric("dsipam_controller_watch_events_total") == 0  # a standby does not even watch

        takeovers = []
        leader, standby = a, b
        for round_ in range(3):
            t0 = time.monotonic()
            leader.kill()  # SIGKILL: no chance to give the Lease up
            await wait_for(standby.is_leader, LEASE_DURATION + 10, interval=0.05, what="takeover")
            took = time.monotonic() - t0
            takeovers.append(took)
            assert await lease_holder(kube_api) == standby.identity
            # The new leader acts: a new IPPool becomes a pool.
            name = f"ha-{round_}"
            await custom.create_cluster_custom_object(G, V, P, {
                "apiVersion": f"{G}/{V}", "kind": "IPPool", "metadata": {"name": name},
                "spec": {"ranges": [{"cidr": f"198.18.{21 + round_}.0/24"}]}})
            await wait_for(lambda n=name: _pool_exists(ipam, n), 15, what=f"{name} made by the new leader")
            leader, standby = standby, start(f"ha-{round_}-{uuid.uuid4().hex[:4]}", *ha_args())
            await wait_for(lambda s=standby: s.get("/readyz")[0] == 200, 10, what="standby ready")
        # A clean stop (SIGTERM) gives the Lease up: the standby need not wait for it to expire.
        t0 = time.monotonic()
        assert leader.terminate() == 0
        await wait_for(standby.is_leader, LEASE_DURATION + 10, interval=0.05, what="handover after SIGTERM")
        graceful = time.monotonic() - t0
    print(f"\ntakeover after SIGKILL of the leader: {', '.join(f'{t:.2f}s' for t in takeovers)} "
          f"(lease {LEASE_DURATION}s, retry {RETRY}s); after SIGTERM: {graceful:.2f}s")
    for took in takeovers:
        assert took <= LEASE_DURATION + RETRY + 1.5, takeovers
    assert graceful < LEASE_DURATION


async def _pool_exists(ipam: AsyncIpamClient, name: str) -> bool:
    try:
        await ipam.get_pool(name)
        return True
    except PoolNotFound:
        return False


async def _held(ipam: AsyncIpamClient, pool: str, owner: str) -> bool:
    try:
        await ipam.get_allocation(pool, owner)
        return True
    except AllocationNotFound:
        return False


async def test_watch_cut_by_api_server_restart_misses_nothing(start: Callable[..., ControllerProcess],
                                                              kube_api: ApiServer, ipam: AsyncIpamClient) -> None:
    """The API server is killed (every watch connection is cut mid-stream) and started again on the
    same port and etcd; a pod is deleted while the controller's watches are still down. No periodic
    resync runs meanwhile (interval 1 h), so only the resumed watch (or its relist) can see it."""
    await ipam.create_pool("cut", ["198.18.30.0/24"], labels=await cluster_labels(kube_api))
    ns = f"cut-{uuid.uuid4().hex[:6]}"
    async with kube_api.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        uids = {}
        for name in ("keep", "gone"):
            pod = client.V1Pod(metadata=client.V1ObjectMeta(name=name, namespace=ns),
                               spec=client.V1PodSpec(node_name="n1", containers=[client.V1Container(name="c",
                                                                                                   image="pause")]))
            uids[name] = (await core.create_namespaced_pod(ns, pod)).metadata.uid
            await ipam.allocate("cut", f"{name}/eth0", node="n1", attributes={"k8s.podUID": uids[name],
                                                                               "k8s.namespace": ns, "k8s.pod": name})
    # Lease long enough to outlive the outage (the leader keeps acting through it).
    ctl = start("cut", "--lease-duration", "30", "--renew-deadline", "20", "--retry-period", "1", "--grace", "1",
                "--resync-interval", "3600")
    ctl.outage_expected = True
    await wait_for(ctl.is_leader, 30, what="leader")
    await wait_for(lambda: ctl.metric("dsipam_controller_reconciles_total", kind="resync") >= 1, 15, what="resync")
    relists = ctl.metric("dsipam_controller_relists_total", kind="pods")

    t0 = time.monotonic()
    kube_api.stop_apiserver()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(kube_api.start_apiserver)
    async with kube_api.api_client() as api:
        await client.CoreV1Api(api).delete_namespaced_pod("gone", ns, grace_period_seconds=0)
    await wait_for(lambda: not ctl.metric("dsipam_controller_watch_restarts_total", kind="pods") == 0, 5,
                   what="the watch noticed the cut")
    await wait_for(lambda: _gone(ipam), 30, what="the pod deleted during the cut is released")
    took = time.monotonic() - t0
    assert await _held(ipam, "cut", "keep/eth0")
    resumed = ctl.metric("dsipam_controller_watch_events_total", kind="pods", type="DELETED")
    relisted = ctl.metric("dsipam_controller_relists_total", kind="pods") - relists
    print(f"\nAPI server restart: watch cut {ctl.metric('dsipam_controller_watch_restarts_total', kind='pods'):.0f}x; "
          f"deletion seen by {'the resumed watch' if resumed else 'a relist (410)'} "
          f"(relists {relisted:.0f}); released {took:.2f}s after the kill")
    assert ctl.metric("dsipam_controller_leader") == 1
    assert ctl.metric("dsipam_controller_reconciles_total", kind="resync") == 1  # not the backstop
    async with kube_api.api_client() as api:
        await client.CoreV1Api(api).delete_namespace(ns)


async def _gone(ipam: AsyncIpamClient) -> bool:
    return not await _held(ipam, "cut", "gone/eth0")


async def test_watch_resumed_after_410_gone_relists_and_misses_nothing(
        start: Callable[..., ControllerProcess], kube_api: ApiServer, ipam: AsyncIpamClient) -> None:
    """The controller is frozen (SIGSTOP) while the API server restarts, a pod is deleted and etcd's
    history is compacted past the controller's resourceVersion: on SIGCONT its resume gets 410 Gone,
    it lists afresh, and the deletion it never saw as an event is still reconciled."""
    import signal

    await ipam.create_pool("gone410", ["198.18.31.0/24"], labels=await cluster_labels(kube_api))
    ns = f"g410-{uuid.uuid4().hex[:6]}"
    async with kube_api.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        for name in ("keep", "gone"):
            pod = client.V1Pod(metadata=client.V1ObjectMeta(name=name, namespace=ns),
                               spec=client.V1PodSpec(node_name="n1", containers=[client.V1Container(name="c",
                                                                                                   image="pause")]))
            uid = (await core.create_namespaced_pod(ns, pod)).metadata.uid
            await ipam.allocate("gone410", f"{name}/eth0", node="n1", attributes={"k8s.podUID": uid})
    ctl = start("g410", "--lease-duration", "60", "--renew-deadline", "40", "--retry-period", "1", "--grace", "1",
                "--resync-interval", "3600")
    ctl.outage_expected = True
    await wait_for(ctl.is_leader, 30, what="leader")
    await wait_for(lambda: ctl.metric("dsipam_controller_reconciles_total", kind="resync") >= 1, 15, what="resync")
    relists = ctl.metric("dsipam_controller_relists_total", kind="pods")

    ctl.proc.send_signal(signal.SIGSTOP)
    try:
        kube_api.stop_apiserver()
        await asyncio.to_thread(kube_api.start_apiserver)
        async with kube_api.api_client() as api:
            await client.CoreV1Api(api).delete_namespaced_pod("gone", ns, grace_period_seconds=0)
        kube_api.compact_etcd()
        await asyncio.to_thread(kube_api.restart_apiserver)  # its watch cache starts after the compaction
    finally:
        ctl.proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: _gone_410(ipam), 30,
                   what="the pod deleted while the controller was frozen is released")
    assert await _held(ipam, "gone410", "keep/eth0")
    gone = ctl.metric("dsipam_controller_watch_restarts_total", kind="pods", reason="gone")
    relisted = ctl.metric("dsipam_controller_relists_total", kind="pods") - relists
    print(f"\n410 Gone on resume: {gone:.0f}x, relists {relisted:.0f}; the missed deletion was reconciled")
    assert gone >= 1 and relisted >= 1
    assert ctl.metric("dsipam_controller_watch_events_total", kind="pods", type="DELETED") == 0  # not an event
    assert ctl.metric("dsipam_controller_reconciles_total", kind="resync") == 1  # not the backstop
    async with kube_api.api_client() as api:
        await client.CoreV1Api(api).delete_namespace(ns)


async def _gone_410(ipam: AsyncIpamClient) -> bool:
    return not await _held(ipam, "gone410", "gone/eth0")


async def test_unreachable_dsipam_makes_the_leader_unready_and_resync_backs_off(
        kube_api: ApiServer, db_url: str, tmp_path: Path) -> None:
    """While the leader's resync fails because dsipam cannot be reached (or refuses its token),
    /readyz answers 503 with the reason; the resync is retried after 2 s, 4 s, ... (not only after
    --resync-interval), and readiness comes back once dsipam answers."""
    import signal as _signal
    import socket

    from support import spawn_server

    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = ControllerProcess(kubeconfig, f"127.0.0.1:{port}", tmp_path / "down.log", identity="down",
                            args=[*ha_args()[:6], "--resync-interval", "3600"], env={"DSIPAM_TIMEOUT": "1"})
    server = None
    try:
        await wait_for(ctl.is_leader, 30, what="leader")
        t0 = time.monotonic()
        await wait_for(lambda: _async(ctl.metric("dsipam_controller_errors_total", where="resync") >= 3), 30,
                       what="three resync failures (backoff, not the 3600 s interval)")
        assert time.monotonic() - t0 < 25
        status, body = ctl.get("/readyz")
        assert status == 503 and "resync failed: dsipam ServiceUnavailable" in body, (status, body)
        assert ctl.get("/healthz")[0] == 200  # a restart would not help: alive, not ready
        log = ctl.log()  # the traceback once, then one line per retry
        assert log.count("ERROR dsipam.kube resync failed:") >= 3, log
        assert "Traceback" not in log.split("ERROR dsipam.kube resync failed:", 2)[2], log
        server = spawn_server(db_url, tmp_path, port=port)
        await wait_for(lambda: _async(ctl.get("/readyz") == (200, "ok (leader)\n")), 40, what="ready again")
        assert "resync works again" in ctl.log()
    finally:
        ctl.terminate()
        if server is not None:
            server.proc.send_signal(_signal.SIGTERM)
            server.proc.wait(20)


async def _async(value: bool) -> bool:
    return value


async def test_lease_forbidden_is_one_line_then_counted(kube_api: ApiServer, target: str, tmp_path: Path) -> None:
    """A Lease namespace the Role does not cover: one ERROR line naming the cause and the flag (no
    HTTP headers), the repeats only counted; the same line again only when the error changes."""
    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    ctl = ControllerProcess(kubeconfig, target, tmp_path / "ns.log", identity="wrong-ns", args=ha_args(),
                            env={"DSIPAM_CONTROLLER_NAMESPACE": "default"})
    try:
        await wait_for(lambda: _async(ctl.metric("dsipam_controller_lease_failures_total") >= 5), 20,
                       what="repeated Lease failures")
        log = ctl.log()
        assert log.count("forbidden in namespace default (set --namespace") == 1, log
        assert "HTTP response headers" not in log and "Traceback" not in log, log
        assert ctl.get("/readyz")[0] == 200 and not ctl.is_leader()
    finally:
        ctl.terminate()


async def test_shutdown_does_not_hang_on_a_silent_api_server(start: Callable[..., ControllerProcess],
                                                             kube_api: ApiServer) -> None:
    """SIGTERM while the API server does not answer (stopped, not gone): the Lease release gives up
    after --release-timeout with one line, and the process exits."""
    import signal as _signal

    ctl = start("silent", *ha_args(), "--release-timeout", "1")
    await wait_for(ctl.is_leader, 30, what="leader")
    assert kube_api.apiserver is not None
    kube_api.apiserver.send_signal(_signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code = ctl.terminate(timeout=30)
        took = time.monotonic() - t0
    finally:
        kube_api.apiserver.send_signal(_signal.SIGCONT)
    ctl.outage_expected = True
    assert took < 10, (took, ctl.log()[-3000:])
    assert code == 0, ctl.log()[-3000:]
    assert ctl.log().count("not released: the API server did not answer within 1s") == 1, ctl.log()[-3000:]
    kube_api.wait_ready(30)
