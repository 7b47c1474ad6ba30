"""The pipeline counts what it does through the OpenTelemetry API: an application that
configures an SDK reads queued, delivered by outcome, retries, dead letters, queue depth
and delivery time; `stats()` gives the same totals without one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from metering_core import MeterCreate, Metering, UsageEvent

from .faulty import FaultyProvider

READER = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


def points(name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Data points of one instrument, by their attributes (provider 'faulty' only)."""
    found: dict[tuple[tuple[str, Any], ...], Any] = {}
    data = READER.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    attributes = dict(point.attributes)
                    if attributes.get("provider") == "faulty":
                        attributes.pop("provider")
                        found[tuple(sorted(attributes.items()))] = point
    return found


def test_a_delivery_with_faults_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FaultyProvider(schedule=["unavailable", "rate_limited"], rejected_ids={"e3"})
    provider.name = "faulty"  # type: ignore[misc]
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    events = [UsageEvent(id=f"e{i}", event_name="api_calls", customer_id="t1") for i in range(8)]
    with (
        caplog.at_level(logging.WARNING, logger="metering"),
        Metering(provider, spool_path=tmp_path / "spool.db", linger=0, retry_backoff=0.001) as m,
    ):
        m.ingest_usage_events(events)
        m.flush()
        stats = m.stats()
    assert (stats.queued, stats.accepted, stats.rejected) == (8, 7, 1)
    assert (stats.dead_lettered, stats.queue_depth) == (1, 0)
    assert stats.retried == 16  # the batch of 8, sent again twice
    assert points("metering.events.queued")[()].value == 8
    delivered = points("metering.events.delivered")
    assert delivered[(("outcome", "accepted"),)].value == 7
    assert delivered[(("outcome", "rejected"),)].value == 1
    assert points("metering.delivery.retries")[()].value == 16
    assert points("metering.events.dead_lettered")[()].value == 1
    assert points("metering.queue.depth")[()].value == 0
    assert points("metering.delivery.duration")[()].count >= 1
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2
    assert "injected outage" in retries[0]
    assert any(
        "refused 1 event(s) (kept as dead letters); first: 'e3'" in r.getMessage()
        for r in caplog.records
    )
