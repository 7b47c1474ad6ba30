"""The service acting as one caller: the caller's rights applied (its tenant, its id space),
then the facade called. `POST /usage`, `POST /events` and the customer routes act through
it, so a tenant-bound key is confined the same way whichever route it takes."""

from __future__ import annotations

from collections.abc import Sequence

from metering_core.errors import ValidationError
from metering_core.models import Customer, CustomerCreate, IngestResult, UsageEvent
from metering_core.server.auth import Principal
from metering_core.server.service import Service

__all__ = ["ActingAs", "check_batch"]


async def check_batch(shared: Service, field: str, count: int) -> None:
    """Refuse a request carrying more than the service's batch limit."""
    limit = await shared.batch_limit()
    if count > limit:
        raise ValidationError(
            f"{field}: {count} exceed max_batch_size={limit}", field=field, value=count
        )


class ActingAs:
    """The facade as `principal` may use it."""

    def __init__(self, shared: Service, principal: Principal) -> None:
        self.shared = shared
        self.principal = principal

    async def ingest_usage_events(self, events: Sequence[UsageEvent], /) -> IngestResult:
        """Deliver now, in the caller's id space; answer per id as the caller sent it,
        the events this caller may not write among the rejected."""
        await check_batch(self.shared, "events", len(events))
        metering = self.shared.metering
        bound = self.principal.tenant is not None
        in_store = bound and (await metering.load_capabilities()).refuses_lowering
        kinds = {}
        if bound and not in_store:  # judged by a copy of the meters (fresh within a second)
            kinds = await self.shared.meter_kinds.of({event.event_name for event in events})
        stored, sent, refused = self.principal.outgoing(events, kinds)
        answer = IngestResult()
        if stored:  # a tenant's right to a meter judged in the insert's own transaction
            answer = await metering.deliver_usage_events(stored, lowering_refused=in_store)
        result = self.principal.ingest_answer(answer, sent)
        result.rejected.update(refused)
        self.shared.metrics.count_ingested(result)
        return result

    async def create_customer(self, customer: CustomerCreate, /) -> Customer:
        self.principal.own_tenant(customer.id, "create customer")
        return await self.shared.metering.create_customer(customer)

    async def delete_customer(self, customer_id: str, /) -> None:
        self.principal.may_delete_customer()
        await self.shared.metering.delete_customer(customer_id)
