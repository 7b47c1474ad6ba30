"""Settings resolution: which provider, with which options, from where.

Provider: an explicit argument, then `METERING_PROVIDER`, then the config file
(`metering.toml` in the working directory, else `[tool.metering]` in `pyproject.toml`),
otherwise the durable store (`sql` on a SQLite file in the user data directory), with a
warning naming the file. Provider options: keyword arguments, then
`METERING_<PROVIDER>_<OPTION>` variables, then the file's table for that provider.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import platformdirs
import pydantic
from pydantic import BaseModel, Field, Secret, SecretBytes, SecretStr
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from metering_core.errors import ConfigurationError

__all__ = [
    "MeteringSettings",
    "ProviderSettings",
    "default_store_path",
    "load_config_file",
    "resolve_provider_settings",
    "resolve_settings",
]

logger = logging.getLogger("metering")

DEFAULT_PROVIDER = "sql"


def default_store_path() -> Path:
    """Where the embedded store lives when nothing is configured: a SQLite file in the
    user data directory (`platformdirs`, which honours XDG_DATA_HOME)."""
    return Path(platformdirs.user_data_dir("metering")) / "metering.db"


S = TypeVar("S", bound=BaseSettings)


_FILE_TABLE: ContextVar[Mapping[str, Any] | None] = ContextVar("metering_file_table", default=None)
"""The config file's table for the settings being built (its lowest layer)."""


class _Layered(BaseSettings):
    """Settings read from keyword arguments, then `METERING_*` variables (then a `.env` file
    or a secrets directory, where a model's config names one), then the config file's
    table: pydantic-settings' own sources, in that order of precedence."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        table = InitSettingsSource(settings_cls, init_kwargs=dict(_FILE_TABLE.get() or {}))
        # a plugin's settings may read a .env file or a secrets directory (its own
        # model_config), below the environment and above the config file
        return init_settings, env_settings, dotenv_settings, file_secret_settings, table


class ProviderSettings(_Layered):
    """Base of every provider's settings model; unknown options are refused."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, case_sensitive=False)


class MeteringSettings(_Layered):
    """Settings of the library itself (not of one provider)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    provider: str | None = None
    spool_path: Path | None = None
    """Durable outbox for ingestion; events survive a crash when set."""
    linger: float = Field(default=0.005, ge=0)
    """Seconds a partial batch waits for more events before it is sent."""
    max_queue: int = Field(default=100_000, ge=1)
    """Events held in memory before `ingest_usage_event` blocks."""
    max_concurrency: int = Field(default=4, ge=1)
    """Batches in flight to the provider at once."""
    max_attempts: int = Field(default=8, ge=1)
    """Delivery attempts of a batch on retryable failures before its events are reported."""
    retry_backoff: float = Field(default=0.05, gt=0)
    """First retry delay in seconds; it doubles per attempt (with jitter) up to 10 s,
    never below a provider's Retry-After."""
    delivery_timeout: float = Field(default=30.0, gt=0)
    """Seconds one provider call may take before it counts as a retryable failure; also
    how long closing waits for an outage to end before leaving events in the spool."""
    mirror_forwarder: bool = True
    """With the sql provider's `mirrors`: forward what they are owed from this process for
    as long as its background delivery runs (from the first ingest, or `start()`, to
    `close()`). False where this process is short-lived or frozen between calls (a
    Lambda), or where `metering mirror run` forwards instead."""


def load_config_file(path: Path | str | None = None) -> dict[str, Any]:
    """The metering table of the config file: `path` if given (a `metering.toml` or a
    `pyproject.toml`), else `metering.toml` or `pyproject.toml` in the working directory."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigurationError(f"config file {str(file)!r} does not exist")
        candidates = [file]
    else:
        candidates = [Path("metering.toml"), Path("pyproject.toml")]
    for file in candidates:
        if not file.is_file():
            continue
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {str(file)!r} is not valid TOML: {exc}") from exc
        if file.name == "pyproject.toml":
            table = data.get("tool", {}).get("metering")
            if table is None:
                continue
            data = table
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"config file {str(file)!r}: the metering table is not a table"
            )
        return data
    return {}


def _env_prefix(provider: str | None) -> str:
    if provider is None:
        return "METERING_"
    return "METERING_" + provider.upper().replace("-", "_") + "_"


def _is_secret(annotation: Any) -> bool:
    """Whether a field's type holds a secret (`SecretStr`, `SecretBytes`, `Secret[...]`),
    alone or inside `Optional`, a union or a container."""
    origin = get_origin(annotation) or annotation
    if isinstance(origin, type) and issubclass(origin, SecretStr | SecretBytes | Secret):
        return True
    return any(_is_secret(argument) for argument in get_args(annotation))


def _configuration_error(
    exc: pydantic.ValidationError, model: type[BaseModel], where: str
) -> ConfigurationError:
    """Name each bad option and its value, masking secrets (and options that hold them,
    marked `json_schema_extra={"secret": True}`). An option the model does not
    have is named without its value: it may be a secret under a misspelt name
    (`api_kye=sk_live_...`)."""
    secrets = {
        name
        for name, field in model.model_fields.items()
        if _is_secret(field.annotation)
        or (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("secret"))
    }
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        shown = (
            "'**********'"
            if error["loc"] and error["loc"][0] in secrets
            else repr(error.get("input"))
        )
        if error["type"] == "missing":
            parts.append(f"{field} is required")
        elif error["type"] == "extra_forbidden":
            parts.append(f"{field}: no such option")
        else:
            parts.append(f"{field}={shown}: {error['msg']}")
    return ConfigurationError(f"invalid {where} settings: " + "; ".join(parts))


def _layered(
    model: type[S],
    prefix: str,
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    where: str,
) -> S:
    """`model` from keyword arguments, environment variables under `prefix`, and the
    config file's `file_values`, in that order of precedence."""
    token = _FILE_TABLE.set(file_values)
    try:
        return model(_env_prefix=prefix, **{k: v for k, v in overrides.items() if v is not None})
    except pydantic.ValidationError as exc:
        raise _configuration_error(exc, model, where) from None
    except RecursionError:  # an option's JSON nested past what the parser holds
        raise ConfigurationError(f"{where} settings: an option is nested too deeply") from None
    finally:
        _FILE_TABLE.reset(token)


def settings_from_options(model: type[S], options: Mapping[str, Any], where: str) -> S:
    """`model` from `options` alone: no environment variables, no file (a sql mirror of a
    sql ledger: METERING_SQL_* are the ledger's own)."""
    try:
        return model.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        raise _configuration_error(exc, model, where) from None


def resolve_settings(
    overrides: Mapping[str, Any] | None = None, *, config_file: Path | str | None = None
) -> tuple[MeteringSettings, dict[str, Any]]:
    """The library settings and the whole file table (for provider tables)."""
    file_table = load_config_file(config_file)
    file_values = {k: v for k, v in file_table.items() if not isinstance(v, dict)}
    settings = _layered(
        MeteringSettings, _env_prefix(None), file_values, overrides or {}, "metering"
    )
    return settings, file_table


def provider_name(settings: MeteringSettings) -> str:
    """The configured provider, or the embedded durable store with a warning naming it."""
    if settings.provider:
        return settings.provider
    logger.warning(
        "no metering provider configured (METERING_PROVIDER, metering.toml or [tool.metering]); "
        "using 'sql' on %s",
        default_store_path(),
    )
    return DEFAULT_PROVIDER


def resolve_provider_settings(
    model: type[S], provider: str, file_table: Mapping[str, Any], overrides: Mapping[str, Any]
) -> S:
    """One provider's settings: kwargs, then METERING_<PROVIDER>_* variables, then its table."""
    table = file_table.get(provider, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"config file: [{provider}] must be a table, got {table!r}")
    return _layered(model, _env_prefix(provider), table, overrides, f"{provider!r} provider")
