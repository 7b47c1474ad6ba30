"""serve(): what `metering serve` and embedding apps call; loopback unless told otherwise."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from metering_core import AsyncMetering, ConfigurationError
from metering_core.server import create_app, serve


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    return calls


def test_serve_builds_the_app_and_binds_loopback(runs: list[tuple[Any, dict[str, Any]]]) -> None:
    serve(AsyncMetering("memory"), allow_anonymous=True)
    app, options = runs[0]
    assert isinstance(app, FastAPI)
    assert options == {"host": "127.0.0.1", "port": 8000}


def test_serve_runs_a_given_app_as_is(runs: list[tuple[Any, dict[str, Any]]]) -> None:
    app = create_app(AsyncMetering("memory"), keys={"k": {"scopes": ["meters:read"]}})
    serve(app, host="0.0.0.0", port=9000)
    assert runs == [(app, {"host": "0.0.0.0", "port": 9000})]


def test_serve_without_keys_refuses(
    runs: list[tuple[Any, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METERING_KEYS", raising=False)
    with pytest.raises(ConfigurationError, match="no API keys"):
        serve(AsyncMetering("memory"))
    assert runs == []
