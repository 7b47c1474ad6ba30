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
