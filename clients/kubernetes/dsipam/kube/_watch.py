"""List+watch that survives: resourceVersion, bookmarks, a fresh list after 410 Gone or a failed resume.

Objects are kept as the API server's JSON (dicts): 10,000 pods parse in well under a second that
way, where the generated model classes take several.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import watch
from kubernetes_asyncio.client.rest import ApiException

from ._metrics import Metrics

log = logging.getLogger("dsipam.kube")

ListFn = Callable[..., Awaitable[Any]]
Handler = Callable[[str, dict], Awaitable[None] | None]

PAGE = 500


async def read_json(resp: Any) -> dict:
    """The body of a response asked for with ``_preload_content=False``; a failed call (403, 500, ...)
    raises the ApiException that the client raises in the other mode (it does not in this one: the
    Status object was read as a list, and a refused list was reported as a KeyError)."""
    try:
        data = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status < 300:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = data.decode(errors="replace")[:2000]
        raise exc
    return json.loads(data)


Slim = Callable[[dict], dict]

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
"""On a static pod's mirror pod: the UID the kubelet runs the static pod under (K8S_POD_UID)."""


def slim_pod(pod: dict) -> dict:
    """What the controller needs of a pod: 10,000 full pods would take ~100 MiB of dicts."""
    meta = pod.get("metadata") or {}
    slim = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "deletionTimestamp") if k in meta}
    mirror = (meta.get("annotations") or {}).get(MIRROR_ANNOTATION)
    if mirror:  # a static pod's mirror: the kubelet (and so the CNI plugin) knows it by this UID
        slim["annotations"] = {MIRROR_ANNOTATION: mirror}
    return {"metadata": slim,
            "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
            "status": {"phase": (pod.get("status") or {}).get("phase")}}


def slim_meta(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta}}


async def list_all(list_fn: ListFn, *args: Any, page: int = PAGE, slim: Slim | None = None,
                   **kwargs: Any) -> tuple[list[dict], str]:
    """Every object (paged with limit/continue; ``slim`` applied to each) and the list's resourceVersion."""
    items: list[dict] = []
    cont: str | None = None
    while True:
        extra = {"_continue": cont} if cont else {}
        body = await read_json(await list_fn(*args, limit=page, _preload_content=False, **kwargs, **extra))
        got = body.get("items") or ()
        items.extend(map(slim, got) if slim is not None else got)
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return items, body["metadata"]["resourceVersion"]


class _RawWatch(watch.Watch):
    """A Watch whose events carry the raw JSON object (no model classes)."""

    def get_return_type(self, func: object) -> str:
        return ""


class Informer:
    """Keeps ``cache`` (name or namespace/name -> object) of one kind in step with the API server
    and calls ``handler(event_type, obj)`` for every change (ADDED, MODIFIED, DELETED; after a
    relist, objects that vanished meanwhile arrive as DELETED).

    The watch starts from the list's resourceVersion with ``allowWatchBookmarks``; bookmarks and
    events move the resourceVersion on. A watch that ends (server timeout, dropped connection,
    API server restart) is resumed from the last resourceVersion; 410 Gone (the version was
    compacted away) or any failed resume starts over with a fresh list."""

    def __init__(self, kind: str, list_fn: ListFn, handler: Handler | None, metrics: Metrics,
                 *, watch_timeout: int = 300, backoff: float = 1.0, slim: Slim | None = None) -> None:
        self.kind = kind
        self.slim = slim
        self.list_fn = list_fn
        self.handler = handler
        self.metrics = metrics
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.cache: dict[str, dict] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()

    @staticmethod
    def key(obj: dict) -> str:
        meta = obj["metadata"]
        ns = meta.get("namespace")
        return f"{ns}/{meta['name']}" if ns else meta["name"]

    async def _emit(self, kind: str, obj: dict) -> None:
        if self.handler is None:
            return
        try:
            result = self.handler(kind, obj)
            if result is not None:
                await result
        except Exception:  # noqa: BLE001 - one bad event must not stop the watch; counted and logged
            self.metrics.errors.labels(where=f"{self.kind}-event").inc()
            log.exception("%s %s event for %s failed", self.kind, kind, self.key(obj))

    async def relist(self) -> None:
        items, rv = await list_all(self.list_fn, slim=self.slim)
        fresh = {self.key(o): o for o in items}
        gone = [o for k, o in self.cache.items() if k not in fresh]
        old = self.cache
        self.cache = fresh
        self.resource_version = rv
        self.metrics.relists.labels(kind=self.kind).inc()
        for obj in gone:
            await self._emit("DELETED", obj)
        for k, obj in fresh.items():
            prev = old.get(k)
            if prev is None:
                await self._emit("ADDED", obj)
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                await self._emit("MODIFIED", obj)
        self.synced.set()

    async def run(self) -> None:
        need_list = True
        failures = 0
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                await self._watch_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                failures += 1
                if exc.status == 410:
                    log.info("%s watch: resourceVersion %s is gone (410): listing again", self.kind,
                             self.resource_version)
                    self.metrics.watch_restarts.labels(kind=self.kind, reason="gone").inc()
                    need_list = True
                    continue
                self.metrics.watch_restarts.labels(kind=self.kind, reason="error").inc()
                log.error("%s watch failed (%s %s); resuming in %.1fs", self.kind, exc.status, exc.reason,
                          self._delay(failures))
                await asyncio.sleep(self._delay(failures))
            except Exception as exc:  # noqa: BLE001 - connection refused/reset while the API server restarts
                failures += 1
                self.metrics.watch_restarts.labels(kind=self.kind, reason="disconnected").inc()
                log.error("%s watch cut (%s: %s); resuming from resourceVersion %s in %.1fs", self.kind,
                          type(exc).__name__, exc, self.resource_version, self._delay(failures))
                await asyncio.sleep(self._delay(failures))
                if failures >= 5:
                    need_list = True  # a resume that keeps failing: start over with a fresh list

    def _delay(self, failures: int) -> float:
        return min(self.backoff * (2 ** min(failures - 1, 4)), 15.0)

    async def _watch_once(self) -> None:
        w = _RawWatch()
        try:
            stream = w.stream(self.list_fn, resource_version=self.resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout,
                              _request_timeout=self.watch_timeout + 30)
            async for event in stream:
                kind = event["type"]
                obj = event["raw_object"]
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind != "BOOKMARK" and self.slim is not None:
                    obj = self.slim(obj)
                if kind == "BOOKMARK":
                    self.metrics.bookmarks.labels(kind=self.kind).inc()
                    if rv:
                        self.resource_version = rv
                    continue
                key = self.key(obj)
                if kind == "DELETED":
                    self.cache.pop(key, None)
                else:
                    self.cache[key] = obj
                if rv:
                    self.resource_version = rv
                self.metrics.events.labels(kind=self.kind, type=kind).inc()
                await self._emit(kind, obj)
        finally:
            await w.close()
