"""Notices the ledger's mirrors send by webhook: Stripe's reports of meter events it
refused after answering 200. No API key: the provider's signature is the credential, and
a notice that does not verify (or is too old: a replay) is a 400 that records nothing."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from metering_core.errors import ValidationError, clip
from metering_core.interface import Ledger
from metering_core.server.query import known_query_only
from metering_core.server.schemas import NoticeAnswer
from metering_core.server.service import Service, service

router = APIRouter(dependencies=[Depends(known_query_only)])
Shared = Annotated[Service, Depends(service)]


@router.post(
    "/webhooks/{source}",
    response_model=NoticeAnswer,
    responses={400: {"description": "The signature does not verify, or is too old"}},
)
async def notice(source: Literal["stripe"], request: Request, shared: Shared) -> JSONResponse:
    """A signed notice from the ledger's mirror of this provider (Stripe: the
    `v1.billing.meter.error_report_triggered` and `v1.billing.meter.no_meter_found` thin
    events, with `Stripe-Signature`): the sampled events it refused become that mirror's
    dead letters. Other kinds of notice are acknowledged and ignored."""
    provider = shared.metering.provider
    if not (isinstance(provider, Ledger) and provider.mirrored):
        raise HTTPException(404, "this service has no mirrors to take notices from")
    body = await request.body()
    try:
        recorded = await shared.metering.receive_mirror_notice(source, body, dict(request.headers))
    except ValidationError as exc:
        error = {"type": "validation_error", "message": clip(str(exc)), "field": exc.field}
        return JSONResponse({"error": error}, status_code=400)
    return JSONResponse(NoticeAnswer(recorded=recorded).model_dump())
