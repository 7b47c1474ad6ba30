"""Provider selection and provider options: argument, environment, file, default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from metering_core import ConfigurationError, Metering, ProviderNotFoundError

from .conftest import RecordingProvider

pytestmark = pytest.mark.usefixtures("clean_env", "recording_plugin")


def write(name: str, text: str) -> None:
    with open(name, "w", encoding="utf-8") as file:
        file.write(text)


def build(**kwargs: object) -> RecordingProvider:
    with Metering(**kwargs) as m:  # type: ignore[arg-type]
        provider = m.provider
    assert isinstance(provider, RecordingProvider)
    return provider


def test_explicit_argument_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_PROVIDER", "nope")
    assert build(provider="recording", api_key="k").settings.region == "eu"


def test_environment_selects_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_PROVIDER", "recording")
    monkeypatch.setenv("METERING_RECORDING_API_KEY", "from-env")
    assert build().settings.api_key.get_secret_value() == "from-env"


def test_metering_toml_selects_and_configures() -> None:
    write(
        "metering.toml",
        'provider = "recording"\n[recording]\napi_key = "from-file"\nregion = "us"\n',
    )
    settings = build().settings
    assert (settings.api_key.get_secret_value(), settings.region) == ("from-file", "us")


def test_pyproject_tool_table_selects_and_configures() -> None:
    write(
        "pyproject.toml",
        '[project]\nname = "app"\n[tool.metering]\nprovider = "recording"\n'
        '[tool.metering.recording]\napi_key = "pp"\ntimeout = 3\n',
    )
    assert build().settings.timeout == 3


def test_option_order_is_kwargs_then_env_then_file(monkeypatch: pytest.MonkeyPatch) -> None:
    write("metering.toml", '[recording]\napi_key = "file"\nregion = "file"\ntimeout = 1\n')
    monkeypatch.setenv("METERING_RECORDING_REGION", "env")
    monkeypatch.setenv("METERING_RECORDING_TIMEOUT", "2")
    settings = build(provider="recording", timeout=5).settings
    assert (settings.api_key.get_secret_value(), settings.region, settings.timeout) == (
        "file",
        "env",
        5,
    )


def test_explicit_config_file_is_read(tmp_path: object) -> None:
    write("elsewhere.toml", 'provider = "recording"\n[recording]\napi_key = "x"\n')
    assert build(config_file="elsewhere.toml").settings.api_key.get_secret_value() == "x"
    with pytest.raises(ConfigurationError, match=r"missing\.toml"):
        build(config_file="missing.toml")


def test_no_configuration_uses_the_durable_store_and_names_its_file(
    caplog: pytest.LogCaptureFixture, private_data_home: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="metering"), Metering() as m:
        assert m.provider_name == "sql"
        m.create_meter(event_name="api_calls")
    store = private_data_home / "metering" / "metering.db"
    assert f"using 'sql' on {store}" in caplog.text
    with Metering() as again:  # a new process, a new facade: the meter is still there
        assert [meter.event_name for meter in again.iter_meters()] == ["api_calls"]


def test_unknown_provider_lists_installed_ones_and_the_pip_command() -> None:
    with pytest.raises(ProviderNotFoundError) as caught:
        Metering(provider="chargebee")
    message = str(caught.value)
    assert "'chargebee'" in message
    assert "recording" in message
    assert "memory" in message
    assert "pip install metering-chargebee" in message


def test_bad_options_name_the_option_and_never_show_a_secret() -> None:
    with pytest.raises(ConfigurationError) as caught:
        build(provider="recording", api_key=12345, timeout="soon", regoin="typo")
    message = str(caught.value)
    assert "12345" not in message
    assert "api_key='**********'" in message
    assert "timeout='soon'" in message
    assert "regoin" in message


def test_an_option_nested_past_what_json_holds_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a RecursionError traceback (probe: METERING_SQL_MIRRORS of 5,000 brackets)."""
    monkeypatch.setenv("METERING_SQL_MIRRORS", "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigurationError, match="'sql' provider settings: an option is nested"):
        Metering("sql", url="sqlite://")


def test_two_mirrors_of_one_provider_each_name_their_own_bad_option() -> None:
    mirrors = {
        "billing": {"provider": "recording", "api_key": "k"},
        "audit": {"provider": "recording", "api_key": "k", "timeout": "soon"},
    }
    with pytest.raises(ConfigurationError, match=r"^mirrors\.audit: .*timeout='soon'"):
        Metering("sql", url="sqlite://", mirrors=mirrors)


def test_missing_required_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match="api_key is required"):
        build(provider="recording")


def test_invalid_toml_is_a_configuration_error() -> None:
    write("metering.toml", "provider = \n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        build()


def test_settings_repr_hides_the_key() -> None:
    provider = build(provider="recording", api_key="sk_live_secret")
    assert "sk_live_secret" not in repr(provider.settings)
    assert "sk_live_secret" not in str(provider.settings)
