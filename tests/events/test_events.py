"""Event-bus dispatch: every name alias, both envelopes, sbt-aws spellings, malformed input."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from metering_core import (
    Customer,
    Metering,
    NotFoundError,
    ProviderUnavailableError,
    ValidationError,
)
from metering_core.events import NAMES

INGEST = [name for name, kind in NAMES.items() if kind == "ingest"]
ONBOARD = [name for name, kind in NAMES.items() if kind == "onboard"]
OFFBOARD = [name for name, kind in NAMES.items() if kind == "offboard"]
START = datetime.now(UTC) - timedelta(days=1)


@pytest.fixture
def metering() -> Iterator[Metering]:
    with Metering("memory") as m:
        m.create_meter(event_name="api_calls", dimensions=["region"])
        yield m


def total(m: Metering, customer: str | None = None) -> Decimal:
    meter = next(m.iter_meters())
    m.flush()
    return m.fetch_usage(
        meter.id, customer_id=customer, start=START, end=START + timedelta(days=2)
    ).total


def eventbridge(kind: str, detail: Any, envelope_id: str = "eb-1") -> dict[str, Any]:
    return {"id": envelope_id, "detail-type": kind, "source": "sbt", "detail": detail}


def cloudevent(kind: str, data: Any, envelope_id: str = "ce-1") -> dict[str, Any]:
    return {"specversion": "1.0", "id": envelope_id, "type": kind, "source": "sbt", "data": data}


@pytest.mark.parametrize("name", INGEST)
@pytest.mark.parametrize("envelope", [eventbridge, cloudevent])
def test_every_ingest_alias_in_both_envelopes(metering: Metering, name: str, envelope: Any) -> None:
    detail = {
        "event_name": "api_calls",
        "customer_id": "t1",
        "value": 4,
        "timestamp": START.isoformat(),
    }
    ids = metering.handle_event(envelope(name, detail))
    assert len(ids) == 1
    assert total(metering) == 4


def test_sbt_aws_and_amberflo_spellings(metering: Metering) -> None:
    at = START + timedelta(hours=1)
    metering.handle_event(
        eventbridge(
            "INGEST_USAGE",
            {"event_name": "api_calls", "tenantId": "t1", "value": 2, "timestamp": at.isoformat()},
        )
    )
    amberflo = {
        "tenantId": "t2",
        "meterApiName": "api_calls",
        "meterValue": 5,
        "meterTimeInMillis": int(at.timestamp() * 1000),
        "region": "eu",
    }
    metering.handle_event(eventbridge("sbt_aws_ingestUsage", amberflo, "eb-2"))
    assert total(metering, "t1") == 2
    assert total(metering, "t2") == 5
    meter = next(metering.iter_meters())
    rows = metering.fetch_usage(
        meter.id, customer_id="t2", start=START, end=START + timedelta(days=2), group_by=["region"]
    ).rows
    assert [(r.dimensions, r.value) for r in rows] == [({"region": "eu"}, 5)]


def test_a_list_detail_ingests_each_event(metering: Metering) -> None:
    detail = [
        {"event_name": "api_calls", "tenantId": "t1", "value": v, "timestamp": START.isoformat()}
        for v in (1, 2, 3)
    ]
    assert len(metering.handle_event(cloudevent("ingestUsage", detail))) == 3
    assert total(metering) == 6


def test_a_redelivered_message_is_not_counted_twice(metering: Metering) -> None:
    item = {"event_name": "api_calls", "tenantId": "t1", "value": 7, "timestamp": START.isoformat()}
    message = eventbridge("INGEST_USAGE", [item, item])
    first = metering.handle_event(message)
    assert sorted(metering.flush().accepted) == ["eb-1:0", "eb-1:1"]
    again = metering.handle_event(message)
    assert first == again == ["eb-1:0", "eb-1:1"]
    assert sorted(metering.flush().duplicates) == ["eb-1:0", "eb-1:1"]
    assert total(metering) == 14


def test_cloudevents_are_unique_by_source_and_id(metering: Metering) -> None:
    """The CloudEvents spec makes source + id unique, not id alone: two producers that
    both number their events from 1 send two events, and each one's redelivery is one."""
    item = {"event_name": "api_calls", "tenantId": "t1", "value": 5, "timestamp": START.isoformat()}
    app_a = {**cloudevent("ingestUsage", item, "1"), "source": "/billing/app-a"}
    app_b = {**cloudevent("ingestUsage", {**item, "value": 7}, "1"), "source": "/billing/app-b"}
    first, second = metering.handle_event(app_a), metering.handle_event(app_b)
    assert first != second
    assert all(len(i) == len("ce-:0") + 40 and i.startswith("ce-") for i in first + second)
    assert metering.handle_event(app_b) == second
    report = metering.flush()
    assert (sorted(report.accepted), report.duplicates) == (sorted(first + second), second)
    assert total(metering) == 12


@pytest.mark.parametrize(
    "message",
    [
        {"detail-type": "INGEST_USAGE", "source": "sbt"},
        {"specversion": "1.0", "type": "ingestUsage", "source": "sbt"},
        {"specversion": "1.0", "type": "ingestUsage", "id": "ce-1"},
    ],
    ids=["eventbridge-without-id", "cloudevent-without-id", "cloudevent-without-source"],
)
def test_usage_with_no_id_to_take_is_refused_not_counted_per_delivery(
    metering: Metering, message: dict[str, Any]
) -> None:
    item = {"event_name": "api_calls", "tenantId": "t1", "value": 3, "timestamp": START.isoformat()}
    payload = "detail" if "detail-type" in message else "data"
    with pytest.raises(ValidationError) as refused:
        metering.handle_event({**message, payload: [{**item, "id": "own"}, item]})
    assert refused.value.field == "detail[1].id"
    assert "redelivery" in str(refused.value)
    assert total(metering) == 0
    assert metering.handle_event({**message, payload: {**item, "id": "own"}}) == ["own"]
    assert total(metering) == 3


@pytest.mark.parametrize("name", ONBOARD)
def test_every_onboarding_alias_creates_the_customer(metering: Metering, name: str) -> None:
    detail = {
        "tenantId": "acme",
        "tenantName": "Acme",
        "email": "ops@acme.test",
        "tier": "premium",
        "seats": 5,
    }
    customer = metering.handle_event(eventbridge(name, detail))
    assert isinstance(customer, Customer)
    assert (customer.id, customer.name, customer.email) == ("acme", "Acme", "ops@acme.test")
    assert customer.metadata == {"tier": "premium", "seats": "5"}


@pytest.mark.parametrize("name", OFFBOARD)
def test_every_offboarding_alias_deletes_the_customer(metering: Metering, name: str) -> None:
    metering.create_customer(id="acme")
    assert metering.handle_event(cloudevent(name, {"tenantId": "acme"})) is None
    with pytest.raises(NotFoundError):
        metering.delete_customer("acme")


@pytest.mark.parametrize("envelope", [eventbridge, cloudevent])
def test_onboarding_and_offboarding_delivered_again_succeed(
    metering: Metering, envelope: Any
) -> None:
    """A bus delivers at least once: a redelivered message is its first delivery's outcome
    (an offboarding failed with NotFoundError, which EventBridge retried into its dead
    letter queue)."""
    onboard = envelope("ONBOARDING_REQUEST", {"tenantId": "acme", "tenantName": "Acme"})
    first = metering.handle_event(onboard)
    assert metering.handle_event(onboard) == first
    offboard = envelope("OFFBOARDING_REQUEST", {"tenantId": "acme"})
    assert metering.handle_event(offboard) is None
    assert metering.handle_event(offboard) is None
    with pytest.raises(NotFoundError):
        metering.delete_customer("acme")


@pytest.mark.parametrize("envelope", [eventbridge, cloudevent])
def test_usage_without_a_timestamp_takes_the_envelopes_time(
    metering: Metering, envelope: Any
) -> None:
    """A dead-letter redrive days later bills the usage when it was sent, not processed."""
    sent = START - timedelta(days=3)
    message = {
        **envelope(
            "INGEST_USAGE",
            [
                {"event_name": "api_calls", "customer_id": "t1", "value": 2},
                {
                    "event_name": "api_calls",
                    "customer_id": "t1",
                    "value": 5,
                    "timestamp": START.isoformat(),
                },
            ],
        ),
        "time": sent.isoformat().replace("+00:00", "Z"),
    }
    metering.handle_event(message)
    meter = next(metering.iter_meters())
    metering.flush()
    usage = metering.fetch_usage(
        meter.id, start=sent - timedelta(days=1), end=START + timedelta(days=1), window="day"
    )
    assert [(row.start.date(), row.value) for row in usage.rows] == [
        (sent.date(), 2),
        (START.date(), 5),
    ]


def test_an_envelope_time_that_is_not_a_time_is_refused(metering: Metering) -> None:
    message = {
        **eventbridge("INGEST_USAGE", {"event_name": "api_calls", "tenantId": "t1"}),
        "time": "yesterday",
    }
    with pytest.raises(ValidationError, match="yesterday"):
        metering.handle_event(message)
    assert total(metering) == 0


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("not an object", "event"),
        ({"source": "sbt"}, "detail-type"),
        (eventbridge("PROVISION_TENANT", {"tenantId": "x"}), "detail-type"),
        (eventbridge("INGEST_USAGE", []), "detail"),
        (eventbridge("INGEST_USAGE", "text"), "detail"),
        (eventbridge("ONBOARDING_REQUEST", {"tenantName": "no id"}), "tenantId"),
        (eventbridge("OFFBOARDING_REQUEST", None), "detail"),
        # a tenant named twice, differently: billed to either, one's usage is the other's
        (
            eventbridge(
                "INGEST_USAGE", {"event_name": "api_calls", "tenantId": "a", "customer_id": "b"}
            ),
            "detail[0].customer_id",
        ),
        (
            eventbridge(
                "INGEST_USAGE", {"meterApiName": "api_calls", "tenantId": "a", "customer_id": "b"}
            ),
            "detail[0].customer_id",
        ),
        (eventbridge("ONBOARDING_REQUEST", {"tenantId": "a", "customer_id": "b"}), "customer_id"),
        # the Amberflo-style shape: a null or a list is no dimension; its value is meterValue
        (
            eventbridge(
                "INGEST_USAGE", {"meterApiName": "api_calls", "tenantId": "a", "region": None}
            ),
            "detail[0].dimensions.region",
        ),
        (
            eventbridge(
                "INGEST_USAGE", {"meterApiName": "api_calls", "tenantId": "a", "region": ["eu"]}
            ),
            "detail[0].dimensions.region",
        ),
        (
            eventbridge(
                "INGEST_USAGE", {"meterApiName": "api_calls", "tenantId": "a", "value": 50}
            ),
            "detail[0].value",
        ),
    ],
)
def test_malformed_messages_are_refused_naming_the_field(
    metering: Metering, message: Any, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        metering.handle_event(message)
    assert caught.value.field == field


@pytest.mark.parametrize("millis", [1_767_225_600, 0, -1, 99_999_999_999])
def test_a_time_in_seconds_sent_as_milliseconds_is_refused_not_billed_in_1970(
    metering: Metering, millis: int
) -> None:
    """1,767,225,600 is 1 January 2026 in seconds; as milliseconds it is 21 January 1970,
    in no period anyone invoices (probe). Anything before 1973 is refused, naming the
    field and the value, and nothing is stored."""
    amberflo = {"tenantId": "t1", "meterApiName": "api_calls", "meterTimeInMillis": millis}
    fine = {"event_name": "api_calls", "tenantId": "t1", "value": 1, "timestamp": START.isoformat()}
    with pytest.raises(ValidationError, match=f"meterTimeInMillis={millis}.*looks like seconds"):
        metering.handle_event(eventbridge("INGEST_USAGE", [fine, amberflo]))
    assert total(metering, "t1") == 0
    at = START + timedelta(hours=1)
    first = {**amberflo, "meterTimeInMillis": 100_000_000_000, "uniqueId": "edge"}
    in_range = {**amberflo, "meterTimeInMillis": int(at.timestamp() * 1000)}
    assert len(metering.handle_event(eventbridge("INGEST_USAGE", [first, in_range], "eb-ok"))) == 2
    assert total(metering, "t1") == 1  # 1973's event is taken too, outside this range


def test_an_envelope_id_of_zero_is_an_id(metering: Metering) -> None:
    detail = {"event_name": "api_calls", "tenantId": "t1", "timestamp": START.isoformat()}
    message = {"id": 0, "detail-type": "INGEST_USAGE", "source": "sbt", "detail": detail}
    assert metering.handle_event(message) == ["0:0"]
    assert metering.handle_event(message) == ["0:0"]  # and a redelivery is a duplicate
    assert total(metering) == 1


def test_one_bad_event_in_a_list_changes_nothing(metering: Metering) -> None:
    detail = [
        {"event_name": "api_calls", "tenantId": "t1", "value": 1, "timestamp": START.isoformat()},
        {
            "event_name": "api_calls",
            "tenantId": "t1",
            "value": "many",
            "timestamp": START.isoformat(),
        },
    ]
    with pytest.raises(ValidationError) as caught:
        metering.handle_event(eventbridge("INGEST_USAGE", detail))
    assert caught.value.field == "detail[1].value"
    assert total(metering) == 0


def test_event_handler_ingests_and_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    import metering_core.aws as aws

    lambda_handler = aws.event_handler
    monkeypatch.setenv("METERING_PROVIDER", "memory")
    monkeypatch.setenv("METERING_AWS_ALLOW_EPHEMERAL", "1")
    monkeypatch.setattr(aws, "_metering", None)
    message = eventbridge("INGEST_USAGE", {"event_name": "nometer", "tenantId": "t1"})
    with pytest.raises(ValidationError, match="rejected"):
        lambda_handler(message, None)
    assert aws._metering is not None
    aws._metering.create_meter(event_name="api_calls")
    ok = lambda_handler(
        eventbridge("INGEST_USAGE", {"event_name": "api_calls", "tenantId": "t1"}, "eb-9"), None
    )
    assert ok["ingested"] == ["eb-9:0"]
    aws._metering.close()


def test_event_handler_says_an_outage_is_one_not_a_bad_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bus retries either way; the error's type is what an alarm and whoever reads the
    dead letters go by (probe: a dead port read as a ValidationError)."""
    import metering_core.aws as aws

    monkeypatch.setenv("METERING_PROVIDER", "http")
    monkeypatch.setenv("METERING_HTTP_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("METERING_HTTP_API_KEY", "k")
    monkeypatch.setenv("METERING_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(aws, "_metering", None)
    message = eventbridge("INGEST_USAGE", {"event_name": "api_calls", "tenantId": "t1"})
    with pytest.raises(ProviderUnavailableError, match="not delivered, to retry") as caught:
        aws.event_handler(message, None)
    assert "eb-1:0" in str(caught.value)
    assert aws._metering is not None
    aws._metering.close()
