"""dsipam's Kubernetes controller: declarative pools (IPPool), pod-leak and node reconciliation.

Run it as ``dsipam controller`` (docs/kubernetes.md)."""

from ._controller import Controller, Settings, serve
from ._ippool import FINALIZER, FORCE_DELETE, GROUP, MANAGED_LABEL, MANAGED_VALUE, PLURAL, VERSION
from ._reconcile import POD_UID, Reconciler

__all__ = ["Controller", "Settings", "serve", "Reconciler", "POD_UID", "GROUP", "VERSION", "PLURAL", "FINALIZER",
           "FORCE_DELETE", "MANAGED_LABEL", "MANAGED_VALUE"]
