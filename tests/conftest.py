"""Every test runs with its own user data directory, so the default store (a SQLite file
there) is never the developer's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import examples as _profiles  # noqa: F401  (loads the Hypothesis profile first)

pytest_plugins = ["tests.stores"]  # SQLite files and a private PostgreSQL server, for any test


@pytest.fixture(autouse=True)
def private_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path_factory.mktemp("data-home")
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home
