"""What every route of one app shares: the facade it serves, who may call it, its metrics,
and its copy of the meters' aggregations; kept on `app.state`, reached by dependency."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from metering_core.client import AsyncMetering
from metering_core.models import MAX_EVENTS_PER_REQUEST
from metering_core.server.auth import Gate
from metering_core.server.health import Health
from metering_core.server.metrics import ServiceMetrics
from metering_core.server.tenant_meters import MeterAggregations

__all__ = ["Service", "service"]


@dataclass(frozen=True)
class Service:
    """One app's shared parts."""

    metering: AsyncMetering
    gate: Gate
    metrics: ServiceMetrics
    meter_kinds: MeterAggregations
    public_metrics: bool
    health: Health = field(default_factory=Health)

    async def batch_limit(self) -> int:
        """The most events (or ids to cancel) one request may carry: the provider's batch
        size, at most `MAX_EVENTS_PER_REQUEST`. `GET /capabilities` offers it, so a client
        never splits to more than the service takes."""
        offered = (await self.metering.load_capabilities()).max_batch_size
        return min(offered, MAX_EVENTS_PER_REQUEST)


async def service(request: Request) -> Service:
    """A dependency: the app's shared parts. A coroutine, though it awaits nothing:
    FastAPI runs a plain function dependency in a worker thread, a handoff to a thread
    and back on every request that names it (`/health`, `POST /events`, every read)."""
    shared: Service = request.app.state.service
    return shared
