"""dsipam's CNI IPAM plugin (``dsipam-cni``, found on CNI_PATH as ``dsipam``).

The plugin runs once per pod and network, so importing this package does nothing: the names
below are loaded on first use. The modules a plugin run loads use only builtins and C modules
of the standard library (not even ``from __future__ import annotations``, ~0.1 ms); see
docs/cni.md, "Start-up".
"""

_EXPORTS = {
    "run": "._plugin",
    "build_result": "._plugin",
    "CniError": "._errors",
    "IpamConfig": "._config",
    "parse_config": ("._config", "parse"),
    "SUPPORTED_VERSIONS": "._config",
    "NativeClient": "._client",
    "RpcError": "._h2",
    "install": "._install",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    spec = _EXPORTS.get(name)
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = (spec, name) if isinstance(spec, str) else spec
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), attr)
    globals()[name] = value
    return value
