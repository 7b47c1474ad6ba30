"""Plugin loading: by hand, through a real entry point, and with autoload turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metering_core import ConfigurationError, Metering, hookimpl, providers, register_plugin
from metering_core.plugins import get_provider, unregister_plugin

from .conftest import RecordingProvider, RecordingSettings

PLUGIN_MODULE = textwrap.dedent(
    """
    from metering_core import hookimpl
    from metering_core.memory import MemoryProvider, MemorySettings

    class EchoProvider(MemoryProvider):
        name = "echo"

    @hookimpl
    def register_providers(register):
        register("echo", lambda settings: EchoProvider(), MemorySettings)
    """
)

LIST_PROVIDERS = (
    "import json, metering_core; "
    "print(json.dumps([[p.name, p.plugin] for p in metering_core.providers()]))"
)


def install_fake_distribution(root: Path) -> None:
    """Lay out a module plus a dist-info with an entry point, as pip would install it."""
    (root / "metering_echo.py").write_text(PLUGIN_MODULE)
    dist = root / "metering_echo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: metering-echo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[metering]\necho = metering_echo\n")


def listed_providers(root: Path, **env: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    environment = {**inherited, "PYTHONPATH": str(root), **env}
    output = subprocess.run(
        [sys.executable, "-c", LIST_PROVIDERS],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(output))


def test_an_installed_entry_point_plugin_is_found(tmp_path: Path) -> None:
    install_fake_distribution(tmp_path)
    found = listed_providers(tmp_path)
    assert found["echo"] == "echo"  # pluggy names an entry-point plugin by its entry-point name
    assert found["memory"] == "metering_core.memory"


def test_autoload_can_be_turned_off_but_builtins_stay(tmp_path: Path) -> None:
    install_fake_distribution(tmp_path)
    found = listed_providers(tmp_path, METERING_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "echo" not in found
    assert "memory" in found


@pytest.mark.usefixtures("recording_plugin")
def test_a_plugin_registered_by_hand_is_listed_and_built() -> None:
    spec = get_provider("recording")
    assert spec.settings_model is RecordingSettings
    assert spec.plugin == "recording-test-plugin"
    assert "recording" in [p.name for p in providers()]
    with Metering(provider="recording", api_key="k", region="us") as m:
        assert isinstance(m.provider, RecordingProvider)
        assert m.provider.settings.region == "us"


def test_a_provider_name_registered_twice_is_refused() -> None:
    class Impostor:
        @hookimpl
        def register_providers(self, register):  # type: ignore[no-untyped-def]
            register("memory", RecordingProvider, RecordingSettings)

    impostor = Impostor()
    register_plugin(impostor, name="impostor")
    try:
        with pytest.raises(ConfigurationError, match="'memory' is registered twice"):
            get_provider("memory")
    finally:
        unregister_plugin(impostor)


def test_memory_states_its_capabilities_up_front() -> None:
    memory = get_provider("memory")
    assert memory.capabilities is not None
    assert memory.capabilities.group_by


def test_a_provider_still_stating_capabilities_as_a_property_is_refused_at_import() -> None:
    """The contract reads `default_capabilities`, `known_capabilities()` or
    `load_capabilities()`; a `capabilities` property ignored would let batches past the
    provider's limit through, and operations it declared unsupported."""
    with pytest.raises(TypeError, match="no longer reads"):

        class OldStyle(RecordingProvider):
            @property
            def capabilities(self) -> object:
                return RecordingProvider.default_capabilities


def test_the_async_facade_states_capabilities_up_front_unless_a_backend_must_say() -> None:
    from metering_core import AsyncMetering, MeteringError

    memory = AsyncMetering("memory", max_batch_size=7)
    assert memory.capabilities.max_batch_size == 7  # from its settings, without I/O
    http = AsyncMetering("http", base_url="http://127.0.0.1:9")
    with pytest.raises(MeteringError, match="await load_capabilities"):
        http.capabilities  # noqa: B018


def test_a_plugins_settings_may_read_a_secrets_directory(tmp_path: Path) -> None:
    """Below the environment, above the config file, as pydantic-settings reads them."""
    from pydantic_settings import SettingsConfigDict

    from metering_core import ProviderSettings

    class Mounted(ProviderSettings):
        model_config = SettingsConfigDict(
            extra="forbid", frozen=True, case_sensitive=False, secrets_dir=str(tmp_path)
        )
        api_key: str

    (tmp_path / "metering_mounted_api_key").write_text("from-the-mount")  # as its variable
    from metering_core.config import resolve_provider_settings

    assert resolve_provider_settings(Mounted, "mounted", {}, {}).api_key == "from-the-mount"
    table = {"mounted": {"api_key": "from-the-file"}}
    assert resolve_provider_settings(Mounted, "mounted", table, {}).api_key == "from-the-mount"
    overridden = resolve_provider_settings(Mounted, "mounted", table, {"api_key": "kwarg"})
    assert overridden.api_key == "kwarg"


def test_a_plugins_command_is_added_and_its_errors_reported_like_any_commands() -> None:
    import typer
    from typer.testing import CliRunner

    from metering_core import NotFoundError, ValidationError
    from metering_core.cli import app
    from metering_core.plugins import plugin_manager

    class Commands:
        @hookimpl
        def register_commands(self, cli: typer.Typer) -> None:
            group = typer.Typer()

            @group.command("bad")
            def bad(value: str) -> None:
                raise ValidationError(f"value={value!r} is not good", field="value", value=value)

            @group.command("gone")
            def gone() -> None:
                raise NotFoundError("no such thing")

            cli.add_typer(group, name="plugin-cmds")

    plugin = Commands()
    register_plugin(plugin)
    try:
        plugin_manager().hook.register_commands(cli=app)
        runner = CliRunner()
        bad = runner.invoke(app, ["plugin-cmds", "bad", "x"])
        assert (bad.exit_code, bad.output.strip()) == (2, "error: value='x' is not good")
        gone = runner.invoke(app, ["plugin-cmds", "gone"])
        assert (gone.exit_code, gone.output.strip()) == (1, "error: no such thing")
    finally:
        unregister_plugin(plugin)
        app.registered_groups[:] = [g for g in app.registered_groups if g.name != "plugin-cmds"]
