"""Running the service: health, capabilities, and the Prometheus page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from metering_core.interface import Capabilities, Ledger
from metering_core.models import MirrorStatus
from metering_core.server.auth import Principal
from metering_core.server.callers import Caller, identify, needs
from metering_core.server.metrics import CONTENT_TYPE
from metering_core.server.query import known_query_only
from metering_core.server.schemas import Health
from metering_core.server.service import Service, service

router = APIRouter(dependencies=[Depends(known_query_only)])
Shared = Annotated[Service, Depends(service)]
Operator = Annotated[Principal, Depends(needs("metrics:read"))]


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, shared: Shared) -> Response:
    """Prometheus text format; a key with `metrics:read`, or none if made public."""
    if not shared.public_metrics:
        identify(request.scope).need("metrics:read")
    if isinstance(shared.metering.provider, Ledger) and shared.metering.provider.mirrored:
        shared.metrics.mirrors(await shared.metering.mirror_status())
    return Response(shared.metrics.page(), media_type=CONTENT_TYPE)


@router.get("/mirrors", response_model=list[MirrorStatus])
async def mirrors(_: Operator, shared: Shared) -> list[MirrorStatus]:
    """What the ledger still owes each of its mirrors: outbox depth, the oldest row's
    age, dead letters (scope `metrics:read`; empty when the store has no mirrors)."""
    provider = shared.metering.provider
    if not (isinstance(provider, Ledger) and provider.mirrored):
        return []
    return await shared.metering.mirror_status()


@router.get(
    "/health", response_model=Health, responses={503: {"model": Health, "description": "Degraded"}}
)
async def health(shared: Shared) -> Response:
    """Answers at once, asking nothing of the store: `degraded` (503) for a while after a
    request failed behind the service, so a probe sees what its callers saw."""
    problem = shared.health.problem()
    body = Health(
        status="ok" if problem is None else "degraded",
        provider=shared.metering.provider_name,
        problem=problem,
    )
    status = 200 if problem is None else 503
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


@router.get("/capabilities")
async def capabilities(_: Caller, shared: Shared) -> Capabilities:
    """Any valid key may read them: a client needs them to send usage at all.
    `max_batch_size` is at most 10,000, the most one request may carry; `refuses_lowering`
    is the service's own business (it applies it to tenant-bound keys), not a client's."""
    offered = await shared.metering.load_capabilities()
    limit = await shared.batch_limit()
    return offered.model_copy(update={"max_batch_size": limit, "refuses_lowering": False})
