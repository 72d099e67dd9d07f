#!/usr/bin/env python3
"""Writes deploy/observability/dashboard.json, the Grafana dashboard of dsipam, from the panel
list below (one place for the queries, the layout and each panel's meaning).

    python scripts/gen_dashboard.py           # (re)write it
    python scripts/gen_dashboard.py --check   # exit 1 when the file is not what this script gives

Every query uses metrics that the server (server/dsipam/server/observability.py and the modules
it registers) or the controller (clients/kubernetes/dsipam/kube/_metrics.py) really exports:
tests/e2e/test_observability.py evaluates each one through a real Prometheus scraping a real
server and controller, and fails naming the panel whose query returns nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "deploy" / "observability" / "dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SRV = 'instance=~"$instance"'
POOL = 'pool=~"$pool", instance=~"$instance"'
CTL = 'instance=~"$controller"'
SERVER_SIDE_CODES = "INTERNAL|UNAVAILABLE|UNKNOWN|DEADLINE_EXCEEDED|ABORTED|DATA_LOSS"


def used_ratio(sel: str) -> str:
    """The share of a family that is not free (allocated, cooling down or reserved). Every replica
    exports the same pool gauges: max over them, not sum."""
    return (f'1 - max by (pool, family) (dsipam_pool_addresses{{state="free", {sel}}})\n'
            f'  / max by (pool, family) (sum without (state) (dsipam_pool_addresses{{{sel}}}))')


def quantiles(metric: str, sel: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99),
              legend: str = "") -> list[dict[str, str]]:
    extra = f", {by}" if by else ""
    return [{"expr": f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
             "legend": f"p{round(q * 100)}{legend}"} for q in qs]


# (title, type, width, height, unit, description, targets[, options]); a "row" entry starts a row.
PANELS: list[Any] = [
    ("row", "Pools"),
    ("Pool utilisation (now)", "gauge", 8, 8, "percentunit",
     "Share of each pool family that is not free: allocated, cooling down after a release, or reserved. "
     "At 100% Allocate calls that need the family fail with RESOURCE_EXHAUSTED (POOL_EXHAUSTED). "
     "The server refreshes these gauges every DSIPAM_METRICS_POOL_INTERVAL (15 s).",
     [{"expr": used_ratio(POOL), "legend": "{{pool}} {{family}}"}], {"gauge": True}),
    ("Pool utilisation over time", "timeseries", 8, 8, "percentunit",
     "The same share over time, per pool and family; the alerts DsipamPoolNearlyExhausted (90%) and "
     "DsipamPoolExhausted (100%) watch it.",
     [{"expr": used_ratio(POOL), "legend": "{{pool}} {{family}}"}], {"max": 1}),
    ("Free addresses and 4-hour forecast", "timeseries", 8, 8, "short",
     "Free addresses per pool family (log scale: IPv6 families are huge), and where a linear fit of the "
     "last hour puts them 4 hours from now (dashed). A forecast at or below 0 is what "
     "DsipamPoolExhaustionForecast alerts on (over 6 hours).",
     [{"expr": f'max by (pool, family) (dsipam_pool_addresses{{state="free", {POOL}}})',
       "legend": "{{pool}} {{family}} free"},
      {"expr": f'max by (pool, family) (predict_linear(dsipam_pool_addresses{{state="free", {POOL}}}[1h], 4 * 3600))',
       "legend": "{{pool}} {{family}} in 4 h (forecast)"}], {"log": True, "dashed": "forecast"}),
    ("Addresses in cooldown and reserved", "timeseries", 16, 8, "short",
     "Released addresses waiting for the pool's cooldown before they are handed out again, and addresses "
     "reserved with `dsipam pool reserve`. Neither can be allocated; a cooldown that stays high means "
     "heavy churn (or a long cooldown).",
     [{"expr": f'max by (pool, family, state) (dsipam_pool_addresses{{state=~"cooldown|reserved", {POOL}}})',
       "legend": "{{pool}} {{family}} {{state}}"}], {}),
    ("Pool gauges age", "stat", 8, 8, "s",
     "Seconds since each replica last refreshed the pool gauges above (DsipamPoolGaugesStale at 300 s).",
     [{"expr": f"time() - max by (instance) (dsipam_pool_gauges_timestamp_seconds{{{SRV}}})",
       "legend": "{{instance}}"}], {"thresholds": [60, 300]}),
    ("row", "Calls"),
    ("Allocations per second by result code", "timeseries", 8, 8, "reqps",
     "Allocate calls finished per second, by gRPC status code. OK is success (new or idempotent); "
     "RESOURCE_EXHAUSTED is a full pool family; INVALID_ARGUMENT, NOT_FOUND and PERMISSION_DENIED are the "
     "caller's; INTERNAL, UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED are the server's.",
     [{"expr": f'sum by (code) (rate(dsipam_rpc_requests_total{{method="Allocate", {SRV}}}[$__rate_interval]))',
       "legend": "{{code}}"}], {"stack": True}),
    ("Releases per second by result code", "timeseries", 8, 8, "reqps",
     "Release calls finished per second, by gRPC status code.",
     [{"expr": f'sum by (code) (rate(dsipam_rpc_requests_total{{method="Release", {SRV}}}[$__rate_interval]))',
       "legend": "{{code}}"}], {"stack": True}),
    ("Calls per second by method", "timeseries", 8, 8, "reqps",
     "Every IpamService call finished per second, by method (all status codes).",
     [{"expr": f"sum by (method) (rate(dsipam_rpc_requests_total{{{SRV}}}[$__rate_interval]))",
       "legend": "{{method}}"}], {}),
    ("Allocate latency", "timeseries", 8, 8, "s",
     "Percentiles of the Allocate latency measured in the server (from the request's arrival to its "
     "answer), from the dsipam_rpc_duration_seconds histogram.",
     [{"expr": q["expr"], "legend": q["legend"]}
      for q in quantiles("dsipam_rpc_duration_seconds", f'method="Allocate", {SRV}')], {}),
    ("Release latency", "timeseries", 8, 8, "s",
     "Percentiles of the Release latency measured in the server.",
     [{"expr": q["expr"], "legend": q["legend"]}
      for q in quantiles("dsipam_rpc_duration_seconds", f'method="Release", {SRV}')], {}),
    ("Latency SLO and server-side errors", "timeseries", 8, 8, "percentunit",
     "Share of Allocate and Release calls answered within 250 ms (the SLO of the alerts "
     "DsipamLatencySLOBurnFast/Slow is 99%), and share that failed on the server's side "
     "(INTERNAL, UNAVAILABLE, UNKNOWN, DEADLINE_EXCEEDED, ABORTED, DATA_LOSS: DsipamAllocationErrors at 1%).",
     [{"expr": (f'sum(rate(dsipam_rpc_duration_seconds_bucket{{method=~"Allocate|Release", le="0.25", {SRV}}}'
                f"[$__rate_interval]))\n  / sum(rate(dsipam_rpc_duration_seconds_count"
                f'{{method=~"Allocate|Release", {SRV}}}[$__rate_interval]))'),
       "legend": "within 250 ms"},
      {"expr": (f'(sum by (method) (rate(dsipam_rpc_requests_total{{method=~"Allocate|Release", '
                f'code=~"{SERVER_SIDE_CODES}", {SRV}}}[$__rate_interval]))\n'
                f'  or 0 * sum by (method) (rate(dsipam_rpc_requests_total{{method=~"Allocate|Release", {SRV}}}'
                f"[$__rate_interval])))\n"
                f'  / sum by (method) (rate(dsipam_rpc_requests_total{{method=~"Allocate|Release", {SRV}}}'
                f"[$__rate_interval]))"),
       "legend": "{{method}} server-side errors"}], {"max": 1}),
    ("row", "Fast path (batched Allocate and Release)"),
    ("Fast-path batch size", "timeseries", 8, 8, "short",
     "Requests per fast-path batch: one database statement and one commit serve a whole batch. "
     "About 1 at low load; it grows with concurrency (up to 64). Mean and 99th percentile, by kind.",
     [{"expr": (f"sum by (kind) (rate(dsipam_fast_path_batch_size_sum{{{SRV}}}[$__rate_interval]))\n"
                f"  / sum by (kind) (rate(dsipam_fast_path_batch_size_count{{{SRV}}}[$__rate_interval]))"),
       "legend": "{{kind}} mean"},
      *quantiles("dsipam_fast_path_batch_size", SRV, "kind", (0.99,), " {{kind}}")], {}),
    ("Fast-path errors and lock retries", "timeseries", 8, 8, "short",
     "Batches that failed with an unexpected exception (a bug: their calls were answered by the full "
     "path; DsipamFastPathErrors) and batches rolled back as the loser of a deadlock or serialization "
     "failure (a few under contention are normal), per interval.",
     [{"expr": f"sum by (kind) (increase(dsipam_fast_path_errors_total{{{SRV}}}[$__rate_interval]))",
       "legend": "errors {{kind}}"},
      {"expr": f"sum by (kind, sqlstate) (increase(dsipam_fast_path_lock_retries_total{{{SRV}}}[$__rate_interval]))",
       "legend": "lock retries {{kind}} {{sqlstate}}"}], {}),
    ("Background errors", "timeseries", 8, 8, "short",
     "Unexpected exceptions in background work (spare-block top-up, maintenance, pool gauges, database "
     "ping, watch listener), per interval, by task. Each was logged at ERROR with its traceback; any is "
     "a bug to report (DsipamBackgroundErrors).",
     [{"expr": f"sum by (task) (increase(dsipam_background_errors_total{{{SRV}}}[$__rate_interval]))",
       "legend": "{{task}}"}], {}),
    ("row", "Database"),
    ("Database pool saturation", "timeseries", 8, 8, "percentunit",
     "Connections of the SQLAlchemy pool checked out, as a share of its size (DSIPAM_DB_POOL_SIZE); above "
     "100% the overflow (DSIPAM_DB_MAX_OVERFLOW) is in use. DsipamDatabasePoolSaturated fires above 90%.",
     [{"expr": f"max by (instance) (dsipam_db_pool_in_use{{{SRV}}} / dsipam_db_pool_size{{{SRV}}})",
       "legend": "{{instance}}"}], {}),
    ("Database pool wait", "timeseries", 8, 8, "s",
     "Time to get a connection from the pool (p50, p99 per replica): waits mean the pool is too small "
     "for the load, or connections are held long.",
     quantiles("dsipam_db_pool_wait_seconds", SRV, "instance", (0.5, 0.99), " {{instance}}"), {}),
    ("Database call latency (fast path)", "timeseries", 8, 8, "s",
     "Time of a fast-path batch's database call, the wait for a pooled connection included (one "
     "statement, one transaction; p50 and p99 by kind). Most Allocate and Release calls take this path.",
     quantiles("dsipam_fast_path_batch_duration_seconds", SRV, "kind", (0.5, 0.99), " {{kind}}"), {}),
    ("Database reachable", "stat", 8, 6, "none",
     "1 when the replica's last database ping (every DSIPAM_DB_HEALTH_INTERVAL, 3 s) succeeded. At 0 its "
     "health is NOT_SERVING and it is taken out of the Service (DsipamDatabaseUnavailable, "
     "DsipamReplicaNotReady).",
     [{"expr": f"min by (instance) (dsipam_db_up{{{SRV}}})", "legend": "{{instance}}"}], {"updown": True}),
    ("Lock retries", "timeseries", 16, 6, "short",
     "Full-path transactions run again after a deadlock (40P01) or serialization failure (40001), per "
     "interval. Contention: more callers than blocks with room, or DDL.",
     [{"expr": f"sum by (sqlstate) (increase(dsipam_db_lock_retries_total{{{SRV}}}[$__rate_interval]))",
       "legend": "{{sqlstate}}"}], {}),
    ("row", "Watch streams"),
    ("Watch streams", "timeseries", 12, 8, "short",
     "Open WatchAllocations streams per replica (bounded by DSIPAM_MAX_WATCH_STREAMS, 1000).",
     [{"expr": f"sum by (instance) (dsipam_watch_streams{{{SRV}}})", "legend": "{{instance}}"}], {}),
    ("Watch overflows and listener failures", "timeseries", 12, 8, "short",
     "Streams that fell behind by more than DSIPAM_WATCH_BUFFER events and caught up on their own, and "
     "times the replica's LISTEN connection failed and was opened again, per interval.",
     [{"expr": f"sum by (instance) (increase(dsipam_watch_overflows_total{{{SRV}}}[$__rate_interval]))",
       "legend": "overflows {{instance}}"},
      {"expr": f"sum by (instance) (increase(dsipam_watch_listener_failures_total{{{SRV}}}[$__rate_interval]))",
       "legend": "listener failures {{instance}}"}], {}),
    ("row", "Kubernetes controller"),
    ("Controller leader", "stat", 6, 8, "none",
     "1 on the replica that holds the Lease and reconciles; the others wait (DsipamControllerNoLeader "
     "when none leads).",
     [{"expr": f"max by (instance) (dsipam_controller_leader{{{CTL}}})", "legend": "{{instance}}"}],
     {"leader": True}),
    ("Reconciles per second by kind", "timeseries", 9, 8, "ops",
     "Reconciles done by the leader: resync (the full pod-leak and node sweep), pod (a gone pod's "
     "allocations released), node, ippool, service (a LoadBalancer Service pass), service-resync.",
     [{"expr": f"sum by (kind) (rate(dsipam_controller_reconciles_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{kind}}"}], {}),
    ("Controller errors by where", "timeseries", 9, 8, "short",
     "Reconciles and events that failed (each logged at ERROR), per interval: resync (the leak resync, "
     "retried with backoff; DsipamControllerResyncFailing), release-pod, release-node, ippool, "
     "service, service-resync, service-event, service-pool-watch, <kind>-event.",
     [{"expr": f"sum by (instance, where) (increase(dsipam_controller_errors_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{where}} {{instance}}"}], {}),
    ("Resync duration", "timeseries", 8, 8, "s",
     "Mean time of one full resync over the last 15 minutes (listing allocations, pods and nodes, and "
     "the releases it starts).",
     [{"expr": (f"sum by (instance) (increase(dsipam_controller_resync_duration_seconds_sum{{{CTL}}}[15m]))\n"
                f"  / sum by (instance) (increase(dsipam_controller_resync_duration_seconds_count{{{CTL}}}[15m]))"),
       "legend": "{{instance}}"}], {}),
    ("Last resync: pods and allocations", "timeseries", 8, 8, "short",
     "What the last full resync saw: pods, and allocations that carry a k8s.podUID.",
     [{"expr": f"max by (instance) (dsipam_controller_resync_pods{{{CTL}}})", "legend": "pods {{instance}}"},
      {"expr": f"max by (instance) (dsipam_controller_resync_allocations{{{CTL}}})",
       "legend": "allocations {{instance}}"}], {}),
    ("Leaks released", "timeseries", 8, 8, "short",
     "Allocations released because their pod is gone or finished (after --grace), per interval and pool.",
     [{"expr": f"sum by (pool) (increase(dsipam_controller_leaks_released_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{pool}}"}], {}),
    ("Watch events by kind", "timeseries", 8, 8, "ops",
     "Events of the controller's watches (pods, nodes, ippools, services, namespaces) per second, by "
     "kind and type.",
     [{"expr": f"sum by (kind, type) (rate(dsipam_controller_watch_events_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{kind}} {{type}}"}], {}),
    ("Lease failures and leadership changes", "timeseries", 8, 8, "short",
     "Lease reads and writes that failed (the API server unreachable ...; retried), and times a replica "
     "took the Lease, per interval.",
     [{"expr": f"sum by (instance) (increase(dsipam_controller_lease_failures_total{{{CTL}}}[$__rate_interval]))",
       "legend": "Lease failures {{instance}}"},
      {"expr": f"sum by (instance) (increase(dsipam_controller_leader_acquired_total{{{CTL}}}[$__rate_interval]))",
       "legend": "took the Lease {{instance}}"}], {}),
    ("Watch relists", "timeseries", 8, 8, "short",
     "Full lists made by the controller's watches, per interval: one per watch at start, more when a "
     "resourceVersion expired or a resume kept failing (dsipam_controller_watch_restarts_total{reason} "
     "counts those restarts; it has no series before the first).",
     [{"expr": f"sum by (kind) (increase(dsipam_controller_relists_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{kind}}"}], {}),
    ("LoadBalancer Services", "timeseries", 12, 8, "short",
     "Services of dsipam's loadBalancerClass that lack some of their addresses (a problem such as "
     "PoolExhausted or PoolNotFound, or a secondary family pending; retried, "
     "DsipamLoadBalancerServicesWaiting), and the addresses the leader allocated and released for "
     "Services per interval.",
     [{"expr": f"max by (instance) (dsipam_controller_services_waiting{{{CTL}}})", "legend": "waiting {{instance}}"},
      {"expr": f"sum by (op) (increase(dsipam_controller_service_addresses_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{op}}"}], {}),
    ("LoadBalancer problems by reason", "timeseries", 12, 8, "short",
     "Service passes that met a problem, per interval, by the reason its Event and condition carry "
     "(PoolNotFound, PoolExhausted, AddressInUse, InvalidAnnotation, ...; docs/kubernetes.md); a waiting "
     "Service is retried after 1 s doubling to 30 s, so one stuck Service counts a few times a minute. "
     "No series before the first.",
     [{"expr": f"sum by (reason) (increase(dsipam_controller_service_problems_total{{{CTL}}}[$__rate_interval]))",
       "legend": "{{reason}}"}], {}),
]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "regex": "", "options": [],
    }


def _field_config(unit: str, options: dict[str, Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if options.get("gauge"):
        steps += [{"color": "orange", "value": 0.8}, {"color": "red", "value": 0.9}]
    for i, value in enumerate(options.get("thresholds", ())):
        steps.append({"color": ("orange", "red")[min(i, 1)], "value": value})
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                                "color": {"mode": "thresholds" if options.get("gauge") else "palette-classic"}}
    if options.get("gauge"):
        defaults.update(min=0, max=1, decimals=1)
    if "max" in options:
        defaults.update(min=0, max=options["max"])
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": False}
    if options.get("stack"):
        custom["stacking"] = {"mode": "normal", "group": "A"}
    if options.get("log"):
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    overrides: list[dict[str, Any]] = []
    if options.get("dashed"):
        overrides.append({"matcher": {"id": "byRegexp", "options": f".*{options['dashed']}.*"},
                          "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]})
    if options.get("updown"):
        defaults["mappings"] = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                              "1": {"text": "up", "color": "green"}}}]
    if options.get("leader"):
        defaults["mappings"] = [{"type": "value", "options": {"0": {"text": "standby", "color": "blue"},
                                                              "1": {"text": "leader", "color": "green"}}}]
    out: dict[str, Any] = {"defaults": defaults, "overrides": overrides}
    if custom and not options.get("gauge"):
        out["defaults"]["custom"] = custom
    return out


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = row_height = 0
    next_id = 1
    for entry in PANELS:
        if entry[0] == "row":
            if x:
                y += row_height
            x, row_height = 0, 0
            panels.append({"id": next_id, "type": "row", "title": entry[1], "collapsed": False,
                           "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
            next_id += 1
            y += 1
            continue
        title, kind, w, h, unit, description, targets, options = entry
        if x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        panel: dict[str, Any] = {
            "id": next_id, "type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": t["expr"],
                         "legendFormat": t["legend"], "range": True, "instant": False, "editorMode": "code"}
                        for i, t in enumerate(targets)],
            "fieldConfig": _field_config(unit, options),
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "gauge":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "showThresholdLabels": False, "showThresholdMarkers": True}
        elif kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "none", "textMode": "value_and_name"}
        panels.append(panel)
        next_id += 1
        x += w
        row_height = max(row_height, h)
    return {
        "title": "dsipam",
        "uid": "dsipam-overview",
        "description": "dsipam: pool use, calls, the fast path, the database, watch streams and the Kubernetes "
                       "controller. Panels and alerts are described in docs/operations.md, 'Dashboards and alerts'.",
        "tags": ["dsipam", "ipam"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
             "regex": ""},
            _variable("instance", "Server replica", "label_values(dsipam_db_up, instance)"),
            _variable("pool", "Pool", 'label_values(dsipam_pool_addresses{instance=~"$instance"}, pool)'),
            _variable("controller", "Controller replica", "label_values(dsipam_controller_leader, instance)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the file is up to date")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(TARGET.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
