"""The provider shown in docs/plugins.md is complete: it is taken from the page, registered
as a plugin, reached through configuration, and passes the conformance suite."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from metering_core import AsyncMetering, UnsupportedOperationError, register_plugin
from metering_core.plugins import unregister_plugin
from metering_core.testing import ProviderConformance

PAGE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def code() -> str:
    """The example's code block, as the page shows it."""
    block = PAGE.read_text().split("```python\n# metering_ledger/__init__.py", 1)[1]
    return block.split("\n", 1)[1].split("```", 1)[0]


def example() -> types.ModuleType:
    module = types.ModuleType("metering_ledger")
    exec(compile(code(), str(PAGE), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def ledger() -> Iterator[types.ModuleType]:
    module = example()
    register_plugin(module, name="metering_ledger")
    yield module
    unregister_plugin(module)


def test_the_example_is_short() -> None:
    lines = [line for line in code().splitlines() if line.strip()]
    assert len(lines) < 60, len(lines)


async def test_configuration_reaches_the_example_and_the_facade_guards_it(
    ledger: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_PROVIDER", "ledger")
    monkeypatch.setenv("METERING_LEDGER_OWNER", "finance")
    async with AsyncMetering() as m:
        assert m.provider_name == "ledger"
        meter = await m.create_meter(event_name="api_calls")
        await m.ingest_usage_event(event_name="api_calls", customer_id="t1", value=4)
        assert (await m.flush()).ok
        now = datetime.now(UTC)
        usage = await m.fetch_usage(meter.id, start=now - timedelta(hours=1), end=now)
        assert usage.total == 4
        with pytest.raises(UnsupportedOperationError, match="window='day'"):
            await m.fetch_usage(meter.id, start=now - timedelta(days=1), end=now, window="day")


class TestTheExampleConforms(ProviderConformance):
    @pytest.fixture
    async def provider(self, ledger: types.ModuleType) -> AsyncIterator[Any]:
        provider = ledger.LedgerProvider(ledger.LedgerSettings())
        yield provider
        await provider.aclose()
