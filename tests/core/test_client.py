"""The facades: models or keyword fields, capability checks before any call, delivery reports."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from metering_core import (
    AsyncMetering,
    IngestResult,
    MeterCreate,
    Metering,
    ProviderError,
    UnsupportedOperationError,
    UsageEvent,
    ValidationError,
    hookimpl,
    register_plugin,
)
from metering_core.memory import MemoryProvider
from metering_core.models import EventQuery, Page, StoredEvent
from metering_core.plugins import unregister_plugin

from .conftest import RecordingProvider, RecordingSettings

NOW = datetime.now(UTC)


@pytest.fixture
def provider() -> RecordingProvider:
    return RecordingProvider(RecordingSettings(api_key="k"))


@pytest.fixture
def metering(provider: RecordingProvider) -> Iterator[Metering]:
    with Metering(provider) as m:
        yield m


def delivered(provider: RecordingProvider) -> list[str]:
    return [event.id for batch in provider.batches for event in batch]


def test_a_model_or_its_fields_give_the_same_meter(metering: Metering) -> None:
    by_fields = metering.create_meter(event_name="api_calls", display_name="API calls")
    by_model = metering.create_meter(MeterCreate(event_name="api_calls", display_name="API calls"))
    by_mapping = metering.create_meter({"event_name": "api_calls", "display_name": "API calls"})
    assert by_fields.display_name == by_model.display_name == by_mapping.display_name == "API calls"


def test_model_and_fields_together_are_refused(metering: Metering) -> None:
    with pytest.raises(TypeError, match="not both"):
        metering.create_meter(MeterCreate(event_name="a"), display_name="b")


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda m: m.create_meter(event_name="p", aggregation="max"), "aggregation='max'"),
        (lambda m: m.create_meter(event_name="p", dimensions=["region"]), "dimensions"),
        (lambda m: m.update_meter("m1", description="d"), "cannot change description"),
        (
            lambda m: m.fetch_usage(
                "m1", customer_id="t", start=NOW, end=NOW + timedelta(1), window="hour"
            ),
            "window='hour'",
        ),
        (
            lambda m: m.fetch_usage(
                "m1", customer_id="t", start=NOW, end=NOW + timedelta(1), group_by=["r"]
            ),
            "group_by",
        ),
        (lambda m: m.delete_customer("t1"), "delete_customer"),
        (lambda m: m.cancel_usage_events(["e1"]), "cancel_usage_events"),
        (
            lambda m: m.fetch_usage(
                "m1", customer_id="t", start=NOW, end=NOW + timedelta(1), filters={"r": ["eu"]}
            ),
            "cannot filter usage",
        ),
        (
            lambda m: m.fetch_usage(
                "m1", customer_id="t", start=NOW, end=NOW + timedelta(1), customer_ids=["t"]
            ),
            "customer_ids=('t',)",
        ),
        (
            lambda m: m.fetch_usage(
                "m1", customer_id="t", start=NOW, end=NOW + timedelta(1), window="minute"
            ),
            "window='minute'",
        ),
        (
            lambda m: m.list_usage_events("m1", start=NOW, end=NOW + timedelta(1)),
            "list_usage_events",
        ),
    ],
)
def test_unsupported_requests_fail_fast_naming_provider_and_gap(
    metering: Metering, provider: RecordingProvider, call: object, says: str
) -> None:
    with pytest.raises(UnsupportedOperationError) as caught:
        call(metering)  # type: ignore[operator]
    assert "'recording'" in str(caught.value)
    assert says in str(caught.value)
    assert provider.calls == []


def test_a_provider_that_needs_a_customer_gets_one(
    metering: Metering, provider: RecordingProvider
) -> None:
    with pytest.raises(ValidationError) as caught:
        metering.fetch_usage("m1", start=NOW, end=NOW + timedelta(days=1))
    assert caught.value.field == "customer_id"
    assert provider.calls == []
    metering.fetch_usage(
        "m1", customer_id="t1", start=NOW, end=NOW + timedelta(days=1), window="day"
    )
    assert provider.calls == ["fetch_usage"]


def test_ingest_returns_ids_in_order_and_flush_reports_each(
    metering: Metering, provider: RecordingProvider
) -> None:
    given = UsageEvent(id="given-id", event_name="api_calls", customer_id="t1")
    single = metering.ingest_usage_event(event_name="api_calls", customer_id="t1", value=2)
    ids = metering.ingest_usage_events(
        [
            given,
            {"event_name": "api_calls", "customer_id": "t2"},
            *[{"event_name": "b", "customer_id": "t"}] * 4,
        ]
    )
    assert ids[0] == "given-id"
    assert len(set(ids)) == 6
    report = metering.flush()
    assert sorted(report.accepted) == sorted([single, *ids])
    assert sorted(delivered(provider)) == sorted([single, *ids])
    assert all(len(batch) <= 3 for batch in provider.batches)
    assert metering.flush() == IngestResult()


def test_one_bad_row_sends_nothing_and_names_its_index(
    metering: Metering, provider: RecordingProvider
) -> None:
    rows = [
        {"event_name": "api_calls", "customer_id": "t1"},
        {"event_name": "api_calls", "customer_id": "t1", "value": "x"},
    ]
    with pytest.raises(ValidationError) as caught:
        metering.ingest_usage_events(rows)
    assert caught.value.field == "events[1].value"
    assert "'x'" in str(caught.value)
    metering.flush()
    assert provider.batches == []


def test_cancel_refuses_a_bare_string(provider: RecordingProvider) -> None:
    with (
        Metering(_FullRecording(provider.settings)) as m,
        pytest.raises(ValidationError, match="list of ids"),
    ):
        m.cancel_usage_events("e1")


async def test_a_cancel_sees_what_was_ingested_just_before_and_leaves_the_report() -> None:
    """An event still queued when its cancel arrives was reported not found, then
    delivered and counted; now the queue goes first, and the next flush still reports it."""
    async with AsyncMetering("memory", linger=60) as m:
        await m.create_meter(event_name="calls")
        sent = UsageEvent(id="e1", event_name="calls", customer_id="acme", timestamp=NOW)
        await m.ingest_usage_events([sent])

        answer = await m.cancel_usage_events(["e1"])

        assert (answer.cancelled, answer.not_found) == (["e1"], [])
        assert (await m.flush()).accepted == ["e1"]


class _FullRecording(RecordingProvider):
    default_capabilities = RecordingProvider.default_capabilities.model_copy(
        update={
            "operations": RecordingProvider.default_capabilities.operations
            | {"cancel_usage_events"}
        }
    )


def test_usage_delivered_hook_fires_per_batch_with_the_provider_name(metering: Metering) -> None:
    seen: list[tuple[str, IngestResult]] = []

    class Observer:
        @hookimpl
        def usage_delivered(self, provider: str, result: IngestResult) -> None:
            seen.append((provider, result))

    observer = Observer()
    register_plugin(observer, name="observer")
    try:
        ids = metering.ingest_usage_events([{"event_name": "a", "customer_id": "t"}] * 5)
        metering.flush()
    finally:
        unregister_plugin(observer)
    assert {name for name, _ in seen} == {"recording"}
    assert sorted(i for _, result in seen for i in result.accepted) == sorted(ids)


async def test_async_facade_built_outside_a_loop_works_inside_one() -> None:
    provider = RecordingProvider(RecordingSettings(api_key="k"))
    metering = AsyncMetering(provider)
    async with metering:
        event_id = await metering.ingest_usage_event(event_name="api_calls", customer_id="t1")
        meters = [meter async for meter in metering.iter_meters()]
        report = await metering.flush()
    assert report.accepted == [event_id]
    assert meters == []
    assert repr(metering) == "<AsyncMetering provider='recording'>"


def test_the_two_facades_expose_the_same_methods_with_the_same_signatures() -> None:
    import inspect

    from metering_core import AsyncMetering, Metering

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("_") and name != "start"
        }

    synchronous, asynchronous = public(Metering), public(AsyncMetering)
    assert sorted(synchronous) == sorted(asynchronous)
    assert synchronous == asynchronous
    for name in synchronous:
        assert getattr(Metering, name).__doc__ == getattr(AsyncMetering, name).__doc__, name


def test_every_sync_facade_shares_one_loop_thread() -> None:
    import threading

    from metering_core import Metering

    facades = [Metering("memory") for _ in range(5)]
    loops = [t for t in threading.enumerate() if t.name == "metering-loop"]
    for facade in facades:
        facade.close()
    assert len(loops) == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"filters": {"region": "eu"}}, "filters.region"), ({"customer_ids": "acme"}, "customer_ids")],
)
def test_a_list_given_as_one_string_is_refused_not_read_letter_by_letter(
    metering: Metering, provider: RecordingProvider, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        metering.fetch_usage("m1", customer_id="t", start=NOW, end=NOW + timedelta(1), **fields)
    assert caught.value.field == field
    assert provider.calls == []


class _Unfiltering(MemoryProvider):
    """A provider that lists events, states it filters, and ignores what it was asked to
    leave out (a plugin written before listings took `customer_ids`, or a service behind
    the HTTP provider that ignores query parameters it does not know), down to the meter
    and the page's size."""

    calls_meter = ""
    """The meter whose events it lists when asked for those of event name "other"."""

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        ignored = {"customer_id": None, "customer_ids": (), "filters": {}, "limit": 1000}
        if query.event_name == "other":  # another meter's events, by its id
            ignored |= {"event_name": None, "meter_id": self.calls_meter}
        page = await super().list_usage_events(query.model_copy(update=ignored))
        return page.model_copy(update={"next_cursor": None})


def test_a_page_holding_an_event_the_query_leaves_out_is_refused_not_believed() -> None:
    provider = _Unfiltering()
    with Metering(provider) as metering:
        meter = metering.create_meter(event_name="calls", dimensions=["region"])
        provider.calls_meter = meter.id
        metering.create_meter(event_name="other")
        for customer, region in (("acme", "eu"), ("globex", "us")):
            metering.ingest_usage_event(
                event_name="calls",
                customer_id=customer,
                timestamp=NOW,
                dimensions={"region": region},
            )
        metering.flush()
        span = {"start": NOW - timedelta(1), "end": NOW + timedelta(1)}
        assert len(metering.list_usage_events(meter.id, **span).items) == 2  # nothing left out
        for narrowed, says in (
            ({"customer_ids": ["acme"]}, "customer_id='globex'"),
            ({"customer_id": "globex"}, "customer_id='acme'"),
            ({"filters": {"region": ["eu"]}}, "dimensions={'region': 'us'}"),
            ({"limit": 1}, "listed 2 events on a page of at most limit=1"),
        ):
            with pytest.raises(ProviderError, match="used") as refused:
                metering.list_usage_events(meter.id, **span, **narrowed)
            assert says in str(refused.value)
        with pytest.raises(ProviderError, match="event_name='calls'"):
            metering.list_usage_events(event_name="other", **span)


def test_listing_by_customers_on_a_provider_that_cannot_filter_is_refused_first() -> None:
    provider = MemoryProvider()
    provider._capabilities = provider._capabilities.model_copy(update={"filters": False})
    with Metering(provider) as metering:
        meter = metering.create_meter(event_name="calls")
        with pytest.raises(UnsupportedOperationError, match=r"customer_ids=\('t',\)"):
            metering.list_usage_events(
                meter.id, start=NOW, end=NOW + timedelta(1), customer_ids=["t"]
            )
