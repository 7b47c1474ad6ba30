"""The `metering` Typer app, the options every command shares, and error reporting."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from metering_core.client import Metering
from metering_core.errors import ConfigurationError, MeteringError, ValidationError

__all__ = [
    "Options",
    "app",
    "connect",
    "customers_app",
    "err",
    "meters_app",
    "out",
    "print_json",
    "reported",
]

app = typer.Typer(help="Usage metering on whichever provider is configured.", no_args_is_help=True)
meters_app = typer.Typer(help="Create, list, show, update and delete meters.", no_args_is_help=True)
customers_app = typer.Typer(help="Register and remove customers (tenants).", no_args_is_help=True)
app.add_typer(meters_app, name="meters")
app.add_typer(customers_app, name="customers")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class Options:
    """Options every command shares, set by the top-level callback."""

    provider: str | None = None
    config: Path | None = None
    debug: bool = False


@app.callback()
def _global(
    provider: Annotated[
        str | None, typer.Option(help="Provider name (else configuration).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Config file (metering.toml or pyproject.toml).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    Options.provider, Options.config, Options.debug = provider, config, debug


def reported(command: F) -> F:
    """Turn library errors into one line and the documented exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValidationError, ConfigurationError) as exc:
            _fail(exc, 2)
        except MeteringError as exc:
            _fail(exc, 1)

    return run  # type: ignore[return-value]


def _fail(exc: Exception, code: int) -> None:
    if Options.debug:
        err.print_exception()
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    typer.echo(f"error: {message}", err=True)  # one line, whatever the provider SDK wrote
    raise typer.Exit(code)


def connect(**options: Any) -> Metering:
    return Metering(Options.provider, config_file=Options.config, **options)


def print_json(model: Any) -> None:
    out.print_json(model.model_dump_json())
