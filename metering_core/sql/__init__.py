"""The durable store: provider `sql`, on SQLAlchemy 2 (async, Core).

SQLite (aiosqlite) is the embedded store and the default when nothing is configured;
PostgreSQL (asyncpg, `pip install metering-core[postgres]`) serves a fleet of processes
sharing one database. Semantics are the memory provider's, result for result; what the
database adds is that nothing is forgotten when a process ends, and that duplicates are
decided by a unique key, so two processes sending the same event count it once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
from pydantic import Field

from metering_core.config import ProviderSettings
from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_core.interface import Capabilities

if TYPE_CHECKING:
    from metering_core.sql.provider import SqlProvider

__all__ = ["CAPABILITIES", "SqlSettings", "default_path", "default_url"]

CAPABILITIES = Capabilities(max_batch_size=5_000)


def default_path() -> Path:
    """The embedded store used when nothing is configured (honours XDG_DATA_HOME)."""
    return Path(platformdirs.user_data_dir("metering")) / "metering.db"


def default_url() -> str:
    return f"sqlite:///{default_path()}"


def masked(url: str) -> str:
    """`url` with its credentials' password, and any `password=` parameter, as `***`.
    Whatever cannot be told apart (an '@' in a password) is masked up to the last '@'."""
    scheme, separator, rest = url.rpartition("://") if "://" in url else ("", "", url)
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0] if ":" in credentials else credentials
        rest = f"{user}:***@{host}" if ":" in credentials or "@" in credentials else rest
    rest = re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)
    return f"{scheme}{separator}{rest}"


class SqlSettings(ProviderSettings):
    """Options of the sql provider."""

    url: str = Field(default_factory=default_url)
    """`sqlite:///path` or `postgresql://user:password@host:port/db` (the password is
    never shown); a `+driver` given explicitly is kept."""
    auto_upgrade: bool | None = None
    """Upgrade an older schema on first use; default: yes for SQLite, no for PostgreSQL
    (run `metering db upgrade` there, once, for the fleet)."""

    def __repr_args__(self) -> Any:
        yield "url", masked(self.url)
        yield "auto_upgrade", self.auto_upgrade


def _build(settings: SqlSettings) -> SqlProvider:
    """Imports SQLAlchemy only when the store is asked for."""
    from metering_core.sql.provider import SqlProvider

    return SqlProvider(settings)


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """The durable store registers through the same hook as every other provider."""
    register("sql", _build, SqlSettings, capabilities=CAPABILITIES)
