"""dsipam's Kubernetes controller: declarative pools (IPPool), pod-leak and node reconciliation.

Run it as ``dsipam controller`` (docs/kubernetes.md). Nothing is imported here eagerly, so that
``dsipam --help`` (which adds the subcommand from ``dsipam.kube.cli``) stays light."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Controller": "_controller", "Settings": "_controller", "serve": "_controller",
    "Reconciler": "_reconcile", "POD_UID": "_reconcile",
    "GROUP": "_ippool", "VERSION": "_ippool", "PLURAL": "_ippool", "FINALIZER": "_ippool",
    "FORCE_DELETE": "_ippool", "MANAGED_LABEL": "_ippool", "MANAGED_VALUE": "_ippool",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
