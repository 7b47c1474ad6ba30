"""What the pipeline does, counted: through the OpenTelemetry API (free until an
application configures an SDK), and as plain totals (`PipelineStats`) for the REST
service's Prometheus page and for tests.

OpenTelemetry instruments (attribute `provider`): `metering.events.queued`,
`metering.events.delivered` (attribute `outcome`: accepted, duplicate, rejected),
`metering.delivery.retries` (events sent again), `metering.events.dead_lettered`,
`metering.queue.depth` (events queued and not yet settled) and
`metering.delivery.duration` (seconds per batch, retries included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry import metrics

from metering_core.models import IngestResult

__all__ = ["PipelineStats"]

_meter = metrics.get_meter("metering_core")
_queued = _meter.create_counter(
    "metering.events.queued", unit="{event}", description="Events accepted for delivery"
)
_delivered = _meter.create_counter(
    "metering.events.delivered", unit="{event}", description="Events settled, by outcome"
)
_retried = _meter.create_counter(
    "metering.delivery.retries", unit="{event}", description="Events sent again after a failure"
)
_dead = _meter.create_counter(
    "metering.events.dead_lettered", unit="{event}", description="Events kept as dead letters"
)
_depth = _meter.create_up_down_counter(
    "metering.queue.depth", unit="{event}", description="Events queued and not yet settled"
)
_duration = _meter.create_histogram(
    "metering.delivery.duration", unit="s", description="Time to settle one batch"
)


@dataclass
class PipelineStats:
    """Totals since the pipeline started, one per provider facade."""

    provider: str
    queued: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    retried: int = 0
    dead_lettered: int = 0
    queue_depth: int = 0
    _attributes: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._attributes = {"provider": self.provider}

    def on_queued(self, count: int) -> None:
        self.queued += count
        self.queue_depth += count
        _queued.add(count, self._attributes)
        _depth.add(count, self._attributes)

    def on_settled(self, count: int, result: IngestResult, seconds: float, dead: int) -> None:
        self.queue_depth -= count
        _depth.add(-count, self._attributes)
        _duration.record(seconds, self._attributes)
        for outcome, number in (
            ("accepted", len(result.accepted)),
            ("duplicate", len(result.duplicates)),
            ("rejected", len(result.rejected)),
        ):
            if number:
                _delivered.add(number, {**self._attributes, "outcome": outcome})
        self.accepted += len(result.accepted)
        self.duplicates += len(result.duplicates)
        self.rejected += len(result.rejected)
        if dead:
            self.dead_lettered += dead
            _dead.add(dead, self._attributes)

    def on_abandoned(self, count: int) -> None:
        """Events left unsettled at close (they stay in the spool)."""
        self.queue_depth -= count
        _depth.add(-count, self._attributes)

    def on_retry(self, count: int) -> None:
        self.retried += count
        _retried.add(count, self._attributes)
