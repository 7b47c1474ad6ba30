"""Plugin hooks of the project "metering". Hooks are verb-first and off the per-event path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import typer

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

    :param register: call it once per provider. `name` is what configuration selects
        (`METERING_PROVIDER`); `factory(settings)` builds the provider from an instance of
        `settings_model` (a `ProviderSettings`), so import heavy SDKs inside the factory,
        not at module level; `capabilities`, when known without connecting, lets
        `metering providers` show them.

    When: once per process, the first time a provider is looked up or listed (and again
    after a plugin is registered or removed by hand), on the caller's thread.

    Errors: an exception raised here propagates to that lookup (`Metering(...)`,
    `metering providers`); a name registered twice raises `ConfigurationError` naming
    both plugins.
    """


@hookspec
def usage_delivered(provider: str, result: IngestResult) -> None:
    """Observe each delivered batch (metrics, audit logs).

    :param provider: the provider's registered name.
    :param result: what became of each event of the batch (accepted, duplicates, rejected
        with reasons), after retries and splitting. Do not modify it.

    When: once per batch, after the provider answered and (with a spool) after the outcome
    was committed, on the event loop's thread (the sync facade's shared loop thread, or
    your own loop with `AsyncMetering`): return quickly and do no blocking I/O.

    Errors: an exception raised here is logged with its traceback and otherwise ignored;
    the delivery report is kept and no event is retried or lost because of it.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add commands to the `metering` command line (as llm's plugins do).

    :param cli: the root Typer app: `cli.add_typer(group, name=...)` or `cli.command()(f)`.
        A library error (`MeteringError`) raised by a command is reported like any
        command's: one line, exit code 2 for bad input or configuration, 1 otherwise.

    When: once, when the command line is loaded (not by the library, the service or
    AWS handlers). Import what your commands need inside this hook, so a library user
    pays nothing for them.

    Errors: an exception raised here stops the command line from loading.
    """
