"""The plugin manager: built-in plugins, entry-point plugins, and the provider registry.

Providers register through the `register_providers` hook, the built-in memory provider
included. Entry points in the group `metering` load on first use unless
`METERING_DISABLE_PLUGIN_AUTOLOAD=1`.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import pluggy

from metering_core import hookspecs
from metering_core.config import ProviderSettings
from metering_core.errors import ConfigurationError, ProviderNotFoundError
from metering_core.hookspecs import ProviderFactory
from metering_core.interface import Capabilities

__all__ = ["ProviderSpec", "get_provider", "plugin_manager", "providers", "register_plugin"]

BUILTIN_PLUGINS = ("metering_core.memory", "metering_core.sql")

_pm = pluggy.PluginManager("metering")
_pm.add_hookspecs(hookspecs)
_load_lock = threading.Lock()
_loaded = False


@dataclass(frozen=True)
class ProviderSpec:
    """A registered provider: how to build it and what it can do (when known up front)."""

    name: str
    factory: ProviderFactory
    settings_model: type[ProviderSettings]
    capabilities: Capabilities | None
    plugin: str


def _autoload_disabled() -> bool:
    return os.environ.get("METERING_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() in {
        "1",
        "true",
        "yes",
    }


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading built-in and entry-point plugins once."""
    global _loaded
    if not _loaded:
        with _load_lock:
            if not _loaded:
                for name in BUILTIN_PLUGINS:
                    if _pm.get_plugin(name) is None:
                        _pm.register(importlib.import_module(name), name=name)
                if not _autoload_disabled():
                    _pm.load_setuptools_entrypoints("metering")
                _loaded = True
    return _pm


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin by hand (tests, or an app that ships its own provider)."""
    plugin_manager().register(plugin, name=name)
    _forget_registry()


def unregister_plugin(plugin: ModuleType | object) -> None:
    """Remove a plugin registered by hand."""
    plugin_manager().unregister(plugin)
    _forget_registry()


_registry: dict[str, ProviderSpec] | None = None


def _forget_registry() -> None:
    global _registry
    _registry = None


def _collect() -> dict[str, ProviderSpec]:
    """The providers registered by every plugin, collected once and kept until a plugin is
    registered or removed. Plugins register factories: building one is what imports a
    provider's SDK, so collecting costs no SDK import."""
    global _registry
    if _registry is None:
        _registry = _gather()
    return _registry


def _gather() -> dict[str, ProviderSpec]:
    pm = plugin_manager()
    specs: dict[str, ProviderSpec] = {}
    for impl in pm.hook.register_providers.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(
            name: str,
            factory: ProviderFactory,
            settings_model: type[ProviderSettings],
            *,
            capabilities: Capabilities | None = None,
            _plugin: str = plugin_name,
        ) -> None:
            if name in specs:
                first = specs[name].plugin
                raise ConfigurationError(
                    f"provider {name!r} is registered twice: by {first!r} and by {_plugin!r}"
                )
            specs[name] = ProviderSpec(name, factory, settings_model, capabilities, _plugin)

        impl.function(register=register)
    return specs


def providers() -> list[ProviderSpec]:
    """The installed providers, by name."""
    return sorted(_collect().values(), key=lambda spec: spec.name)


def get_provider(name: str) -> ProviderSpec:
    """The provider registered as `name`, or `ProviderNotFoundError` listing the installed ones."""
    specs = _collect()
    if name not in specs:
        raise ProviderNotFoundError(name, list(specs))
    return specs[name]
