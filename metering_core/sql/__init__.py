"""The durable store: provider `sql`, on SQLAlchemy 2 (async, Core).

SQLite (aiosqlite) is the embedded store and the default when nothing is configured;
PostgreSQL (asyncpg, `pip install metering-core[postgres]`) serves a fleet of processes
sharing one database. Semantics are the memory provider's, result for result; what the
database adds is that nothing is forgotten when a process ends, and that duplicates are
decided by a unique key, so two processes sending the same event count it once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_core.sql.settings import CAPABILITIES, SqlSettings

if TYPE_CHECKING:
    import typer

    from metering_core.sql.provider import SqlProvider

__all__ = ["CAPABILITIES", "SqlSettings"]


def _build(settings: SqlSettings) -> SqlProvider:
    """Imports SQLAlchemy only when the store is asked for."""
    from metering_core.sql.provider import SqlProvider

    return SqlProvider(settings)


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """The durable store registers through the same hook as every other provider."""
    register("sql", _build, SqlSettings, capabilities=CAPABILITIES)


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    """`metering db`: where the store is, and its schema."""
    from metering_core.sql.commands import db_app

    cli.add_typer(db_app, name="db")
