"""The sql provider's options, and how its URL is shown (never with a password)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field

from metering_core.config import ProviderSettings, default_store_path
from metering_core.interface import Capabilities, Operation
from metering_core.models import SLUG_PATTERN, Window

__all__ = ["CAPABILITIES", "SqlSettings", "default_url", "masked"]

CAPABILITIES = Capabilities(
    operations=frozenset(Operation),
    windows=frozenset(Window),
    filters=True,
    max_batch_size=5_000,
    refuses_lowering=True,
)


def default_url() -> str:
    return f"sqlite:///{default_store_path()}"


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
    connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds to open a connection to PostgreSQL before the store counts as unreachable."""
    statement_timeout: float = Field(default=15.0, gt=0)
    """Seconds one PostgreSQL statement may take (a frozen or overloaded server): past it
    the call fails as retryable (503 at the service) instead of hanging."""
    pool_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a free pooled connection while all are busy."""
    mirror_lease: float = Field(default=120.0, gt=0)
    """Seconds a forwarder holds the outbox rows it took; past it (a forwarder killed
    mid-batch) another takes them again. Longer than a batch's delivery with retries."""
    mirrors: dict[Annotated[str, Field(pattern=SLUG_PATTERN)], dict[str, Any]] = Field(
        default_factory=dict,
        json_schema_extra={"secret": True},  # options hold secrets: never shown in errors
    )
    """Providers this store's usage is copied to, by name: `{"billing": {"provider":
    "stripe", "api_key": "..."}}` (`METERING_SQL_MIRRORS` as JSON). Each stored event and
    each cancellation is owed to every mirror in the transaction that stores it, and
    forwarded until the mirror has it (`metering mirror run`, or inside the service)."""

    def __repr_args__(self) -> Any:
        yield "url", masked(self.url)
        for name in ("auto_upgrade", "connect_timeout", "statement_timeout", "pool_timeout"):
            yield name, getattr(self, name)
        # a mirror's options hold its secrets: only its provider is shown
        yield "mirrors", {name: options.get("provider") for name, options in self.mirrors.items()}
