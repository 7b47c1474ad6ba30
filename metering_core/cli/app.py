"""The `metering` Typer app, the options every command shares, and error reporting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic_settings import SettingsError
from rich.console import Console
from typer.core import TyperGroup

from metering_core.client import Metering
from metering_core.errors import ConfigurationError, MeteringError, ValidationError

__all__ = [
    "Options",
    "app",
    "connect",
    "customers_app",
    "err",
    "meters_app",
    "options",
    "out",
    "print_json",
]


class _Reporting(TyperGroup):
    """Library errors, from any command (a plugin's too), as one line and the documented
    exit code: 2 for bad input or configuration, 1 for a failed operation."""

    def invoke(self, ctx: Any) -> Any:  # typer's click.Context (typer vendors click)
        try:
            return super().invoke(ctx)
        except (ValidationError, ConfigurationError) as exc:
            _fail(ctx, exc, 2)
        except SettingsError as exc:  # a setting pydantic-settings could not even parse
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            _fail(ctx, ConfigurationError(f"{exc}{cause}"), 2)
        except MeteringError as exc:
            _fail(ctx, exc, 1)


app = typer.Typer(
    cls=_Reporting,
    help="Usage metering on whichever provider is configured.",
    no_args_is_help=True,
)
meters_app = typer.Typer(help="Create, list, show, update and delete meters.", no_args_is_help=True)
customers_app = typer.Typer(help="Register and remove customers (tenants).", no_args_is_help=True)
app.add_typer(meters_app, name="meters")
app.add_typer(customers_app, name="customers")

# Neither markup nor emoji codes: what is printed holds the caller's ids and names, and
# "[red]acme[/red]" read as markup showed "acme", "[/x]" failed the command with a
# MarkupError (probe), and an id "e:thumbs_up:2" showed "e👍2", not what `cancel` takes.
out = Console(markup=False, emoji=False)
err = Console(stderr=True, markup=False, emoji=False)


@dataclass(frozen=True)
class Options:
    """Options every command shares, given to the top-level command; kept per invocation
    in the click context (`ctx.obj`), which every subcommand's context inherits."""

    provider: str | None = None
    config: Path | None = None
    debug: bool = False


def options(ctx: typer.Context) -> Options:
    """This invocation's shared options."""
    found = ctx.find_object(Options)
    return found if found is not None else Options()


@app.callback()
def _global(
    ctx: typer.Context,
    provider: Annotated[
        str | None, typer.Option(help="Provider name (else configuration).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Config file (metering.toml or pyproject.toml).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    ctx.obj = Options(provider, config, debug)


def _fail(ctx: typer.Context, exc: Exception, code: int) -> None:
    found = ctx.find_object(Options)
    if found is not None and found.debug:
        err.print_exception()
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    typer.echo(f"error: {message}", err=True)  # one line, whatever the provider SDK wrote
    raise typer.Exit(code)


def connect(ctx: typer.Context, **settings: Any) -> Metering:
    """The facade this invocation's options select. It forwards to no mirror: a command
    ends with its work, which would cut a pass short (`metering serve` and `metering
    mirror run` forward)."""
    shared = options(ctx)
    return Metering(shared.provider, config_file=shared.config, mirror_forwarder=False, **settings)


def print_json(model: Any) -> None:
    out.print_json(model.model_dump_json())
