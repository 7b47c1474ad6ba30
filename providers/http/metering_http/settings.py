"""Options of the HTTP provider (METERING_HTTP_<OPTION>, or [http] in the config file)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from metering_core.config import ProviderSettings

__all__ = ["HttpSettings"]


class HttpSettings(ProviderSettings):
    """Where the metering service is and how to reach it."""

    base_url: str
    api_key: SecretStr | None = None
    timeout: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=20, ge=1)
