"""The controller's Prometheus metrics, in a registry of their own."""

from __future__ import annotations


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.reconciles = Counter("dsipam_controller_reconciles_total", "Reconciles done, by what was reconciled",
                                  ["kind"], registry=r)
        self.errors = Counter("dsipam_controller_errors_total", "Reconciles or events that failed (logged at ERROR)",
                              ["where"], registry=r)
        self.leaks_released = Counter("dsipam_controller_leaks_released_total",
                                      "Allocations released because their pod is gone or finished", ["pool"],
                                      registry=r)
        self.nodes_released = Counter("dsipam_controller_nodes_released_total",
                                      "Deleted nodes whose allocations and blocks were released", registry=r)
        self.node_allocations_released = Counter("dsipam_controller_node_allocations_released_total",
                                                 "Allocations released because their node was deleted", ["pool"],
                                                 registry=r)
        self.node_blocks_released = Counter("dsipam_controller_node_blocks_released_total",
                                            "Blocks freed by ReleaseNode for deleted nodes", ["pool"], registry=r)
        self.resync_seconds = Histogram("dsipam_controller_resync_duration_seconds",
                                        "Time of one full resync (allocations, pods, nodes, releases)",
                                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.resync_allocations = Gauge("dsipam_controller_resync_allocations",
                                        "Allocations with a k8s.podUID seen by the last full resync", registry=r)
        self.resync_pods = Gauge("dsipam_controller_resync_pods", "Pods seen by the last full resync", registry=r)
        self.leader = Gauge("dsipam_controller_leader", "1 while this replica holds the Lease", registry=r)
        self.leader_transitions = Counter("dsipam_controller_leader_acquired_total",
                                          "Times this replica acquired the Lease", registry=r)
        self.lease_failures = Counter("dsipam_controller_lease_failures_total",
                                      "Lease reads/writes that failed (API server unreachable, ...); retried",
                                      registry=r)
        self.watch_restarts = Counter("dsipam_controller_watch_restarts_total",
                                      "Watches resumed or restarted, by kind and reason", ["kind", "reason"],
                                      registry=r)
        self.relists = Counter("dsipam_controller_relists_total", "Full lists made by the watches", ["kind"],
                               registry=r)
        self.bookmarks = Counter("dsipam_controller_watch_bookmarks_total", "Bookmark events received", ["kind"],
                                 registry=r)
        self.events = Counter("dsipam_controller_watch_events_total", "Watch events received", ["kind", "type"],
                              registry=r)
        self.pool_writes = Counter("dsipam_controller_pool_writes_total",
                                   "Writes to dsipam pools (create, update, add/remove range, delete)", ["op"],
                                   registry=r)
        self.conflicts = Counter("dsipam_controller_conflicts_total",
                                 "IPPool writes refused with 409 Conflict (the object changed): retried with its "
                                 "new version", registry=r)
        self.status_writes = Counter("dsipam_controller_status_writes_total", "IPPool status updates written",
                                     registry=r)
        self.service_addresses = Counter("dsipam_controller_service_addresses_total",
                                         "LoadBalancer Service addresses allocated and released", ["op"], registry=r)
        self.service_problems = Counter("dsipam_controller_service_problems_total",
                                        "LoadBalancer Service passes that met a problem (an Event and condition), "
                                        "by reason", ["reason"], registry=r)
        self.service_status_writes = Counter("dsipam_controller_service_status_writes_total",
                                             "Service status (ingress, condition) updates written", registry=r)
        self.services_waiting = Gauge("dsipam_controller_services_waiting",
                                      "LoadBalancer Services without (all) their addresses, retried", registry=r)
        self.services_queued = Gauge("dsipam_controller_services_queued", "Services waiting for a worker",
                                     registry=r)
