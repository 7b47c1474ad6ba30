"""`/customers`: register and remove tenants."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from metering_core.models import Customer, CustomerCreate
from metering_core.server.acting import ActingAs
from metering_core.server.auth import Principal
from metering_core.server.callers import needs
from metering_core.server.query import known_query_only
from metering_core.server.service import Service, service

router = APIRouter(prefix="/customers", dependencies=[Depends(known_query_only)])
Shared = Annotated[Service, Depends(service)]
Writer = Annotated[Principal, Depends(needs("customers:write"))]


@router.post("", status_code=201)
async def create_customer(customer: CustomerCreate, principal: Writer, shared: Shared) -> Customer:
    return await ActingAs(shared, principal).create_customer(customer)


@router.delete("/{customer_id:path}", status_code=204)
async def delete_customer(customer_id: str, principal: Writer, shared: Shared) -> Response:
    await ActingAs(shared, principal).delete_customer(customer_id)
    return Response(status_code=204)
