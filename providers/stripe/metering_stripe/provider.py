"""The Stripe provider: the ten operations on Billing Meters through the official SDK."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote_plus

import stripe

from metering_core.errors import (
    NotFoundError,
    ProviderUnavailableError,
    RateLimitedError,
    UnsupportedOperationError,
    ValidationError,
)
from metering_core.interface import BaseProvider
from metering_core.models import (
    Aggregation,
    CancelResult,
    Customer,
    CustomerCreate,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    Page,
    RefusalNotice,
    Usage,
    UsageEvent,
    UsageQuery,
)
from metering_core.rules import answer
from metering_stripe.capabilities import CAPABILITIES, FORMULAS, MAX_AGE, MAX_AHEAD
from metering_stripe.customers import TenantCustomers
from metering_stripe.deliveries import RecentDeliveries
from metering_stripe.errors import masked, translate
from metering_stripe.notices import read_notice
from metering_stripe.settings import StripeSettings
from metering_stripe.usage import fold_summaries, summary_request, unix

__all__ = ["CAPABILITIES", "StripeProvider"]

T = TypeVar("T")
logger = logging.getLogger(__name__)
AGGREGATIONS = {formula: aggregation for aggregation, formula in FORMULAS.items()}
SESSION_MARGIN = 60.0
TENANT_KEY = "tenant_id"

RELIST_EVERY = 60.0
"""Seconds after which a tenant not found has every customer listed again: a customer made
long ago may have been given a tenant's metadata since. Sooner, only the customers created
since the last listing are read (each batch naming a tenant without a customer had every
customer listed). Creating or deleting a customer lists them all first: creating must
not make a second one for a tenant whose customer was tagged by hand a moment ago.

Also how long ingestion and usage queries trust the customers they know: after that they
list the customers created since, so a tenant another process deleted and made again is
sent to its new customer, not the deleted one, from then on."""

FORGET_AFTER = 600.0
"""Seconds after which the minute's refresh lists every customer, not only the newer: a
tenant another process deleted for good is forgotten then, and its events refused here
naming the cause, rather than sent to a deleted customer (a listing costs a request a
hundred customers)."""

MAX_MAKINGS = 100
"""Makings of one customer `create_customer` tries (each a customer of the tenant made
and deleted within 24 hours, which Stripe's replay answered) before it gives up, for now."""

LISTING_SLACK = 60
"""Seconds before the newest customer a listing saw from which the next listing reads:
one another process was creating meanwhile may carry an earlier `created`."""

_LISTING_RESTARTS = 3
"""Times a customer listing starts over when the customer its last page ended on was
deleted meanwhile, before it fails as retryable."""


def _meter(obj: Any) -> Meter:
    return Meter(
        id=obj["id"],
        event_name=obj["event_name"],
        display_name=obj["display_name"],
        aggregation=AGGREGATIONS[obj["default_aggregation"]["formula"]],
        status=obj["status"],
        created_at=datetime.fromtimestamp(obj["created"], UTC),
        updated_at=datetime.fromtimestamp(obj["updated"], UTC),
    )


def _creation_key(making: Sequence[Any]) -> str:
    """The idempotency key of making a tenant's customer: the tenant's id, so that
    makings of one tenant anywhere are one making within Stripe's 24 hours (a retry, or
    another process, is answered with the same customer), then what a making found
    (`create_customer`): each customer the key had made and was deleted since, and the
    fields, when the key had made one with other fields that is gone."""
    made = json.dumps(list(making), sort_keys=True)
    return "metering-customer-" + hashlib.sha256(made.encode()).hexdigest()[:32]


def _customer(tenant: str, obj: stripe.Customer) -> Customer:
    data = obj.to_dict()
    metadata = {k: v for k, v in (data.get("metadata") or {}).items() if k != TENANT_KEY}
    return Customer(
        id=tenant,
        name=data.get("name"),
        email=data.get("email"),
        metadata=metadata,
        provider_ref=obj.id,
    )


class StripeProvider(BaseProvider):
    """Stripe Billing Meters. Ingestion `accepted` means Stripe took the request: the v2
    stream validates asynchronously, so the provider checks what it can first (meter,
    customer, timestamp window, identifiers it delivered in the last 24 hours); what Stripe
    refuses after that shows only in Stripe's meter error reports. v1 answers per event."""

    name = "stripe"
    default_capabilities = CAPABILITIES

    def __init__(self, settings: StripeSettings) -> None:
        self._settings = settings
        self._http = stripe.HTTPXClient(timeout=settings.timeout)
        self._client = self._new_client(settings.api_key.get_secret_value())
        self._stream: stripe.StripeClient | None = None
        self._session_tokens: collections.deque[str] = collections.deque(maxlen=2)
        """The session's token, and the one before: a request sent with that one may fail
        after another renewed the session, while it is still valid (review)."""
        self._stream_expires = 0.0
        self._session_lock = asyncio.Lock()
        self._meters_by_event: dict[str, Meter] = {}
        self._aggregations: dict[str, Aggregation] = {}
        """Each meter's aggregation by id, as seen: Stripe never changes a meter's (its
        update takes a display name only), so a usage query need not fetch the meter."""
        self._customers = TenantCustomers()
        self._listing = asyncio.Lock()
        """Held by the listing that ingestion and usage queries wait for: batches in
        flight share one rather than each making its own."""
        self._listed_at: float | None = None
        """When the last listing of every customer began (monotonic)."""
        self._looked_at: float | None = None
        """When the last listing of any customers began (monotonic)."""
        self._newest_listed: int | None = None
        """The newest `created` any listing saw (Stripe's clock, seconds)."""
        self._delivered = RecentDeliveries()

    def __repr__(self) -> str:
        return f"StripeProvider(base_url={self._settings.base_url!r})"

    def _secrets(self) -> tuple[str, ...]:
        """What a request carries that no message may: the key and the session token."""
        key = self._settings.api_key.get_secret_value()
        return (key, *self._session_tokens)

    def _new_client(self, key: str) -> stripe.StripeClient:
        addresses: Any = {}
        if self._settings.base_url:
            addresses["api"] = self._settings.base_url
        events_url = self._settings.meter_events_url or self._settings.base_url
        if events_url:
            addresses["meter_events"] = events_url
        return stripe.StripeClient(
            key,
            base_addresses=addresses,
            http_client=self._http,
            max_network_retries=self._settings.max_network_retries,
        )

    async def _call(self, request: Awaitable[T]) -> T:
        try:
            return await request
        except stripe.StripeError as exc:
            raise translate(exc, self._secrets()) from exc

    # meters

    async def create_meter(self, meter: MeterCreate) -> Meter:
        # The facade has checked the aggregation and dimensions against CAPABILITIES.
        formula = FORMULAS[meter.aggregation]
        if meter.description is not None:
            raise UnsupportedOperationError(
                self.name, "create_meter", "Stripe meters keep no description"
            )
        params: Any = {
            "display_name": meter.display_name or meter.event_name,
            "event_name": meter.event_name,
            "default_aggregation": {"formula": formula},
        }
        created = _meter(await self._call(self._client.v1.billing.meters.create_async(params)))
        self._meters_by_event[created.event_name] = created
        return created

    async def fetch_meter(self, meter_id: str) -> Meter:
        meter = _meter(await self._call(self._client.v1.billing.meters.retrieve_async(meter_id)))
        self._aggregations[meter.id] = meter.aggregation
        return meter

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        params: Any = {"limit": min(limit, 100)}  # Stripe's page limit; a shorter page is fine
        if cursor is not None:
            params["starting_after"] = cursor
        listing = await self._call(self._client.v1.billing.meters.list_async(params))
        items = [_meter(obj) for obj in listing.data]
        return Page[Meter](
            items=items, next_cursor=items[-1].id if listing.has_more and items else None
        )

    async def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        # The facade allows display_name only (updatable_meter_fields); it cannot be None.
        params: Any = {"display_name": update.display_name}
        return _meter(
            await self._call(self._client.v1.billing.meters.update_async(meter_id, params))
        )

    async def delete_meter(self, meter_id: str) -> None:
        """Stripe has no delete: the meter is deactivated (it then shows `inactive`)."""
        meter = _meter(await self._call(self._client.v1.billing.meters.deactivate_async(meter_id)))
        self._meters_by_event.pop(meter.event_name, None)

    async def _load_meters(self) -> None:
        """Learn every active meter's event name (one listing, however many are missing)."""
        cursor: str | None = None
        while True:
            page = await self.fetch_all_meters(limit=100, cursor=cursor)
            for meter in page.items:
                if meter.status == "active":
                    self._meters_by_event[meter.event_name] = meter
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # customers

    async def _load_customers(self, *, everyone: bool = False, newer: bool = False) -> None:
        """Find tenants' `cus_…` by listing customers' metadata (search is eventually
        consistent, so it is not relied on): after a restart, or made by another process.
        Every customer when asked, or (unless only the `newer` are asked for) once each
        `RELIST_EVERY` seconds, as one made long ago may be given a tenant's metadata
        later; else those created since the newest one the last listing saw (less
        `LISTING_SLACK`). A tenant listed is mapped to its newest customer, replacing one
        known from before (deleted since, by another process), unless the tenant changed
        while the listing ran (`TenantCustomers.listed`)."""
        began = time.monotonic()
        if not newer and (self._listed_at is None or began - self._listed_at >= RELIST_EVERY):
            everyone = True
        params: Any = {"limit": 100}
        if not everyone and self._newest_listed is not None:
            params["created"] = {"gte": self._newest_listed - LISTING_SLACK}
        since = self._customers.mark()
        found: dict[str, str] = {}
        newest = self._newest_listed
        restarts = 0
        while True:
            try:
                listing = await self._call(self._client.v1.customers.list_async(params))
            except ValidationError as exc:
                if exc.field != "starting_after":
                    raise
                # The customer the last page ended on was deleted while the listing ran,
                # and Stripe takes it as a cursor no longer: the listing starts over (a
                # tenant's customer found before the deletion is not kept), and a store
                # that keeps changing under it is a passing failure, not the caller's.
                restarts += 1
                if restarts > _LISTING_RESTARTS:
                    raise ProviderUnavailableError(
                        "Stripe's customers changed under every listing; try again",
                        provider="stripe",
                    ) from exc
                params.pop("starting_after")
                since, found, newest = self._customers.mark(), {}, self._newest_listed
                continue
            for obj in listing.data:  # newest first
                owner = (obj.to_dict().get("metadata") or {}).get(TENANT_KEY)
                if owner:
                    found.setdefault(owner, obj.id)
                newest = max(newest or obj.created, obj.created)
            if not listing.has_more or not listing.data:
                break
            params["starting_after"] = listing.data[-1]["id"]
        everyone = "created" not in params
        self._customers.listed(found, since, everyone=everyone)
        self._newest_listed = newest
        self._looked_at = began
        if everyone:
            self._listed_at = began

    async def _know_customers(self, tenants: Sequence[str]) -> None:
        """The tenants' customers looked for when not known, and those known trusted no
        longer than `RELIST_EVERY` (every customer listed each `FORGET_AFTER`). One
        listing at a time: batches queued behind one are answered by the next that begins
        after they asked. A refresh that fails leaves the customers known in use (Stripe
        may limit its customer listing while it takes meter events), and is tried again
        `RELIST_EVERY` later."""
        if not self._stale(tenants):
            return
        asked = time.monotonic()
        async with self._listing:
            if self._looked_at is not None and self._looked_at >= asked:
                return  # a listing begun since this batch asked has answered it
            if any(tenant not in self._customers for tenant in tenants):
                await self._load_customers()
            elif self._stale(tenants):
                began = time.monotonic()
                everyone = self._listed_at is None or began - self._listed_at >= FORGET_AFTER
                try:
                    await self._load_customers(everyone=everyone, newer=not everyone)
                except (ProviderUnavailableError, RateLimitedError) as exc:
                    logger.warning("Stripe customers not refreshed (%s); using those known", exc)
                    self._looked_at = time.monotonic()

    def _stale(self, tenants: Sequence[str]) -> bool:
        """Whether a tenant is not known, or what is known was listed too long ago."""
        return (
            any(tenant not in self._customers for tenant in tenants)
            or self._looked_at is None
            or time.monotonic() - self._looked_at >= RELIST_EVERY
        )

    async def _stripe_customer(self, tenant: str) -> str | None:
        """The `cus_…` of a tenant, or None when Stripe has no customer for it (listing
        every customer when it is not known: before one is made or deleted)."""
        if tenant not in self._customers:
            await self._load_customers(everyone=True)
        return self._customers.get(tenant)

    async def create_customer(self, customer: CustomerCreate) -> Customer:
        existing = await self._live_customer(customer.id)
        if existing is not None:
            return _customer(customer.id, existing)
        params: Any = {"metadata": {**customer.metadata, TENANT_KEY: customer.id}}
        if customer.name is not None:
            params["name"] = customer.name
        if customer.email is not None:
            params["email"] = customer.email
        making: list[Any] = [customer.id]
        for _ in range(MAX_MAKINGS):
            key = _creation_key(making)
            try:
                created = await self._client.v1.customers.create_async(
                    params, {"idempotency_key": key}
                )
            except stripe.IdempotencyError:
                # Stripe keeps a key 24 h, and this one made the tenant's customer with
                # other fields: by another process meanwhile (found by listing, so one
                # tenant never gets two), or deleted since (these fields make the next)
                existing = await self._live_customer(customer.id)
                if existing is not None:
                    return _customer(customer.id, existing)
                making.append(params)
                continue
            except stripe.StripeError as exc:
                raise translate(exc, self._secrets()) from exc
            if await self._retrieved(created["id"]) is not None:
                self._customers.set(customer.id, created["id"])
                return _customer(customer.id, created)
            # Stripe replayed the key's first answer: a customer of this tenant deleted
            # since. The next key is derived from it, so a retry of this making is
            # answered with the same new customer.
            making.append(created["id"])
        raise ProviderUnavailableError(
            f"customer {customer.id!r}: Stripe answered {MAX_MAKINGS} makings in a row with "
            "a deleted customer",
            provider=self.name,
        )

    async def _live_customer(self, tenant: str) -> stripe.Customer | None:
        """Stripe's live customer of `tenant`, every customer listed when it is not known
        (one tagged by hand is found); one known but deleted since (by another process)
        is forgotten, and looked for again."""
        for _ in range(2):
            reference = await self._stripe_customer(tenant)
            if reference is None:
                return None
            found = await self._retrieved(reference)
            if found is not None:
                return found
            self._customers.forget(tenant)
        return None

    async def _retrieved(self, reference: str) -> stripe.Customer | None:
        """Stripe's customer `reference`, or None if it has been deleted (Stripe answers
        one as `deleted: true`; not found, it is gone too)."""
        try:
            found = await self._call(self._client.v1.customers.retrieve_async(reference))
        except NotFoundError:
            return None
        return None if found.to_dict().get("deleted") else found

    async def delete_customer(self, customer_id: str) -> None:
        reference = await self._stripe_customer(customer_id)
        if reference is None:
            raise NotFoundError(f"no Stripe customer for tenant {customer_id!r}")
        await self._call(self._client.v1.customers.delete_async(reference))
        self._customers.forget(customer_id)

    # ingestion

    async def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        result = IngestResult()
        ready: list[tuple[UsageEvent, dict[str, Any]]] = []
        seen: set[str] = set()
        now = datetime.now(UTC)
        if any(event.event_name not in self._meters_by_event for event in events):
            await self._load_meters()
        await self._know_customers([event.customer_id for event in events])
        for event in events:
            if event.id in seen or event.id in self._delivered:
                result.duplicates.append(event.id)
                continue
            seen.add(event.id)
            reason, payload = self._prepare(event, now)
            if reason is not None:
                result.rejected[event.id] = reason
            else:
                ready.append((event, payload))
        if ready:
            sent, duplicates, rejected = await (
                self._send_stream(ready)
                if self._settings.use_event_stream
                else self._send_v1(ready)
            )
            result.accepted.extend(sent)
            result.duplicates.extend(duplicates)
            result.rejected.update(rejected)
        return result

    def _prepare(self, event: UsageEvent, now: datetime) -> tuple[str | None, dict[str, Any]]:
        """Refuse, before sending, what Stripe would refuse; else the wire payload."""
        if event.timestamp < now - MAX_AGE:
            return (
                f"timestamp {event.timestamp.isoformat()} is over 35 days ago; Stripe refuses it",
                {},
            )
        if event.timestamp > now + MAX_AHEAD:
            return (
                f"timestamp {event.timestamp.isoformat()} is over 5 min ahead; Stripe refuses it",
                {},
            )
        if event.event_name not in self._meters_by_event:
            return f"no active Stripe meter for event_name={event.event_name!r}", {}
        customer = self._customers.get(event.customer_id)
        if customer is None:
            return f"no Stripe customer for tenant {event.customer_id!r}: create_customer first", {}
        payload = {"stripe_customer_id": customer, "value": format(event.value, "f")}
        return None, {"event_name": event.event_name, "identifier": event.id, "payload": payload}

    async def _session_client(self, *, renew: bool = False) -> stripe.StripeClient:
        async with self._session_lock:
            if renew or self._stream is None or time.time() > self._stream_expires - SESSION_MARGIN:
                session = await self._call(
                    self._client.v2.billing.meter_event_session.create_async()
                )
                self._session_tokens.append(session.authentication_token)
                self._stream = self._new_client(session.authentication_token)
                expires = datetime.fromisoformat(str(session.expires_at).replace("Z", "+00:00"))
                self._stream_expires = expires.timestamp()
            return self._stream

    async def _send_stream(
        self, ready: list[tuple[UsageEvent, dict[str, Any]]]
    ) -> tuple[list[str], list[str], dict[str, str]]:
        body: Any = {
            "events": [
                {**wire, "timestamp": event.timestamp.isoformat().replace("+00:00", "Z")}
                for event, wire in ready
            ]
        }
        client = await self._session_client()
        try:
            await client.v2.billing.meter_event_stream.create_async(body)
        except stripe.TemporarySessionExpiredError:
            client = await self._session_client(renew=True)
            await self._call(client.v2.billing.meter_event_stream.create_async(body))
        except stripe.StripeError as exc:
            raise translate(exc, self._secrets()) from exc
        for event, _ in ready:
            self._delivered.add(event.id, event.event_name)
        return [event.id for event, _ in ready], [], {}

    async def _send_v1(
        self, ready: list[tuple[UsageEvent, dict[str, Any]]]
    ) -> tuple[list[str], list[str], dict[str, str]]:
        sent, duplicates, rejected = [], [], {}
        for event, wire in ready:
            try:
                params: Any = {**wire, "timestamp": unix(event.timestamp)}
                await self._client.v1.billing.meter_events.create_async(params)
            except stripe.InvalidRequestError as exc:
                if exc.code == "resource_already_exists" and exc.param == "identifier":
                    duplicates.append(event.id)
                elif exc.http_status == 400:
                    rejected[event.id] = masked(
                        f"Stripe: {exc.user_message or exc}", self._secrets()
                    )
                    continue
                else:
                    raise translate(exc, self._secrets()) from exc
            except stripe.StripeError as exc:
                raise translate(exc, self._secrets()) from exc
            else:
                sent.append(event.id)
            self._delivered.add(event.id, event.event_name)
        return sent, duplicates, rejected

    # usage

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        # The facade has refused a missing customer and any group_by (CAPABILITIES).
        assert query.customer_id is not None
        aggregation = self._aggregations.get(query.meter_id)
        if aggregation is None:  # an unknown id is NotFoundError here
            aggregation = (await self.fetch_meter(query.meter_id)).aggregation
        await self._know_customers([query.customer_id])
        customer = self._customers.get(query.customer_id)
        if customer is None:
            raise NotFoundError(f"no Stripe customer for tenant {query.customer_id!r}")
        grouping, bounds = summary_request(query)
        params: Any = {
            "customer": customer,
            "start_time": unix(query.start),
            "end_time": unix(query.end),
            "limit": 100,
        }
        if grouping is not None:
            params["value_grouping_window"] = grouping
        # The summaries as Stripe's JSON (the SDK's raw request: its retries and errors),
        # not StripeObjects: converting each had been a fifth of a reconcile's time.
        path = f"/v1/billing/meters/{quote_plus(query.meter_id)}/event_summaries"
        summaries: list[Any] = []
        while True:
            answered = await self._call(self._client.raw_request_async("get", path, **params))
            page = answered.data
            summaries.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                break
            params["starting_after"] = page["data"][-1]["id"]
        rows = fold_summaries(summaries, bounds, aggregation, query.customer_id)
        return answer(query, aggregation, rows)

    # cancellation

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        result = CancelResult()
        for event_id in event_ids:
            remembered = self._delivered.get(event_id)
            name = event_name or (remembered[0] if remembered else None)
            if name is None:
                result.rejected[event_id] = (
                    "Stripe needs the event name to cancel, and this event was not delivered "
                    "here in the last 24 hours: pass event_name"
                )
                continue
            params: Any = {"event_name": name, "type": "cancel", "cancel": {"identifier": event_id}}
            try:
                await self._client.v1.billing.meter_event_adjustments.create_async(params)
            except stripe.InvalidRequestError as exc:
                message = masked(exc.user_message or str(exc), self._secrets())
                if "24 hours" in message:
                    result.rejected[event_id] = f"Stripe: {message}"
                elif exc.http_status in (400, 404):
                    result.not_found.append(event_id)
                else:
                    raise translate(exc, self._secrets()) from exc
            except stripe.StripeError as exc:
                raise translate(exc, self._secrets()) from exc
            else:
                result.cancelled.append(event_id)
        return result

    # notices

    async def read_refusal_notice(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        recorded: Callable[[str], Awaitable[bool]] | None = None,
    ) -> RefusalNotice | None:
        """Stripe's meter error reports (by webhook): what it refused after answering.
        The events it names are forgotten as delivered here, so a retry sends them (in a
        forwarder of another process, a retry within 24 hours is answered duplicate from
        that process's memory; reconcile then shows the cell short)."""
        secret = self._settings.webhook_secret
        shown = None if secret is None else secret.get_secret_value()
        notice = await read_notice(self._client, shown, body, headers, recorded, self._secrets())
        if notice is not None:
            self._delivered.forget(notice.refused)
        return notice

    async def aclose(self) -> None:
        """Close the connection pool the API and session clients share."""
        await self._http.close_async()  # type: ignore[no-untyped-call]
