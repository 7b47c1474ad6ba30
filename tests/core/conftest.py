"""A small provider registered by hand, so core behaviour is tested apart from any real one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from metering_core import (
    BaseProvider,
    Capabilities,
    IngestResult,
    Meter,
    MeterCreate,
    NotFoundError,
    Page,
    ProviderSettings,
    Usage,
    UsageEvent,
    UsageQuery,
    hookimpl,
    register_plugin,
)
from metering_core.interface import SHARED_OPERATIONS, Operation
from metering_core.models import Aggregation, Window
from metering_core.plugins import unregister_plugin


class RecordingSettings(ProviderSettings):
    api_key: SecretStr
    region: str = "eu"
    timeout: float = 10.0


class RecordingProvider(BaseProvider):
    """Keeps every call; states narrow capabilities so the facade's checks show."""

    name = "recording"
    default_capabilities = Capabilities(
        operations=SHARED_OPERATIONS - {Operation.DELETE_CUSTOMER, Operation.CANCEL_USAGE_EVENTS},
        aggregations=frozenset({Aggregation.SUM, Aggregation.COUNT}),
        windows=frozenset({Window.DAY}),
        max_batch_size=3,
        requires_customer=True,
        group_by=False,
        dimensions=False,
        updatable_meter_fields=frozenset({"display_name"}),
    )

    def __init__(self, settings: RecordingSettings) -> None:
        self.settings = settings
        self.batches: list[list[UsageEvent]] = []
        self.calls: list[str] = []

    async def create_meter(self, meter: MeterCreate) -> Meter:
        self.calls.append("create_meter")
        now = datetime.now(UTC)
        fields = meter.model_dump(exclude={"display_name"})
        return Meter(
            id="m1",
            display_name=meter.display_name or meter.event_name,
            created_at=now,
            updated_at=now,
            **fields,
        )

    async def fetch_meter(self, meter_id: str) -> Meter:
        raise NotFoundError(f"no meter {meter_id!r}")

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        return Page[Meter](items=[])

    async def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        self.batches.append(list(events))
        return IngestResult(accepted=[event.id for event in events])

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        self.calls.append("fetch_usage")
        return Usage(
            meter_id=query.meter_id, aggregation="sum", start=query.start, end=query.end, rows=[]
        )


class RecordingPlugin:
    @hookimpl
    def register_providers(self, register):  # type: ignore[no-untyped-def]
        register("recording", RecordingProvider, RecordingSettings)


@pytest.fixture
def recording_plugin() -> Iterator[RecordingPlugin]:
    plugin = RecordingPlugin()
    register_plugin(plugin, name="recording-test-plugin")
    yield plugin
    unregister_plugin(plugin)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """No METERING_* variables and an empty working directory."""
    import os

    for name in list(os.environ):
        if name.startswith("METERING_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
