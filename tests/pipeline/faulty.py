"""A provider that wraps memory and misbehaves on schedule, to test the pipeline's guarantees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from metering_core import (
    Capabilities,
    IngestResult,
    ProviderUnavailableError,
    RateLimitedError,
    UsageEvent,
    ValidationError,
)
from metering_core.memory import MemoryProvider

FAULTS = ("unavailable", "rate_limited", "hang_after_storing", "cancelled", "ok")


@dataclass
class FaultyProvider(MemoryProvider):
    """Memory behind a schedule of faults, one per call; also rejects and poisons chosen ids.

    - "unavailable": raises ProviderUnavailableError, stores nothing;
    - "rate_limited": raises RateLimitedError(retry_after), stores nothing;
    - "hang_after_storing": stores the batch, then hangs past the delivery timeout, as a
      request that reached the provider but whose answer was lost;
    - "cancelled": raises CancelledError, stores nothing, as a provider whose own task
      (a connection's, a client's) was torn down under the call;
    - "hang_then_fail": stores nothing and hangs; cancelled (by its caller, or by the
      delivery timeout), it raises ProviderUnavailableError instead, as a client that
      reports an interrupted request as an error of its own;
    - a batch holding a poisoned id fails for good (ValidationError) as a whole.
    """

    schedule: list[str] = field(default_factory=list)
    retry_after: float = 0.0
    rejected_ids: set[str] = field(default_factory=set)
    poisoned_ids: set[str] = field(default_factory=set)
    batch_size: int = 10
    calls: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        MemoryProvider.__init__(self)

    def known_capabilities(self) -> Capabilities:
        capabilities = super().known_capabilities()
        return capabilities.model_copy(update={"max_batch_size": self.batch_size})

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        self.calls.append((time.monotonic(), len(events)))
        fault = self.schedule.pop(0) if self.schedule else "ok"
        if fault == "unavailable":
            raise ProviderUnavailableError("injected outage", provider="faulty", status_code=503)
        if fault == "rate_limited":
            raise RateLimitedError("injected 429", provider="faulty", retry_after=self.retry_after)
        if fault == "cancelled":
            raise asyncio.CancelledError()
        if fault == "hang_then_fail":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise ProviderUnavailableError("interrupted", provider="faulty") from None
        if any(event.id in self.poisoned_ids for event in events):
            raise ValidationError("injected poison in batch", field="events", value=len(events))
        keep = [event for event in events if event.id not in self.rejected_ids]
        result = await super().ingest_usage_events(keep)
        result.rejected.update(
            {e.id: "injected rejection" for e in events if e.id in self.rejected_ids}
        )
        if fault == "hang_after_storing":
            await asyncio.sleep(3600)
        return result

    def stored_ids(self) -> list[str]:
        """Every id the provider counts, once per time it counts it."""
        ids: list[str] = []
        for stored in self._meters.values():
            for series in stored.series.values():
                ids.extend(
                    i for i, v in zip(series.ids, series.values, strict=True) if v is not None
                )
        return ids
