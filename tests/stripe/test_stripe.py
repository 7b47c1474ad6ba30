"""Stripe specifics: error mapping, retries, sessions, Stripe's rules, DST windows, secrets."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
import stripe
from metering_stripe import StripeProvider, StripeSettings
from metering_stripe.deliveries import RecentDeliveries
from metering_stripe.testing import FakeStripe
from metering_stripe.usage import fold_summaries, summary_request
from pydantic import SecretStr

from metering_core import (
    AsyncMetering,
    AuthenticationError,
    ConfigurationError,
    CustomerCreate,
    MeterCreate,
    Metering,
    MeterUpdate,
    NotFoundError,
    ProviderUnavailableError,
    RateLimitedError,
    UnsupportedOperationError,
    UsageEvent,
    UsageQuery,
    ValidationError,
)
from metering_core.models import Aggregation

from .conftest import API_KEY, settings_for

NOW = datetime.now(UTC).replace(second=0, microsecond=0)  # Stripe queries need minutes


Make = Callable[..., StripeProvider]


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(api_key=API_KEY) as server:
        yield server


@pytest.fixture
async def make(fake: FakeStripe) -> AsyncIterator[Make]:
    """Providers on the fake with the given options, closed after the test."""
    made: list[StripeProvider] = []

    def build(**options: object) -> StripeProvider:
        made.append(StripeProvider(settings_for(fake).model_copy(update=options)))
        return made[-1]

    yield build
    for provider in made:
        await provider.aclose()


async def setup(provider: StripeProvider, tenant: str = "acme") -> str:
    await provider.create_customer(CustomerCreate(id=tenant))
    return (await provider.create_meter(MeterCreate(event_name="api_calls"))).id


async def recent_total(provider: StripeProvider, meter_id: str, tenant: str = "acme") -> Decimal:
    """The tenant's usage of the meter within an hour of NOW, as Stripe sums it."""
    usage = await provider.fetch_usage(
        UsageQuery(
            meter_id=meter_id,
            customer_id=tenant,
            start=NOW - timedelta(hours=1),
            end=NOW + timedelta(hours=1),
        )
    )
    return usage.total


def event(event_id: str, value: int = 1, at: datetime = NOW, tenant: str = "acme") -> UsageEvent:
    return UsageEvent(
        id=event_id, event_name="api_calls", customer_id=tenant, value=value, timestamp=at
    )


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        (lambda f: f.fail_next(1, 429, {"Retry-After": "2"}), RateLimitedError),
        (lambda f: f.fail_next(1, 500), ProviderUnavailableError),
        (lambda f: f.fail_next(1, 503), ProviderUnavailableError),
        (lambda f: f.drop_next(1), ProviderUnavailableError),
    ],
)
async def test_faults_map_to_the_core_hierarchy(
    fake: FakeStripe, make: Make, inject: object, expected: type[Exception]
) -> None:
    provider = make()
    meter_id = await setup(provider)
    inject(fake)  # type: ignore[operator]
    with pytest.raises(expected) as caught:
        await provider.fetch_meter(meter_id)
    assert isinstance(caught.value.__cause__, stripe.StripeError)
    assert caught.value.retryable  # type: ignore[attr-defined]
    if isinstance(caught.value, RateLimitedError):
        assert caught.value.retry_after == 2.0


async def test_a_429_without_retry_after_and_a_403_map_too(fake: FakeStripe, make: Make) -> None:
    provider = make()
    meter_id = await setup(provider)
    fake.fail_next(1, 429, {"Stripe-Should-Retry": "true"})
    with pytest.raises(RateLimitedError) as limited:
        await provider.fetch_meter(meter_id)
    assert limited.value.retry_after is None
    fake.fail_next(1, 403)
    with pytest.raises(AuthenticationError) as forbidden:
        await provider.fetch_meter(meter_id)
    assert not forbidden.value.retryable
    assert isinstance(forbidden.value.__cause__, stripe.PermissionError)


async def test_missing_things_and_bad_keys_map_too(fake: FakeStripe, make: Make) -> None:
    with pytest.raises(NotFoundError):
        await make().fetch_meter("mtr_missing")
    wrong = make(api_key=SecretStr("sk_test_wrong_key_123456"))
    with pytest.raises(AuthenticationError) as caught:
        await wrong.fetch_meter("mtr_x")
    assert "sk_test_wrong_key_123456" not in str(caught.value)


def test_retries_through_the_pipeline_count_once(fake: FakeStripe) -> None:
    with Metering(StripeProvider(settings_for(fake)), linger=0, retry_backoff=0.001) as m:
        meter = m.create_meter(event_name="api_calls")
        m.create_customer(id="acme")
        fake.fail_next(2, 500)
        fake.drop_next(1)
        ids = m.ingest_usage_events([event(f"e{i}", 2) for i in range(5)])
        assert sorted(m.flush().accepted) == sorted(ids)
        usage = m.fetch_usage(
            meter.id,
            customer_id="acme",
            start=NOW - timedelta(hours=1),
            end=NOW + timedelta(hours=1),
        )
    assert usage.total == 10


async def test_an_expired_session_is_renewed_and_the_batch_resent(
    fake: FakeStripe, make: Make
) -> None:
    provider = make()
    meter_id = await setup(provider)
    assert (await provider.ingest_usage_events([event("a")])).accepted == ["a"]
    fake.state.expire_sessions()
    assert (await provider.ingest_usage_events([event("b")])).accepted == ["b"]
    sessions = [path for method, path in fake.requests if path == "/v2/billing/meter_event_session"]
    assert len(sessions) == 2
    assert await recent_total(provider, meter_id) == 2


async def test_a_session_is_renewed_before_its_15_minutes_run_out(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = make()
    await setup(provider)
    assert (await provider.ingest_usage_events([event("a")])).accepted == ["a"]
    later = time.time() + 15 * 60 - 30  # still valid at Stripe, but about to lapse
    clock = SimpleNamespace(time=lambda: later, monotonic=time.monotonic)
    monkeypatch.setattr("metering_stripe.provider.time", clock)
    assert (await provider.ingest_usage_events([event("b")])).accepted == ["b"]
    paths = [path for _, path in fake.requests]
    assert paths.count("/v2/billing/meter_event_session") == 2
    assert paths.count("/v2/billing/meter_event_stream") == 2  # no request wasted on expiry


async def test_a_repeated_identifier_is_a_duplicate_even_across_restarts(
    fake: FakeStripe, make: Make
) -> None:
    first = make(use_event_stream=False)
    await setup(first)
    assert (await first.ingest_usage_events([event("same")])).accepted == ["same"]
    restarted = make(use_event_stream=False)  # remembers nothing
    result = await restarted.ingest_usage_events([event("same")])
    assert (result.accepted, result.duplicates) == ([], ["same"])


async def test_timestamps_outside_stripes_window_are_refused_before_any_request(
    fake: FakeStripe,
    make: Make,
) -> None:
    provider = make()
    await setup(provider)
    before = len(fake.requests)
    result = await provider.ingest_usage_events(
        [
            event("old", at=datetime.now(UTC) - timedelta(days=36)),
            event("ahead", at=datetime.now(UTC) + timedelta(minutes=10)),
        ]
    )
    assert "35 days" in result.rejected["old"]
    assert "5 min" in result.rejected["ahead"]
    assert [p for _, p in fake.requests[before:] if "meter_event" in p] == []


async def test_a_tenant_without_a_customer_is_rejected_with_the_reason(
    fake: FakeStripe, make: Make
) -> None:
    provider = make()
    await setup(provider)
    result = await provider.ingest_usage_events([event("x", tenant="stranger")])
    assert "create_customer first" in result.rejected["x"]


async def test_strangers_in_a_batch_cost_one_lookup_not_one_per_event(
    fake: FakeStripe, make: Make
) -> None:
    provider = make()
    await setup(provider)
    before = len(fake.requests)
    strangers = [event(f"s{i}", tenant=f"stranger-{i % 3}") for i in range(30)]
    unknown = [event(f"u{i}").model_copy(update={"event_name": "nope"}) for i in range(30)]
    result = await provider.ingest_usage_events(strangers + unknown)
    assert len(result.rejected) == 60
    lookups = [path for _, path in fake.requests[before:]]
    assert lookups.count("/v1/customers") == 1
    assert lookups.count("/v1/billing/meters") == 1


async def test_the_tenant_mapping_is_found_again_after_a_restart(
    fake: FakeStripe, make: Make
) -> None:
    first = make()
    meter_id = await setup(first)
    restarted = make()
    assert (await restarted.ingest_usage_events([event("r1", 4)])).accepted == ["r1"]
    assert await recent_total(restarted, meter_id) == 4
    again = await restarted.create_customer(CustomerCreate(id="acme"))
    assert len(fake.state.customers) == 1
    assert again.provider_ref in fake.state.customers


def _old_customers(fake: FakeStripe, count: int) -> list[str]:
    """`count` customers made a day ago or more, 100 s apart, newest first, in the fake
    Stripe (not by this library); their ids."""
    made = []
    for i in range(count):
        customer = fake.state.create_customer({"name": f"old {i}"})
        customer["created"] -= 86_400 + 100 * i
        made.append(str(customer["id"]))
    return made


def _customer_listings(fake: FakeStripe, since: int = 0) -> list[str]:
    """The query strings of the customer listings asked since request `since`."""
    return [
        query
        for method, path, query in fake.queries[since:]
        if (method, path) == ("GET", "/v1/customers")
    ]


async def test_batches_naming_a_tenant_without_a_customer_list_only_the_newer_customers(
    fake: FakeStripe, make: Make
) -> None:
    """Each batch naming a tenant without a Stripe customer had every customer listed
    (250 customers, 10 batches: 30 pages); now the customers made since the last listing."""
    _old_customers(fake, 250)
    provider = make()
    await setup(provider)  # every customer listed, in three pages
    since = len(fake.queries)
    for i in range(10):
        result = await provider.ingest_usage_events([event(f"s{i}", tenant="stranger")])
        assert "create_customer first" in result.rejected[f"s{i}"]
    listings = _customer_listings(fake, since)
    assert len(listings) == 10
    assert all("created" in query for query in listings)


async def test_creating_a_customer_lists_every_customer_first_however_recent_the_last_listing(
    fake: FakeStripe, make: Make
) -> None:
    """A customer tagged with a tenant by hand a moment ago is the one `create_customer`
    answers: listing only the newer customers, it would have made a second, and that
    tenant's usage would never have reached the customer prepared for it (found in
    review)."""
    old = _old_customers(fake, 2)[1]  # the older one: before the last listing's newest
    provider = make()
    await setup(provider)  # every customer listed
    fake.state.customers[old]["metadata"] = {"tenant_id": "tagged"}
    made = await provider.create_customer(CustomerCreate(id="tagged"))
    assert made.provider_ref == old
    tagged = [c for c in fake.state.customers.values() if c["metadata"].get("tenant_id")]
    assert sorted(c["metadata"]["tenant_id"] for c in tagged) == ["acme", "tagged"]
    since = len(fake.queries)
    await provider.create_customer(CustomerCreate(id="tagged"))  # known: no listing
    assert _customer_listings(fake, since) == []
    [older] = _old_customers(fake, 1)
    fake.state.customers[older].update(created=0, metadata={"tenant_id": "tagged-too"})
    await provider.delete_customer("tagged-too")  # deleting lists every customer too
    assert older not in fake.state.customers


async def test_a_tenant_another_process_made_after_the_last_listing_is_found(
    fake: FakeStripe, make: Make
) -> None:
    _old_customers(fake, 1)
    here, there = make(), make()
    await setup(here)  # here lists every customer
    await there.create_customer(CustomerCreate(id="made-there"))
    since = len(fake.queries)
    result = await here.ingest_usage_events([event("e1", tenant="made-there")])
    assert result.accepted == ["e1"]
    [listing] = _customer_listings(fake, since)
    assert "created" in listing  # found among the customers made since, not all of them


async def test_a_customer_stamped_before_the_newest_listed_but_seen_after_is_found(
    fake: FakeStripe, make: Make
) -> None:
    """Stripe stamps `created` when a making begins, so one made by another process can
    become visible after a listing that saw a newer one: the next listing reads from a
    minute before the newest it saw (`LISTING_SLACK`), not from the newest."""
    [newest] = _old_customers(fake, 1)
    provider = make()
    await setup(provider)  # every customer listed: the newest seen is `newest`
    late = fake.state.create_customer({"metadata": {"tenant_id": "late-commit"}})
    late["created"] = fake.state.customers[newest]["created"] - 30
    result = await provider.ingest_usage_events([event("e1", tenant="late-commit")])
    assert result.accepted == ["e1"]


async def test_an_old_customer_given_a_tenant_later_is_found_once_every_customer_is_listed(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing only the newer customers misses an old one an operator gives a tenant's
    metadata, so events for that tenant are refused until the next listing of every
    customer, `RELIST_EVERY` seconds after the last, finds it."""
    old = _old_customers(fake, 2)[1]  # the older one: before the last listing's newest
    provider = make()
    await setup(provider)  # every customer listed
    fake.state.customers[old]["metadata"] = {"tenant_id": "late"}
    result = await provider.ingest_usage_events([event("e1", tenant="late")])
    assert "create_customer first" in result.rejected["e1"]
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)
    result = await provider.ingest_usage_events([event("e2", tenant="late")])
    assert result.accepted == ["e2"]


async def test_a_tenant_deleted_and_made_again_within_a_day_gets_a_live_customer(
    fake: FakeStripe, make: Make
) -> None:
    """Stripe answers a making sent again under its idempotency key (24 h) with the first
    answer: the tenant's deleted customer, whose usage Stripe would refuse (found in
    review). Made again, the tenant gets a new customer; made again under other fields,
    Stripe does not refuse the key; and its usage lands."""
    provider = make()
    meter_id = await setup(provider)
    first = (await provider.create_customer(CustomerCreate(id="churned"))).provider_ref
    await provider.delete_customer("churned")
    again = (await provider.create_customer(CustomerCreate(id="churned"))).provider_ref
    assert again != first
    assert again in fake.state.customers
    assert first not in fake.state.customers
    await provider.delete_customer("churned")
    renamed = await provider.create_customer(CustomerCreate(id="churned", name="Churned Ltd"))
    assert renamed.provider_ref not in (first, again)
    assert fake.state.customers[renamed.provider_ref]["name"] == "Churned Ltd"
    assert (await provider.ingest_usage_events([event("c1", 3, tenant="churned")])).accepted
    restarted = make()  # remembers nothing: finds the live customer by listing
    assert await recent_total(restarted, meter_id, "churned") == 3


async def test_two_processes_making_one_tenant_at_once_with_other_fields_make_one_customer(
    fake: FakeStripe, make: Make
) -> None:
    """The making's key is the tenant's: Stripe refuses it to the second making, whose
    fields differ, and that one finds the first's customer by listing (found in review:
    a key covering the fields had made two, and the tenant's usage split between them)."""
    _old_customers(fake, 150)  # a listing of two pages: time for the makings to overlap
    fake.latency = 0.02
    here, there = make(), make()
    named, plain = await asyncio.gather(
        here.create_customer(CustomerCreate(id="raced", name="Raced Ltd")),
        there.create_customer(CustomerCreate(id="raced")),
    )
    tagged = [c for c in fake.state.customers.values() if c["metadata"].get("tenant_id")]
    assert [c["id"] for c in tagged] == [named.provider_ref]
    assert plain.provider_ref == named.provider_ref


async def test_a_tenant_deleted_by_another_process_is_made_again_live_here(
    fake: FakeStripe, make: Make
) -> None:
    """One this process knows, deleted elsewhere, is looked for again (and another
    process's new customer for the tenant answered) rather than answered deleted."""
    here, there = make(), make()
    first = (await here.create_customer(CustomerCreate(id="moved"))).provider_ref
    await there.delete_customer("moved")
    again = (await here.create_customer(CustomerCreate(id="moved"))).provider_ref
    assert again != first
    assert again in fake.state.customers
    await there.delete_customer("moved")
    theirs = await there.create_customer(CustomerCreate(id="moved", name="Moved Ltd"))
    ours = await here.create_customer(CustomerCreate(id="moved"))
    assert ours.provider_ref == theirs.provider_ref
    tagged = [c for c in fake.state.customers.values() if c["metadata"].get("tenant_id")]
    assert len(tagged) == 1


async def test_usage_of_a_tenant_another_process_made_again_reaches_its_new_customer(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process trusts the customers it knows for `RELIST_EVERY` seconds, then lists
    those made since: another process that deleted a tenant and made it again has given
    it a new customer, and usage sent on to the deleted one would never be invoiced
    (found in review: it was sent there until this process made the tenant itself)."""
    _old_customers(fake, 1)
    here, there = make(), make()
    meter_id = await setup(here, "moved")
    first = here._customers.get("moved")
    since = len(fake.queries)
    assert (await here.ingest_usage_events([event("m1", 2, tenant="moved")])).accepted
    assert _customer_listings(fake, since) == []  # known, and trusted within the minute
    await there.delete_customer("moved")
    remade = await there.create_customer(CustomerCreate(id="moved", name="Moved Ltd"))
    assert remade.provider_ref != first
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)  # a minute on
    since = len(fake.queries)
    assert (await here.ingest_usage_events([event("m2", 3, tenant="moved")])).accepted
    [listing] = _customer_listings(fake, since)
    assert "created" in listing  # the customers made since, not every one
    assert await recent_total(there, meter_id, "moved") == 3
    assert await recent_total(here, meter_id, "moved") == 3


def hold_the_second_customer_page(fake: FakeStripe) -> tuple[threading.Event, threading.Event]:
    """From now, the fake holds the second customer listing request it is asked until
    the test resumes it: (read: the first page of that listing was answered, resume)."""
    second_page, resume = threading.Event(), threading.Event()
    pages = itertools.count()

    def hold(method: str, path: str) -> None:
        if (method, path) == ("GET", "/v1/customers") and next(pages) == 1:
            second_page.set()
            resume.wait(10)

    fake.chaos = hold
    return second_page, resume


async def test_a_listing_does_not_undo_a_customer_found_while_it_ran(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing maps tenants as Stripe held them when it read each page: a tenant this
    process found a new customer for while the listing ran keeps it, not the deleted
    one the listing saw."""
    for i in range(150):  # made recently: listing those made since takes two pages
        fake.state.create_customer({"name": f"other {i}"})
    here, there = make(), make()
    meter_id = await setup(here, "moved")
    first = here._customers.get("moved")
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(here.ingest_usage_events([event("m1", 4, tenant="moved")]))
    await asyncio.to_thread(read.wait, 10)  # the first page, naming `first`, is read
    await there.delete_customer("moved")
    made = (await there.create_customer(CustomerCreate(id="moved"))).provider_ref
    assert (await here.create_customer(CustomerCreate(id="moved"))).provider_ref == made
    resume.set()
    assert (await ingesting).accepted == ["m1"]
    assert first != made
    assert await recent_total(there, meter_id, "moved") == 4


async def test_a_listing_whose_page_ended_on_a_customer_deleted_meanwhile_starts_over(
    fake: FakeStripe, make: Make
) -> None:
    """Stripe takes a deleted customer as a cursor no longer: the listing that read it
    last on its first page starts over, rather than failing the caller's events as
    invalid (found as a flaky test: a tie in `created` put it there now and then)."""
    others = [fake.state.create_customer({"name": f"other {i}"})["id"] for i in range(150)]
    there = make()
    meter_id = await setup(there, "edge")
    gone = there._customers.get("edge")
    base = int(time.time()) - 1_000
    for i, other in enumerate(others):  # newest first: 99 others, then "edge", then 51
        fake.state.customers[other]["created"] = base + 2 * i
    fake.state.customers[gone]["created"] = base + 2 * 50 + 1
    here = make()  # restarted: knows no tenant
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(here.ingest_usage_events([event("x1", 2, tenant="edge")]))
    await asyncio.to_thread(read.wait, 10)  # its first page ended on the customer
    await there.delete_customer("edge")
    resume.set()
    assert "create_customer first" in (await ingesting).rejected["x1"]
    await there.create_customer(CustomerCreate(id="edge"))
    assert (await here.ingest_usage_events([event("x2", 3, tenant="edge")])).accepted
    assert await recent_total(there, meter_id, "edge") == 3


async def test_a_listing_whose_cursor_is_deleted_every_time_fails_as_retryable(
    fake: FakeStripe, make: Make
) -> None:
    """Customers deleted under every listing's cursor: after three restarts the listing
    gives up as a passing failure (the caller retries), never rejecting the events as
    invalid, and the next listing, in a calm store, finds the tenant."""
    for i in range(150):  # two pages, the tenant's customer on the first
        fake.state.create_customer({"name": f"other {i}"})
    there = make()
    meter_id = await setup(there, "calm")
    fake.state.customers[there._customers.get("calm")]["created"] += 1
    first_pages = itertools.count()

    def delete_the_cursor(method: str, path: str) -> None:
        query = parse_qs(fake.queries[-1][2])
        if (method, path) != ("GET", "/v1/customers"):
            return
        if "starting_after" in query:
            del fake.state.customers[query["starting_after"][0]]
        else:
            next(first_pages)

    fake.chaos = delete_the_cursor
    here = make()  # restarted: knows no tenant
    with pytest.raises(ProviderUnavailableError, match="changed under every listing"):
        await here.ingest_usage_events([event("c1", 2, tenant="calm")])
    assert next(first_pages) == 4  # the listing, and three restarts
    fake.chaos = None
    assert (await here.ingest_usage_events([event("c1", 2, tenant="calm")])).accepted == ["c1"]
    assert await recent_total(there, meter_id, "calm") == 2


async def test_a_listing_does_not_restore_a_customer_deleted_while_it_ran(
    fake: FakeStripe, make: Make
) -> None:
    """A listing that read a tenant's customer on its first page, while this process
    deleted that customer, leaves the tenant without one (found in review: it mapped
    the tenant to the deleted customer again, and usage went there)."""
    for i in range(150):  # a listing of two pages
        fake.state.create_customer({"name": f"other {i}"})
    there = make()
    meter_id = await setup(there, "gone")
    fake.state.customers[there._customers.get("gone")]["created"] += 1  # on the first page
    here = make()  # restarted: knows no tenant
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(here.ingest_usage_events([event("g1", 2, tenant="gone")]))
    await asyncio.to_thread(read.wait, 10)  # its first page names the customer
    await here.delete_customer("gone")
    resume.set()
    assert "create_customer first" in (await ingesting).rejected["g1"]
    made = await there.create_customer(CustomerCreate(id="gone"))  # made again, elsewhere
    assert (await here.ingest_usage_events([event("g2", 3, tenant="gone")])).accepted
    assert here._customers.get("gone") == made.provider_ref
    assert await recent_total(there, meter_id, "gone") == 3


async def test_a_tenant_of_an_old_customer_stays_known_through_the_minutes_refresh(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh lists only the customers made lately: a tenant it does not see is
    not forgotten for that (only a listing of every customer says Stripe has none)."""
    provider = make()
    await setup(provider)
    fake.state.customers[provider._customers.get("acme")]["created"] -= 86_400
    await provider.create_customer(CustomerCreate(id="newer"))
    await provider.create_customer(CustomerCreate(id="newest"))  # its listing saw "newer"
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)
    since = len(fake.queries)
    assert (await provider.ingest_usage_events([event("o1")])).accepted == ["o1"]
    [listing] = _customer_listings(fake, since)
    assert "created" in listing


async def test_a_listing_of_everyone_keeps_a_tenant_made_here_while_it_ran(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its customer was made after the listing read its first page, so the listing did
    not see it: that is no sign Stripe has none."""
    for i in range(150):  # a listing of two pages, "fresh" on the first
        fake.state.create_customer({"name": f"other {i}"})["created"] -= 10
    provider = make()
    await setup(provider)
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(provider.ingest_usage_events([event("s1", tenant="x")]))
    await asyncio.to_thread(read.wait, 10)
    made = await provider.create_customer(CustomerCreate(id="fresh"))
    resume.set()
    assert "create_customer first" in (await ingesting).rejected["s1"]
    assert provider._customers.get("fresh") == made.provider_ref


async def test_a_listing_begun_earlier_does_not_undo_what_a_later_one_found(
    fake: FakeStripe, make: Make
) -> None:
    """A batch's listing reads a tenant's customer on its first page; meanwhile another
    process deletes it and makes the tenant again, and this process's `create_customer`
    finds the new one by a listing of its own. The first listing, ending last, leaves
    that be (found in review: it mapped the tenant back to the deleted customer)."""
    for i in range(150):  # a listing of two pages, "moved" on the first
        fake.state.create_customer({"name": f"other {i}"})["created"] -= 10
    there = make()
    meter_id = await setup(there, "moved")
    here = make()  # restarted: knows no tenant
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(here.ingest_usage_events([event("u1", tenant="typo")]))
    await asyncio.to_thread(read.wait, 10)  # its first page names the customer
    await there.delete_customer("moved")
    made = (await there.create_customer(CustomerCreate(id="moved"))).provider_ref
    assert (await here.create_customer(CustomerCreate(id="moved"))).provider_ref == made
    resume.set()
    await ingesting
    assert (await here.ingest_usage_events([event("m1", 7, tenant="moved")])).accepted
    assert await recent_total(there, meter_id, "moved") == 7


async def test_batches_waiting_on_a_listing_are_answered_by_the_next_one(
    fake: FakeStripe, make: Make
) -> None:
    """Batches naming a tenant without a customer, queued behind a listing, are answered
    by the first listing that begins after they asked, not one listing each (found in
    review: 8 batches, 8 listings in turn, and known tenants' batches waited on them)."""
    _old_customers(fake, 1)
    provider = make()
    await setup(provider)
    fake.latency = 0.05
    since = len(fake.queries)
    batches = [
        provider.ingest_usage_events([event(f"k{i}"), event(f"c{i}", tenant="churned")])
        for i in range(8)
    ]
    for result in await asyncio.gather(*batches):
        assert len(result.accepted) == 1
        assert "create_customer first" in next(iter(result.rejected.values()))
    assert len(_customer_listings(fake, since)) == 2


async def test_a_listing_begun_earlier_does_not_restore_what_a_later_one_forgot(
    fake: FakeStripe, make: Make
) -> None:
    """A later listing of every customer found the tenant's customer gone; an earlier
    listing, which read it on its first page and ends last, does not bring it back."""
    for i in range(150):  # a listing of two pages, "gone" on the first
        fake.state.create_customer({"name": f"other {i}"})["created"] -= 10
    there = make()
    await setup(there, "gone")
    here = make()
    await here.create_customer(CustomerCreate(id="gone"))  # found: there made it
    read, resume = hold_the_second_customer_page(fake)
    ingesting = asyncio.create_task(here.ingest_usage_events([event("u1", tenant="typo")]))
    await asyncio.to_thread(read.wait, 10)  # its first page names the customer
    await there.delete_customer("gone")
    with pytest.raises(NotFoundError):
        await here.delete_customer("nobody")  # a listing of everyone: "gone" has none now
    resume.set()
    await ingesting
    result = await here.ingest_usage_events([event("g1", tenant="gone")])
    assert "create_customer first" in result.rejected["g1"]


async def test_a_tenant_deleted_elsewhere_is_forgotten_at_the_next_listing_of_everyone(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its events are then refused here, naming the cause, rather than sent to a deleted
    customer and refused by Stripe after it answered: from a listing for a tenant not
    known, or the refresh's listing of everyone, `FORGET_AFTER` seconds after the last
    (found in review: a process naming only known tenants never forgot it)."""
    here, there = make(), make()
    await setup(here, "left")
    await here.create_customer(CustomerCreate(id="stays"))
    await there.delete_customer("left")
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)
    result = await here.ingest_usage_events([event("l1", tenant="left"), event("s1", tenant="x")])
    assert "create_customer first" in result.rejected["l1"]
    await here.create_customer(CustomerCreate(id="left"))
    await there.delete_customer("left")
    batch = [event("l2", tenant="left"), event("s2", tenant="stays")]
    assert (await here.ingest_usage_events(batch)).accepted == ["l2", "s2"]  # within 10 min
    monkeypatch.setattr("metering_stripe.provider.FORGET_AFTER", 0.0)
    batch = [event("l3", tenant="left"), event("s3", tenant="stays")]
    result = await here.ingest_usage_events(batch)
    assert result.accepted == ["s3"]
    assert "create_customer first" in result.rejected["l3"]


async def test_known_tenants_usage_is_sent_while_stripe_refuses_to_list_customers(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The minute's refresh is for tenants made again elsewhere: while Stripe refuses
    listings (its read limit, an outage of its API but not of its meter events), the
    customers known are used and the refresh waits another minute (found in review:
    every batch failed, and its events went to the dead letters)."""
    provider = make()
    meter_id = await setup(provider)
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.0)

    def refuse_listings(method: str, path: str) -> str | None:
        return "fail" if (method, path) == ("GET", "/v1/customers") else None

    fake.chaos = refuse_listings
    since = len(fake.queries)
    assert (await provider.ingest_usage_events([event("k1", 4)])).accepted == ["k1"]
    assert _customer_listings(fake, since)  # tried, and refused
    assert await recent_total(provider, meter_id) == 4


async def test_batches_in_flight_share_the_minutes_refresh(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each had listed the customers itself (found in review: 8 batches, 8 listings)."""
    _old_customers(fake, 1)
    provider = make()
    await setup(provider)
    monkeypatch.setattr("metering_stripe.provider.RELIST_EVERY", 0.5)
    await asyncio.sleep(0.5)
    fake.latency = 0.05
    since = len(fake.queries)
    batches = [provider.ingest_usage_events([event(f"b{i}")]) for i in range(8)]
    assert all(result.accepted for result in await asyncio.gather(*batches))
    assert len(_customer_listings(fake, since)) == 1


async def test_a_known_customer_stripe_no_longer_has_is_replaced_by_a_live_one(
    fake: FakeStripe, make: Make
) -> None:
    """Stripe answers 404 for a customer it does not have (not a deleted one's stub)."""
    provider = make()
    gone = (await provider.create_customer(CustomerCreate(id="purged"))).provider_ref
    del fake.state.customers[gone]
    made = await provider.create_customer(CustomerCreate(id="purged"))
    assert made.provider_ref != gone
    assert made.provider_ref in fake.state.customers


async def test_usage_by_customer_fetches_a_meter_once_and_never_an_unknown_ones_usage(
    fake: FakeStripe, make: Make
) -> None:
    """A meter's aggregation is fixed on Stripe: asked usage per customer (as reconcile
    asks), a provider fetches the meter the first time only; an unknown id is NotFound."""
    first = make()
    meter_id = await setup(first)
    await first.create_customer(CustomerCreate(id="globex"))
    await first.ingest_usage_events([event("a1", 3), event("g1", 5, tenant="globex")])
    provider = make()  # knows nothing of the meter yet
    window = {"start": NOW - timedelta(hours=1), "end": NOW + timedelta(hours=1)}
    before = len(fake.requests)
    totals = {
        tenant: (
            await provider.fetch_usage(UsageQuery(meter_id=meter_id, customer_id=tenant, **window))
        ).total
        for tenant in ("acme", "globex", "acme")
    }
    assert totals == {"acme": 3, "globex": 5}
    fetched = [
        path for _, path in fake.requests[before:] if path == f"/v1/billing/meters/{meter_id}"
    ]
    assert len(fetched) == 1
    with pytest.raises(NotFoundError):
        await provider.fetch_usage(UsageQuery(meter_id="mtr_unknown", customer_id="acme", **window))


async def test_refusals_happen_before_any_request(fake: FakeStripe, make: Make) -> None:
    provider = make()
    meter_id = await setup(provider)
    facade = AsyncMetering(provider)  # the facade checks the provider's capabilities
    before = len(fake.requests)
    with pytest.raises(UnsupportedOperationError, match="aggregation='max' is not supported"):
        await facade.create_meter(MeterCreate(event_name="peak", aggregation="max"))
    with pytest.raises(UnsupportedOperationError, match="cannot change description"):
        await facade.update_meter(meter_id, MeterUpdate(description="x"))
    with pytest.raises(UnsupportedOperationError, match="keeps no dimensions"):
        await facade.create_meter(MeterCreate(event_name="regional", dimensions=["region"]))
    assert len(fake.requests) == before


async def test_pages_over_stripes_limit_and_cleared_display_names(
    fake: FakeStripe, make: Make
) -> None:
    provider = make()
    for i in range(102):
        await provider.create_meter(MeterCreate(event_name=f"m{i}"))
    page = await provider.fetch_all_meters(limit=500)
    assert len(page.items) == 100
    rest = await provider.fetch_all_meters(limit=500, cursor=page.next_cursor)
    assert len(rest.items) == 2
    assert rest.next_cursor is None
    with pytest.raises(ValidationError, match="display_name=None"):
        await provider.update_meter(page.items[0].id, MeterUpdate(display_name=None))


@pytest.mark.parametrize("stream", [True, False], ids=["v2-stream", "v1-events"])
async def test_what_accepted_means_when_stripe_refuses_after_our_checks(
    fake: FakeStripe, make: Make, stream: bool
) -> None:
    provider = make(use_event_stream=stream)
    meter_id = await setup(provider)
    await make().delete_meter(meter_id)  # deactivated elsewhere: this provider's cache is stale
    result = await provider.ingest_usage_events([event("stale")])
    if stream:  # the stream validates after answering: accepted means handed to Stripe
        assert result.accepted == ["stale"]
        assert [e["identifier"] for e in fake.state.stream_errors] == ["stale"]
    else:  # v1 validates before answering: Stripe's reason comes back per event
        assert "No active meter" in result.rejected["stale"]


async def test_delete_deactivates(fake: FakeStripe, make: Make) -> None:
    provider = make()
    meter_id = await setup(provider)
    await provider.delete_meter(meter_id)
    assert (await provider.fetch_meter(meter_id)).status == "inactive"
    result = await provider.ingest_usage_events([event("late")])
    assert "no active Stripe meter" in result.rejected["late"]


async def test_events_older_than_24_hours_cannot_be_cancelled(
    fake: FakeStripe, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = make()
    await setup(provider)
    await provider.ingest_usage_events([event("old"), event("fresh")])
    fake.state.events["old"].received -= 25 * 3600  # Stripe received it over a day ago
    result = await provider.cancel_usage_events(["old", "fresh"])
    assert result.cancelled == ["fresh"]
    assert "24 hours" in result.rejected["old"]
    later = time.time() + 25 * 3600
    monkeypatch.setattr("metering_stripe.deliveries.time.time", lambda: later)
    forgotten = await provider.cancel_usage_events(["fresh"])
    assert "pass event_name" in forgotten.rejected["fresh"]


async def test_an_identifier_sent_again_after_a_day_is_billed_again(
    fake: FakeStripe, make: Make
) -> None:
    """Stripe holds an identifier unique over a day, no longer: sent again after, it is
    another event, and both count. The fake replaced the first, so a double count went
    unseen by every test of one (probe)."""
    first = make()
    meter_id = await setup(first)
    assert (await first.ingest_usage_events([event("again", 3)])).accepted == ["again"]
    fake.state.events["again"].received -= 25 * 3600
    later = make()  # another process: nothing it remembers answers duplicate
    assert (await later.ingest_usage_events([event("again", 3)])).accepted == ["again"]
    assert await recent_total(later, meter_id) == 6


def test_recent_deliveries_forget_after_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    recent = RecentDeliveries()
    recent.add("a", "api_calls")
    assert recent.get("a") is not None
    monkeypatch.setattr(
        "metering_stripe.deliveries.time.time", lambda: time.time_ns() / 1e9 + 24 * 3600 + 1
    )
    assert "a" not in recent


def summary(start: datetime, value: float) -> dict[str, object]:
    return {
        "start_time": int(start.timestamp()),
        "end_time": int(start.timestamp()) + 3600,
        "aggregated_value": value,
    }


def test_paris_days_and_months_across_the_autumn_dst_change_come_from_hours() -> None:
    # 25 October 2026: Paris goes back from UTC+2 to UTC+1, so that local day has 25 hours.
    query = UsageQuery(
        meter_id="m",
        customer_id="acme",
        start=datetime(2026, 10, 24, 22, tzinfo=UTC),
        end=datetime(2026, 10, 26, 23, tzinfo=UTC),
        window="day",
        tz="Europe/Paris",
    )
    grouping, bounds = summary_request(query)
    assert grouping == "hour"
    assert bounds == [
        datetime(2026, 10, 24, 22, tzinfo=UTC),
        datetime(2026, 10, 25, 23, tzinfo=UTC),
        datetime(2026, 10, 26, 23, tzinfo=UTC),
    ]
    hours = [
        summary(datetime(2026, 10, 25, 22, tzinfo=UTC), 1.5),
        summary(datetime(2026, 10, 25, 23, tzinfo=UTC), 2.0),
    ]
    rows = fold_summaries(hours, bounds, Aggregation.SUM, "acme")
    assert [(r.start, r.value) for r in rows] == [
        (bounds[0], Decimal("1.5")),
        (bounds[1], Decimal("2.0")),
    ]
    month = UsageQuery(
        meter_id="m",
        customer_id="acme",
        start=datetime(2026, 9, 30, 22, tzinfo=UTC),
        end=datetime(2026, 11, 30, 23, tzinfo=UTC),
        window="month",
        tz="Europe/Paris",
    )
    grouping, bounds = summary_request(month)
    assert (grouping, bounds[1]) == ("hour", datetime(2026, 10, 31, 23, tzinfo=UTC))
    latest = fold_summaries(
        [
            summary(datetime(2026, 10, 31, 22, tzinfo=UTC), 7),
            summary(datetime(2026, 10, 31, 23, tzinfo=UTC), 9),
        ],
        bounds,
        Aggregation.LATEST,
        "acme",
    )
    assert [r.value for r in latest] == [
        7,
        9,
    ]  # 22:00Z is still October in Paris, 23:00Z is November


def test_each_summary_counts_in_its_own_window_once_and_none_outside_the_range() -> None:
    """Summaries in any order: one on a window's first second is that window's, one
    before the range or on its end is none's, a window without any has no row, and
    latest takes the one that starts last."""
    day = [datetime(2026, 11, d, tzinfo=UTC) for d in (1, 2, 3, 4)]
    given = [
        summary(day[2] - timedelta(hours=1), 4),  # the 2nd's last hour
        summary(day[0], 1),  # the 1st's first second
        summary(day[3], 100),  # on the range's end: outside
        summary(day[0] - timedelta(hours=1), 1000),  # before the range
        summary(day[1], 2),
        summary(day[0] + timedelta(hours=5), 8),
    ]
    bounds = [day[0], day[1], day[2], day[3]]
    added = fold_summaries(given, bounds, Aggregation.SUM, "acme")
    assert [(r.start, r.end, r.value) for r in added] == [
        (day[0], day[1], Decimal(9)),
        (day[1], day[2], Decimal(6)),
    ]
    last = fold_summaries(given, bounds, Aggregation.LATEST, "acme")
    assert [(r.start, r.value) for r in last] == [(day[0], Decimal(8)), (day[1], Decimal(4))]


def test_a_float_stripe_sums_to_reads_as_the_exact_decimal_the_ledger_holds() -> None:
    """Stripe answers `aggregated_value` as a float: 0.1 + 0.2 is 0.30000000000000004
    there, which read as such would be drift against the ledger's 0.3 for ever, and a
    repair of 1E-16 at every reconcile (probe)."""
    day = [datetime(2026, 11, d, tzinfo=UTC) for d in (1, 2, 3)]
    given = [summary(day[0], 0.1 + 0.2), summary(day[1], 0.1 + 0.7), summary(day[1], 1e20)]
    added = fold_summaries(given, day, Aggregation.SUM, "acme")
    assert [r.value for r in added] == [Decimal("0.3"), Decimal("0.8") + Decimal("1E+20")]
    assert str(added[0].value) == "0.3"
    counted = fold_summaries([summary(day[0], 3.0000000000000004)], day, Aggregation.COUNT, "a")
    assert [str(r.value) for r in counted] == ["3"]
    whole = fold_summaries([summary(day[0], 1234567890123456.0)], day, Aggregation.SUM, "a")
    assert [r.value for r in whole] == [Decimal(1234567890123456)]  # all 16 digits


def test_utc_days_use_day_summaries_and_unaligned_ranges_are_refused() -> None:
    day = UsageQuery(
        meter_id="m",
        customer_id="c",
        start=datetime(2026, 11, 1, tzinfo=UTC),
        end=datetime(2026, 11, 3, tzinfo=UTC),
        window="day",
    )
    assert summary_request(day)[0] == "day"
    with pytest.raises(ValidationError) as caught:
        summary_request(day.model_copy(update={"start": datetime(2026, 11, 1, 0, 30, tzinfo=UTC)}))
    assert caught.value.field == "start"
    with pytest.raises(ValidationError, match="tz='Asia/Kolkata'"):
        summary_request(day.model_copy(update={"tz": "Asia/Kolkata"}))


async def test_non_utc_day_windows_end_to_end(fake: FakeStripe, make: Make) -> None:
    provider = make()
    meter_id = await setup(provider)
    tokyo_midnight = (NOW + timedelta(hours=9)).replace(hour=0, minute=0, second=0) - timedelta(
        hours=9
    )
    if tokyo_midnight + timedelta(minutes=30) > NOW:  # Stripe refuses events ahead of now
        tokyo_midnight -= timedelta(days=1)
    await provider.ingest_usage_events(
        [
            event("t1", 3, tokyo_midnight - timedelta(minutes=30)),
            event("t2", 4, tokyo_midnight + timedelta(minutes=30)),
        ]
    )
    query = UsageQuery(
        meter_id=meter_id,
        customer_id="acme",
        start=tokyo_midnight - timedelta(days=1),
        end=tokyo_midnight + timedelta(days=1),
        window="day",
        tz="Asia/Tokyo",
    )
    rows = (await provider.fetch_usage(query)).rows
    assert [(r.start, r.value) for r in rows] == [
        (tokyo_midnight - timedelta(days=1), Decimal(3)),
        (tokyo_midnight, Decimal(4)),
    ]


def test_the_fake_refuses_unknown_parameters_like_stripe(fake: FakeStripe) -> None:
    http = stripe.HTTPXClient(allow_sync_methods=True)
    client = stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, http_client=http)
    unknown: Any = {
        "display_name": "x",
        "event_name": "x",
        "default_aggregation": {"formula": "sum"},
        "aggregation": "sum",
    }
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: aggregation"):
        client.v1.billing.meters.create(unknown)
    bad_formula: Any = {
        "display_name": "x",
        "event_name": "x",
        "default_aggregation": {"formula": "max"},
    }
    with pytest.raises(stripe.InvalidRequestError, match="default_aggregation"):
        client.v1.billing.meters.create(bad_formula)
    http.close()  # type: ignore[no-untyped-call]


def test_the_fake_replays_an_idempotency_key_and_refuses_it_with_other_parameters(
    fake: FakeStripe,
) -> None:
    http = stripe.HTTPXClient(allow_sync_methods=True)
    client = stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, http_client=http)
    once = {"idempotency_key": "k1"}
    first = client.v1.customers.create({"name": "a"}, once)
    assert client.v1.customers.create({"name": "a"}, once).id == first.id
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        client.v1.customers.create({"name": "b"}, once)
    assert len(fake.state.customers) == 1
    http.close()  # type: ignore[no-untyped-call]


async def test_the_api_key_never_shows_in_debug_logs(
    fake: FakeStripe, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = make()
    await setup(provider)
    await provider.ingest_usage_events([event("logged")])
    with pytest.raises(AuthenticationError):
        await make(api_key=SecretStr(API_KEY + "x")).fetch_meter("mtr_x")
    assert "meter_event" in caplog.text  # the SDK did log its requests
    assert API_KEY not in caplog.text


def test_the_api_key_never_shows(fake: FakeStripe) -> None:
    settings = settings_for(fake)
    for text in (repr(settings), str(settings), repr(StripeProvider(settings))):
        assert API_KEY not in text
    with pytest.raises(ConfigurationError) as caught:
        Metering("stripe", api_key=12345678901234, base_url=fake.url)
    assert "12345678901234" not in str(caught.value)


def test_configured_by_environment_through_the_entry_point(
    fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_PROVIDER", "stripe")
    monkeypatch.setenv("METERING_STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("METERING_STRIPE_BASE_URL", fake.url)
    with Metering(linger=0) as m:
        assert m.provider_name == "stripe"
        assert not m.capabilities.group_by
        meter = m.create_meter(event_name="env_calls", display_name="Env calls")
        with pytest.raises(ValidationError, match="customer_id"):
            m.fetch_usage(meter.id, start=NOW - timedelta(hours=1), end=NOW)


ECHOED_KEY = "sk_test_echoed_by_a_proxy_0123456789"


def _echoing(status: int, said: str) -> Callable[[httpx.Request], httpx.Response]:
    """A server at `base_url` that is not Stripe, quoting the credential it was sent."""

    def answer(request: httpx.Request) -> httpx.Response:
        sent = request.headers["Authorization"]
        error = {"type": "invalid_request_error", "message": f"{said}: {sent}"}
        return httpx.Response(status, json={"error": error})

    return answer


@respx.mock
async def test_a_server_echoing_the_key_never_puts_it_in_an_error_its_cause_or_a_reason() -> None:
    """Stripe masks keys in its messages; a proxy or mock at `base_url` may not, and the
    message went into every log line and dead letter that quoted it (probe)."""
    base = "http://stripe-proxy.test"
    respx.get(f"{base}/v1/billing/meters/mtr_x").mock(side_effect=_echoing(401, "Invalid key"))
    respx.post(f"{base}/v1/billing/meter_event_adjustments").mock(
        side_effect=_echoing(400, "older than 24 hours, and your key is")
    )
    settings = StripeSettings(api_key=SecretStr(ECHOED_KEY), base_url=base)
    provider = StripeProvider(settings)
    try:
        with pytest.raises(AuthenticationError) as caught:
            await provider.fetch_meter("mtr_x")
        cancelled = await provider.cancel_usage_events(["e1"], event_name="api_calls")
    finally:
        await provider.aclose()

    shown = [
        str(caught.value),
        "".join(traceback.format_exception(caught.value)),  # the SDK's error is its cause
        repr(caught.value.__cause__),
        cancelled.rejected["e1"],
    ]
    assert "Invalid key: Bearer **********" in shown[0]
    assert "24 hours" in shown[3]
    assert not [text for text in shown if ECHOED_KEY in text]


async def test_a_session_token_renewed_while_a_request_used_it_is_masked_too() -> None:
    """A batch sent with the session's token fails after another batch renewed the
    session (a minute before it ends): that token is still valid, and was shown (review)."""
    base, first = "http://stripe-proxy.test", "ek_test_first_session_token_abcdef"
    tokens = iter([first, "ek_test_second_session_token_uvwxyz"])

    def session(request: httpx.Request) -> httpx.Response:
        token = next(tokens)
        lasts = timedelta(seconds=60.5) if token == first else timedelta(minutes=15)
        body = {
            "object": "v2.billing.meter_event_session",
            "id": "mes_1",
            "authentication_token": token,
            "created": datetime.now(UTC).isoformat(),
            "expires_at": (datetime.now(UTC) + lasts).isoformat().replace("+00:00", "Z"),
            "livemode": False,
        }
        return httpx.Response(200, json=body)

    async def stream(request: httpx.Request) -> httpx.Response:
        if first in request.headers["Authorization"]:
            await asyncio.sleep(1.0)  # the other batch renews the session meanwhile
            return _echoing(400, "bad request")(request)
        return httpx.Response(200, json={})

    wire = {"event_name": "calls", "identifier": "e1", "payload": {"value": "1"}}
    ready = [(event("e1", 1), wire)]
    provider = StripeProvider(StripeSettings(api_key=SecretStr(ECHOED_KEY), base_url=base))
    with respx.mock:
        respx.post(f"{base}/v2/billing/meter_event_session").mock(side_effect=session)
        respx.post(f"{base}/v2/billing/meter_event_stream").mock(side_effect=stream)

        async def later() -> Any:
            await asyncio.sleep(0.6)
            return await provider._send_stream(ready)

        try:
            failed, sent = await asyncio.gather(
                provider._send_stream(ready), later(), return_exceptions=True
            )
        finally:
            await provider.aclose()
    assert sent == (["e1"], [], {})
    assert isinstance(failed, ValidationError)
    assert "bad request: Bearer **********" in str(failed)
    assert first not in "".join(traceback.format_exception(failed))
