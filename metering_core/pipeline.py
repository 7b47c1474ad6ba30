"""Ingestion: the seam between the facade and the provider's batched ingestion.

This first version delivers each submission directly and keeps the results for `flush()`;
batching, retries and backpressure grow here behind the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from metering_core.config import MeteringSettings
from metering_core.interface import IMetering
from metering_core.models import IngestResult, UsageEvent


class Pipeline:
    """Hands validated events to the provider and reports what became of them."""

    def __init__(
        self,
        provider: IMetering,
        settings: MeteringSettings,
        *,
        on_delivered: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._on_delivered = on_delivered
        self._report = IngestResult()

    async def submit(self, events: Sequence[UsageEvent], *, timeout: float | None = None) -> None:
        """Accept events for delivery."""
        result = await self._provider.ingest_usage_events(events)
        if self._on_delivered is not None:
            self._on_delivered(result)
        self._report = self._report.merge(result)

    async def flush(self, timeout: float | None = None) -> IngestResult:
        """Everything delivered since the last flush."""
        report, self._report = self._report, IngestResult()
        return report

    async def aclose(self) -> IngestResult:
        """Deliver what is left and report it."""
        return await self.flush()
