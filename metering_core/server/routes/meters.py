"""`/meters`: create, list, fetch, update and delete meters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from metering_core.models import Meter, MeterCreate, MeterUpdate, Page
from metering_core.server.callers import needs
from metering_core.server.query import known_query_only
from metering_core.server.service import Service, service

router = APIRouter(prefix="/meters", dependencies=[Depends(known_query_only)])
Shared = Annotated[Service, Depends(service)]
READ = [Depends(needs("meters:read"))]
WRITE = [Depends(needs("meters:write"))]


@router.post("", status_code=201, dependencies=WRITE)
async def create_meter(meter: MeterCreate, shared: Shared) -> Meter:
    try:
        return await shared.metering.create_meter(meter)
    finally:
        shared.meter_kinds.forget()


@router.get("", dependencies=READ)
async def list_meters(
    shared: Shared,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    cursor: Annotated[str | None, Query(min_length=1)] = None,
) -> Page[Meter]:
    return await shared.metering.fetch_all_meters(limit=limit, cursor=cursor)


@router.get("/{meter_id}", dependencies=READ)
async def fetch_meter(meter_id: str, shared: Shared) -> Meter:
    return await shared.metering.fetch_meter(meter_id)


@router.put("/{meter_id}", dependencies=WRITE)
async def update_meter(meter_id: str, update: MeterUpdate, shared: Shared) -> Meter:
    return await shared.metering.update_meter(meter_id, update)


@router.delete("/{meter_id}", status_code=204, dependencies=WRITE)
async def delete_meter(meter_id: str, shared: Shared) -> Response:
    try:
        await shared.metering.delete_meter(meter_id)
    finally:
        shared.meter_kinds.forget()
    return Response(status_code=204)
