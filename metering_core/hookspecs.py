"""Plugin hooks of the project "metering". Hooks are verb-first and off the per-event path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from metering_core.config import ProviderSettings
    from metering_core.interface import Capabilities, IMetering
    from metering_core.models import IngestResult

hookspec = pluggy.HookspecMarker("metering")
hookimpl = pluggy.HookimplMarker("metering")

ProviderFactory = Callable[[Any], "IMetering"]
"""Builds a provider from an instance of its settings model."""


class RegisterProvider(Protocol):
    """The `register` callable handed to `register_providers`."""

    def __call__(
        self,
        name: str,
        factory: ProviderFactory,
        settings_model: type[ProviderSettings],
        *,
        capabilities: Capabilities | None = None,
    ) -> None: ...


@hookspec
def register_providers(register: RegisterProvider) -> None:
    """Register providers with `register(name, factory, settings_model, capabilities=None)`.

    `capabilities`, when known without connecting, lets `metering providers` show them.
    """


@hookspec
def usage_delivered(provider: str, result: IngestResult) -> None:
    """Called once after each batch the pipeline delivered (observability)."""
