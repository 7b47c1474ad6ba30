"""The CloudEvents SDK pointed at `POST /events`: binary mode (its default), structured mode
with data as JSON or as base64, and batched mode; each counted once when delivered again."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from fastapi.testclient import TestClient

from metering_core import AsyncMetering
from metering_core.memory import MemoryProvider, MemorySettings
from metering_core.server import create_app

ADMIN = {"Authorization": "Bearer admin"}
SENT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


SCOPES = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(AsyncMetering("memory"), keys={"admin": {"scopes": SCOPES}})
    with TestClient(app) as client:
        client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
        yield client


def usage_event(event_id: str, data: Any) -> CloudEvent:
    return CloudEvent(
        {
            "type": "INGEST_USAGE",
            "source": "sbt/app",
            "id": event_id,
            "specversion": "1.0",
            "time": SENT,
        },
        data,
    )


def total(client: TestClient) -> str:
    meter = client.get("/meters", headers=ADMIN).json()["items"][0]["id"]
    params = {
        "start": (SENT - timedelta(hours=1)).isoformat(),
        "end": (SENT + timedelta(hours=1)).isoformat(),
    }
    rows = client.get(f"/usage/{meter}", params=params, headers=ADMIN).json()["rows"]
    return ",".join(row["value"] for row in rows)


def structured(
    event_id: str, data: Any, kind: str = "INGEST_USAGE", **attributes: Any
) -> dict[str, Any]:
    """A CloudEvent in structured mode, as a batch holds it."""
    return {"specversion": "1.0", "id": event_id, "source": "s", "type": kind, **attributes} | {
        "data": data
    }


def post_batch(client: TestClient, messages: list[dict[str, Any]]) -> Any:
    headers = {**ADMIN, "Content-Type": "application/cloudevents-batch+json"}
    return client.post("/events", content=json.dumps(messages).encode(), headers=headers)


def post(client: TestClient, message: Any) -> Any:
    response = client.post("/events", content=message.body, headers={**ADMIN, **message.headers})
    assert response.status_code == 200, response.text
    return response.json()


def test_binary_mode_the_sdks_default_is_counted_once(client: TestClient) -> None:
    message = to_binary(
        usage_event("b-1", {"event_name": "api_calls", "tenantId": "acme", "value": 3}),
        JSONFormat(),
    )
    assert "ce-id" in message.headers
    first = post(client, message)
    assert len(first["accepted"]) == 1
    again = post(client, message)
    assert (again["accepted"], again["duplicates"]) == ([], first["accepted"])
    assert total(client) == "3"  # dated by the envelope's time, two hours ago


def test_structured_mode_with_data_as_base64_is_read(client: TestClient) -> None:
    data = json.dumps({"event_name": "api_calls", "tenantId": "acme", "value": 4}).encode()
    message = to_structured(usage_event("s-1", data), JSONFormat())
    assert b"data_base64" in message.body
    assert len(post(client, message)["accepted"]) == 1
    assert total(client) == "4"


def test_a_batch_is_answered_per_message_and_redelivered_counts_once(
    client: TestClient,
) -> None:
    events = [
        json.loads(
            to_structured(
                usage_event(f"m-{i}", {"event_name": "api_calls", "tenantId": "acme", "value": i}),
                JSONFormat(),
            ).body
        )
        for i in (1, 2)
    ]
    body = json.dumps(events).encode()
    headers = {**ADMIN, "Content-Type": "application/cloudevents-batch+json"}
    first = client.post("/events", content=body, headers=headers).json()
    assert [len(answer["accepted"]) for answer in first] == [1, 1]
    again = client.post("/events", content=body, headers=headers).json()
    assert [len(answer["duplicates"]) for answer in again] == [1, 1]
    assert total(client) == "3"


def test_a_batch_with_one_bad_message_changes_nothing(client: TestClient) -> None:
    good = structured("g", {"event_name": "api_calls", "tenantId": "acme"})
    bad = structured("b", {"event_name": "api_calls", "tenantId": "acme", "value": "lots"})
    response = post_batch(client, [good, bad])
    assert response.status_code == 422
    assert total(client) == ""


def test_a_batch_failing_after_earlier_messages_acted_says_they_did(
    client: TestClient,
) -> None:
    """Usage, then an onboarding that conflicts with the customer stored: the usage is
    billed, so the 409 says the message before it acted, and a redelivery bills it once."""
    client.post("/customers", json={"id": "acme", "name": "Acme"}, headers=ADMIN)
    usage = structured(
        "u1", {"event_name": "api_calls", "tenantId": "acme", "value": 4}, time=SENT.isoformat()
    )
    onboarding = structured(
        "o1", {"tenantId": "acme", "tenantName": "Acme Rockets"}, "ONBOARDING_REQUEST"
    )
    for _ in range(2):
        response = post_batch(client, [usage, onboarding])
        assert response.status_code == 409
        message = response.json()["error"]["message"]
        assert message.startswith(
            "message 2 of 2 failed after the message before it acted (sending the batch "
            "again repeats those harmlessly): customer 'acme' exists already"
        ), message
        assert total(client) == "4"
    alone = post_batch(client, [onboarding, usage])
    assert alone.status_code == 409
    assert alone.json()["error"]["message"].startswith("customer 'acme' exists already")


def test_a_batch_with_a_message_over_the_stores_batch_size_changes_nothing() -> None:
    """A message carrying more events than the store takes in one batch can never
    succeed: refused before the messages ahead of it act (probe: they were billed, then
    the batch answered 422)."""
    provider = MemoryProvider(MemorySettings(max_batch_size=2))
    with TestClient(create_app(AsyncMetering(provider), keys={"admin": {"scopes": SCOPES}})) as c:
        c.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
        one = {"event_name": "api_calls", "tenantId": "acme", "value": 1}
        response = post_batch(c, [structured("small", one), structured("large", [one] * 3)])
        assert response.status_code == 422
        assert response.json()["error"] == {
            "type": "validation_error",
            "message": "events: 3 exceed max_batch_size=2",
            "field": "events",
        }
        assert total(c) == ""


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[]", "application/cloudevents-batch+json"),
        (b"{", "application/json"),
        (b'{"specversion": "1.0", "id": "x", "data": ' + b"9" * 4301 + b"}", "application/json"),
    ],
)
def test_a_body_that_is_no_message_is_refused_naming_the_body(
    client: TestClient, body: bytes, content_type: str
) -> None:
    response = client.post("/events", content=body, headers={**ADMIN, "Content-Type": content_type})
    assert (response.status_code, response.json()["error"]["field"]) == (422, "body")


@pytest.mark.parametrize(
    "data", [b"9" * 4301, b"[" * 100_000 + b"]" * 100_000], ids=["4301 digits", "deep"]
)
def test_data_base64_of_json_past_what_python_reads_is_refused_naming_it(
    client: TestClient, data: bytes
) -> None:
    """An integer past Python's 4,300 digits, or nesting past its recursion limit, in
    base64: the service failed with a 500 (probe); it is a 422 naming data_base64."""
    message = {
        "specversion": "1.0",
        "id": "big",
        "source": "s",
        "type": "INGEST_USAGE",
        "data_base64": base64.b64encode(data).decode(),
    }
    response = client.post("/events", json=message, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "data_base64"


@pytest.mark.parametrize("value", ["%FF", "%C3", "caf\u00e9"], ids=["bad", "cut", "raw"])
def test_a_binary_attribute_not_percent_encoded_utf8_is_refused_naming_it(
    client: TestClient, value: str
) -> None:
    """Bad escapes all read as U+FFFD (%FF and %FE one id: an event dropped as a
    duplicate), and raw UTF-8 as Latin-1 (one event in two modes counted twice): probe."""
    headers = {
        **ADMIN,
        "ce-specversion": "1.0",
        "ce-type": "INGEST_USAGE",
        "ce-source": "s",
        "ce-id": value,
        "Content-Type": "application/json",
    }
    body = json.dumps({"event_name": "api_calls", "tenantId": "acme"}).encode()
    raw = {k: v.encode("utf-8") for k, v in headers.items()}  # as a sender would put it
    response = client.post("/events", content=body, headers=raw)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "ce-id"
    assert total(client) == ""


def test_one_event_sent_in_binary_then_structured_mode_counts_once(client: TestClient) -> None:
    """The binding percent-encodes header values ("sbt app" is sbt%20app): read raw, the
    event's source and id differed between the modes, and a redrive in the other mode
    billed it twice."""
    event = CloudEvent(
        {
            "type": "INGEST_USAGE",
            "source": "sbt app",
            "id": "evt 1",
            "specversion": "1.0",
            "time": SENT,
        },
        {"event_name": "api_calls", "tenantId": "acme", "value": 3},
    )
    binary = to_binary(event, JSONFormat())
    assert "%20" in binary.headers["ce-source"]
    first = post(client, binary)
    again = post(client, to_structured(event, JSONFormat()))
    assert again["duplicates"] == first["accepted"]
    assert total(client) == "3"


def test_a_batch_is_refused_whole_when_the_caller_may_not_act_on_one_message() -> None:
    """A tenant's key sending its own usage and another tenant's onboarding: 403, and its
    usage was billed anyway (the rights were checked only as each message acted)."""
    keys = {
        "acme": {"scopes": ["usage:write", "customers:write", "usage:read"], "tenant": "acme"},
        "admin": {"scopes": ["meters:write", "meters:read", "usage:read"]},
    }
    with TestClient(create_app(AsyncMetering("memory"), keys=keys)) as tenant_client:
        tenant_client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
        messages = [
            {
                "specversion": "1.0",
                "id": "u1",
                "source": "s",
                "type": "INGEST_USAGE",
                "data": {"event_name": "api_calls", "tenantId": "acme", "value": 4},
            },
            {
                "specversion": "1.0",
                "id": "o1",
                "source": "s",
                "type": "ONBOARDING_REQUEST",
                "data": {"tenantId": "globex"},
            },
        ]
        response = tenant_client.post(
            "/events",
            content=json.dumps(messages).encode(),
            headers={
                "Authorization": "Bearer acme",
                "Content-Type": "application/cloudevents-batch+json",
            },
        )
        assert response.status_code == 403
        assert total(tenant_client) == ""
