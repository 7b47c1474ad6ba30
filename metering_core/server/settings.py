"""The service's own settings: its API keys, from `METERING_KEYS` or the config file.

They belong to the service, not to every library user: `Metering()` never reads them.
A key is a secret, so no message here ever shows one; a bad entry is named by its
position ("key #2") and only the bad part (a scope, a tenant) is shown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic

from metering_core.config import load_config_file
from metering_core.errors import ConfigurationError
from metering_core.keys import ApiKey, Scope

__all__ = ["ApiKey", "Scope", "configured_keys"]


def _from_environment() -> Any | None:
    raw = os.environ.get("METERING_KEYS")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except RecursionError:
        raise ConfigurationError("METERING_KEYS is nested too deeply to be key settings") from None
    except json.JSONDecodeError as exc:  # its message quotes no part of the text
        raise ConfigurationError(
            f"METERING_KEYS is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f'{exc.colno}); expected {{"<key>": {{"scopes": [...], "tenant": null}}}}'
        ) from None


def _validated(entries: Any, where: str) -> dict[str, ApiKey]:
    if not isinstance(entries, Mapping):
        raise ConfigurationError(
            f'{where} must map each API key to {{"scopes": [...], "tenant": ...}}, '
            f"not a {type(entries).__name__}"
        )
    keys: dict[str, ApiKey] = {}
    for position, (secret, spec) in enumerate(entries.items(), start=1):
        if not isinstance(secret, str) or not secret:
            raise ConfigurationError(f"{where}: key #{position} is empty")
        try:
            secret.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(f"{where}: key #{position} is not valid text") from None
        try:
            keys[secret] = ApiKey.model_validate(spec)
        except pydantic.ValidationError as exc:
            # Where and what, never the input: an operator may have put a key anywhere.
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise ConfigurationError(f"{where}: key #{position}: {problems}") from None
    return keys


def configured_keys(config_file: Path | str | None = None) -> dict[str, ApiKey]:
    """The service's keys: `METERING_KEYS` (JSON) if set, else the config file's `keys`."""
    from_environment = _from_environment()
    if from_environment is not None:
        return _validated(from_environment, "METERING_KEYS")
    table = load_config_file(config_file).get("keys")
    return {} if table is None else _validated(table, "the config file's [keys]")
