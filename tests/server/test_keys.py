"""The service's keys are its own settings, and no message ever shows one."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metering_core import ConfigurationError, Metering
from metering_core.cli import app
from metering_core.server.settings import configured_keys

SECRET = "sk_live_SECRET"


def test_a_bad_scope_names_the_key_by_position_never_by_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "METERING_KEYS",
        f'{{"ok-key": {{"scopes": ["usage:read"]}}, "{SECRET}": {{"scopes": ["usage:writ"]}}}}',
    )
    with pytest.raises(ConfigurationError) as caught:
        configured_keys()
    assert "key #2" in str(caught.value)
    assert "usage:writ" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "ok-key" not in str(caught.value)


def test_keys_that_are_not_json_are_a_configuration_error_without_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERING_KEYS", f"{{{SECRET}: scopes}}")
    with pytest.raises(ConfigurationError, match="METERING_KEYS is not valid JSON") as caught:
        configured_keys()
    assert SECRET not in str(caught.value)


def test_serve_with_a_bad_key_exits_2_without_printing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KEYS", f'{{"{SECRET}": {{"scopes": ["usage:writ"]}}}}')
    result = CliRunner().invoke(app, ["--provider", "memory", "serve"])
    assert result.exit_code == 2
    assert result.output.startswith("error: METERING_KEYS: key #1: scopes.0: Input should be")
    assert SECRET not in result.output


def test_a_library_user_never_reads_the_service_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KEYS", "not json at all")
    with Metering("memory") as m:
        assert m.provider_name == "memory"


def test_keys_come_from_the_config_file_when_the_environment_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("METERING_KEYS", raising=False)
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    with open("metering.toml", "w") as file:
        file.write('[keys."k-1"]\nscopes = ["usage:read"]\ntenant = "acme"\n')
    keys = configured_keys()
    assert keys["k-1"].tenant == "acme"
    assert keys["k-1"].scopes == {"usage:read"}


@pytest.mark.parametrize(
    "entry",
    [
        f'{{"tenant-a": "{SECRET}"}}',  # the key where its settings belong
        f'{{"k": {{"scopes": ["usage:read"], "key": "{SECRET}"}}}}',  # an extra field
        f'{{"k": {{"scopes": ["{SECRET}"]}}}}',  # the key where a scope belongs
        f'{{"k": {{"scopes": ["usage:read"], "tenant": ["{SECRET}"]}}}}',
    ],
)
def test_no_misplaced_key_is_ever_shown(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("METERING_KEYS", entry)
    with pytest.raises(ConfigurationError) as caught:
        configured_keys()
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("raw", ['{"\\ud800": {"scopes": []}}', "[" * 100_000])
def test_undecodable_or_absurd_keys_are_configuration_errors(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("METERING_KEYS", raw)
    with pytest.raises(ConfigurationError):
        configured_keys()
