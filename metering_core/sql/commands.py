"""`metering db`: the sql store's own commands, added to the command line through the
`register_commands` hook as any plugin's would be. They act on the store configured for
the sql provider (`METERING_SQL_URL`, its config table, else the embedded default)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from metering_core.config import provider_name, resolve_provider_settings, resolve_settings
from metering_core.errors import ConfigurationError
from metering_core.sql.provider import SqlProvider
from metering_core.sql.settings import SqlSettings

__all__ = ["db_app"]

db_app = typer.Typer(
    help="The sql provider's store: where it is, its schema.", no_args_is_help=True
)


def _store(ctx: typer.Context) -> SqlProvider:
    """The configured store; refused when configuration selects another provider."""
    root = ctx.find_root().params
    config: Path | None = root.get("config")
    settings, table = resolve_settings({"provider": root.get("provider")}, config_file=config)
    name = provider_name(settings)
    if name != "sql":
        raise ConfigurationError(f"the configured provider is {name!r}; `metering db` is for sql")
    return SqlProvider(resolve_provider_settings(SqlSettings, "sql", table, {}))


@db_app.command("path")
def db_path(ctx: typer.Context) -> None:
    """Where the store is (its URL, password masked; the file for SQLite)."""
    store = _store(ctx).store
    typer.echo(str(store.sqlite_path) if store.sqlite_path else store.shown)


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """The store's schema revision and this version's newest."""
    current, head = asyncio.run(_store(ctx).schema_revision())
    typer.echo(f"{current or 'empty'} (newest: {head})")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the store's schema (PostgreSQL: once, for the whole fleet)."""
    provider = _store(ctx)

    async def upgrade() -> str:
        try:
            return await provider.upgrade_schema()
        finally:
            await provider.aclose()  # in the loop that made the engine

    typer.echo(f"at {asyncio.run(upgrade())}")
