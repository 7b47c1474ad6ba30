"""`metering aws bundle DIR`: the Lambda function's code, built for the Lambda runtime.

Lambda runs Linux on x86_64 or arm64 with its own Python; the wheels this machine would
install (macOS, another Python) do not load there. The bundle is pip's own install into a
folder, asked for that platform and Python and for wheels only (nothing compiled here),
of `metering-core[aws]` and the provider's distribution. `--source` installs this
project's own checkouts instead of the index's releases (each built into a wheel first,
since a wheel is what a platform-bound install takes)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from metering_core.cli.app import app
from metering_core.errors import ConfigurationError

__all__ = ["aws_app", "bundle_commands"]

aws_app = typer.Typer(help="Deploying on AWS Lambda (sbt-aws).", no_args_is_help=True)
app.add_typer(aws_app, name="aws")


class Architecture(StrEnum):
    x86_64 = "x86_64"
    arm64 = "arm64"


PLATFORMS = {
    Architecture.x86_64: "manylinux2014_x86_64",
    Architecture.arm64: "manylinux2014_aarch64",
}
DISTRIBUTIONS: dict[str, list[tuple[str, str]]] = {
    # (distribution, extras); PostgreSQL for sql: under Lambda, SQLite is refused
    "sql": [("metering-core", "[aws,postgres]")],
    "stripe": [("metering-core", "[aws]"), ("metering-stripe", "")],
    "http": [("metering-core", "[aws]"), ("metering-http", "")],
}


def _distribution(wheel: Path) -> str:
    """A wheel's distribution name, as the index spells it (`metering_core-0.1-…` ->
    `metering-core`)."""
    return wheel.name.split("-", 1)[0].replace("_", "-").lower()


def bundle_commands(
    target: Path,
    provider: str,
    python: str,
    architecture: Architecture,
    wheels: list[Path],
) -> list[str]:
    """The pip install that builds the bundle: for Lambda's platform and Python, wheels
    only; a distribution built from `--source` (in `wheels`) is installed from its wheel,
    with the same extras, in place of the index's release."""
    if provider not in DISTRIBUTIONS:
        raise ConfigurationError(
            f"provider={provider!r}: bundles are for {', '.join(sorted(DISTRIBUTIONS))}"
        )
    local = {_distribution(wheel): wheel for wheel in wheels}
    wanted = [f"{local.get(name, name)}{extras}" for name, extras in DISTRIBUTIONS[provider]]
    wanted += [
        str(wheel) for name, wheel in local.items() if name not in dict(DISTRIBUTIONS[provider])
    ]
    return [
        sys.executable, "-m", "pip", "install",
        "--target", str(target),
        "--platform", PLATFORMS[architecture],
        "--implementation", "cp",
        "--python-version", python,
        "--only-binary=:all:",
        "--upgrade",
        *wanted,
    ]  # fmt: skip


def _wheels(sources: list[Path], into: Path) -> list[Path]:
    """A wheel of each local project (pure Python: any platform takes it)."""
    for source in sources:
        if not (source / "pyproject.toml").is_file():
            raise ConfigurationError(f"--source {str(source)!r} has no pyproject.toml")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(into), str(source)],
            check=True,
        )
    return sorted(into.glob("*.whl"))


@aws_app.command("bundle")
def bundle(
    target: Annotated[Path, typer.Argument(help="Folder the function's code goes in.")],
    provider: Annotated[str, typer.Option(help="sql (PostgreSQL), stripe or http.")] = "sql",
    python: Annotated[str, typer.Option(help="The Lambda runtime's Python.")] = "3.12",
    architecture: Annotated[Architecture, typer.Option(help="The function's.")] = (
        Architecture.x86_64
    ),
    source: Annotated[
        list[Path] | None,
        typer.Option(help="A local checkout to bundle instead of its release (repeat)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the pip command only (without --source's wheels).")
    ] = False,
) -> None:
    """Build the Lambda function's code (the CDK construct's assetPath)."""
    with tempfile.TemporaryDirectory() as built:
        wheels = [] if dry_run or not source else _wheels(source, Path(built))
        command = bundle_commands(target, provider, python, architecture, wheels)
        if dry_run:
            typer.echo(shlex.join(command))
            return
        subprocess.run(command, check=True)
    typer.echo(f"bundled {provider} for Python {python} on {architecture.value} in {target}")
