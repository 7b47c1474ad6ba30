"""What a hostile tenant or a careless client sends: every refusal is a 4xx in the error
shape, work is bounded before it is done, and nothing is echoed back whole."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering_core import ApiKey, AsyncMetering, MeterCreate, Metering, UsageEvent, ValidationError
from metering_core.memory import MemoryProvider
from metering_core.models import MAX_WINDOWS
from metering_core.server import create_app
from metering_core.server.auth import Principal
from metering_core.testing.serving import serve_in_thread
from tests.examples import examples

ALL = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
KEYS = {
    "admin": {"scopes": ALL},
    "acme": {"scopes": ["usage:read", "usage:write"], "tenant": "acme"},
}
ADMIN = {"Authorization": "Bearer admin"}
ACME = {"Authorization": "Bearer acme"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(AsyncMetering("memory"), keys=KEYS)) as client:
        client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN).raise_for_status()
        yield client


@pytest.fixture(scope="module")
def meter_id(client: TestClient) -> str:
    return str(client.get("/meters", headers=ADMIN).json()["items"][0]["id"])


def assert_never_stored(client: TestClient, *acme_ids: str) -> None:
    """None of these ids acme's key sent is stored: the operator's key, cancelling them as
    the store holds them (in acme's own id space), finds none."""
    acme = Principal(ApiKey(scopes=frozenset(), tenant="acme"))
    stored = [acme.stored_id(event_id) for event_id in acme_ids]
    gone = client.request("DELETE", "/usage", json={"event_ids": stored}, headers=ADMIN)
    assert gone.json()["not_found"] == stored


def refused(response: httpx.Response, field: str | None = None) -> str:
    """The refusal's message, after checking it is a 4xx in the one error shape."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["type"]
    assert error["message"]
    if field is not None:
        assert error.get("field") == field, error
    return str(error["message"])


def test_a_query_past_the_window_limit_is_refused_naming_the_limit(
    client: TestClient, meter_id: str
) -> None:
    params = {"start": "1900-01-01T00:00:00Z", "end": "2000-01-01T00:00:00Z", "window": "hour"}
    message = refused(client.get(f"/usage/{meter_id}", params=params, headers=ACME), "window")
    assert str(MAX_WINDOWS) in message


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "0001-01-01T00:00:00+01:00", "end": "2000-01-01T00:00:00Z"}, "start"),
        ({"start": "2026-01-01T00:00:00Z", "end": "9999-12-31T23:30:00-01:00"}, "end"),
        (
            {"start": "9999-11-01T00:00:00Z", "end": "9999-12-31T00:00:00Z", "window": "month"},
            "start",
        ),
        ({"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z", "tz": "America"}, "tz"),
        ({"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z", "tz": "../etc"}, "tz"),
    ],
)
def test_out_of_range_times_and_bad_zones_are_4xx(
    client: TestClient, meter_id: str, params: dict[str, str], field: str
) -> None:
    refused(client.get(f"/usage/{meter_id}", params=params, headers=ACME), field)


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_an_overflowing_event_timestamp_is_refused_and_nothing_is_stored(
    client: TestClient, meter_id: str, timestamp: str
) -> None:
    events = [
        {"id": "fine", "event_name": "api_calls", "customer_id": "acme"},
        {"id": "far", "event_name": "api_calls", "customer_id": "acme", "timestamp": timestamp},
    ]
    refused(client.post("/usage", json={"events": events}, headers=ACME), "events.1.timestamp")
    assert_never_stored(client, "fine")


def test_an_event_bus_message_with_a_bad_time_is_4xx(client: TestClient) -> None:
    message = {
        "detail-type": "ingestUsage",
        "detail": {"tenantId": "acme", "meterApiName": "api_calls", "meterTimeInMillis": "abc"},
    }
    refused(client.post("/events", json=message, headers=ACME), "detail[0].meterTimeInMillis")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b'{"events": [{"id": "half", "event_name": "api_calls", "customer_id": "acme"}',
    ],
)
def test_a_body_that_is_not_json_is_a_validation_error_of_the_body(
    client: TestClient, body: bytes
) -> None:
    response = client.post(
        "/usage", content=body, headers={**ACME, "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "Invalid JSON" in refused(response, "body")
    assert_never_stored(client, "half", "s")


def test_an_escaped_lone_surrogate_is_refused_naming_its_field(client: TestClient) -> None:
    body = b'{"events": [{"id": "s", "event_name": "api_calls", "customer_id": "acme\\ud800"}]}'
    response = client.post(
        "/usage", content=body, headers={**ACME, "Content-Type": "application/json"}
    )
    assert "lone surrogate" in refused(response, "events.0.customer_id")
    assert_never_stored(client, "s")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_usage_that_is_not_sent_as_json_is_refused_and_stores_nothing(
    client: TestClient, content_type: str | None
) -> None:
    """As FastAPI's own body handling: only a JSON content type is read, so a web page's
    plain form post cannot write usage (no CORS preflight guards a "simple" request)."""
    body = json.dumps(
        {"events": [{"id": "form", "event_name": "api_calls", "customer_id": "acme"}]}
    )
    headers = {**ACME, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/usage", content=body.encode(), headers=headers)
    assert "application/json" in refused(response, "body")
    assert_never_stored(client, "form")


@pytest.mark.parametrize(
    ("encoding", "content_type"),
    [
        ("utf-8-sig", "application/json"),
        ("utf-16", "application/json"),
        ("utf-8", "application/cloudevents+json"),
    ],
)
def test_usage_in_any_json_encoding_is_read(
    client: TestClient, encoding: str, content_type: str
) -> None:
    event_id = f"enc-{encoding}-{content_type[12:16]}"
    body = json.dumps(
        {"events": [{"id": event_id, "event_name": "api_calls", "customer_id": "acme"}]}
    )
    headers = {**ACME, "Content-Type": content_type}
    answer = client.post("/usage", content=body.encode(encoding), headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == [event_id]


def test_a_huge_invalid_value_is_not_echoed_back_whole(client: TestClient) -> None:
    huge = {"id": "x", "event_name": "Bad" * 350_000, "customer_id": "acme"}
    response = client.post("/usage", json={"events": [huge]}, headers=ACME)
    refused(response, "events.0.event_name")
    assert len(response.content) < 2_000


timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.text(max_size=30),
)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    start=timestamps,
    end=timestamps,
    window=st.sampled_from([None, "hour", "day", "month", "week"]),
    tz=st.one_of(st.sampled_from(["UTC", "Europe/Paris", "America", "", "Etc/GMT+14"]), st.text()),
    group_by=st.lists(st.sampled_from(["customer_id", "region", ""]), max_size=3),
    customer=st.sampled_from([None, "acme", "globex"]),
)
def test_no_usage_query_from_a_tenant_key_is_a_server_error(
    client: TestClient,
    meter_id: str,
    start: str,
    end: str,
    window: str | None,
    tz: str,
    group_by: list[str],
    customer: str | None,
) -> None:
    params: dict[str, object] = {"start": start, "end": end, "tz": tz, "group_by": group_by}
    if window is not None:
        params["window"] = window
    if customer is not None:
        params["customer_id"] = customer
    response = client.get(f"/usage/{meter_id}", params=params, headers=ACME)
    if response.status_code != 200:
        refused(response)


def test_health_answers_quickly_while_the_heaviest_allowed_query_runs() -> None:
    provider = MemoryProvider()
    service = AsyncMetering(provider)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    meter = __import__("asyncio").run(provider.create_meter(MeterCreate(event_name="api_calls")))
    events = [
        UsageEvent(
            id=f"e{i}",
            event_name="api_calls",
            customer_id=f"t{i % 500}",
            timestamp=start + timedelta(minutes=17 * i),
        )
        for i in range(60_000)
    ]
    __import__("asyncio").run(provider.ingest_usage_events(events))
    heavy = {
        "start": start.isoformat(),
        "end": (start + timedelta(hours=MAX_WINDOWS - 2)).isoformat(),
        "window": "hour",  # every window of every customer's series is searched
    }
    with serve_in_thread(create_app(service, keys=KEYS)) as url:
        done = threading.Event()
        answer: list[int] = []

        def query() -> None:
            with httpx.Client(base_url=url, headers=ADMIN, timeout=120) as http:
                answer.append(http.get(f"/usage/{meter.id}", params=heavy).status_code)
            done.set()

        threading.Thread(target=query, daemon=True).start()
        waits: list[float] = []
        with httpx.Client(base_url=url, timeout=10) as http:
            time.sleep(0.2)  # the query is under way
            while not done.is_set() and len(waits) < 50:
                began = time.perf_counter()
                http.get("/health").raise_for_status()
                waits.append(time.perf_counter() - began)
                time.sleep(0.02)
        done.wait(120)
    assert answer == [200]
    assert len(waits) >= 3, "the heavy query finished too fast to measure anything"
    # Before the query left the loop, /health waited for all of it (21 s for 1000 years of
    # hours). Now it waits for a GIL hand-off or two: ~55 ms typically here, with rare
    # spikes when every thread of this one test process is busy at once.
    waits.sort()
    assert waits[len(waits) // 2] < 0.1, f"/health took {waits} s during the query"
    assert waits[-1] < 1.0, f"/health took {waits} s during the query"


def test_text_that_is_not_unicode_is_refused_before_it_can_break_a_query(
    client: TestClient, meter_id: str
) -> None:
    message = {
        "detail-type": "ingestUsage",
        "detail": {"tenantId": "acme", "meterApiName": "api_calls", "x": "\ud800"},
    }
    body = json.dumps(message)  # the lone surrogate travels as the JSON escape \ud800
    sent = client.post(
        "/events", content=body, headers={**ACME, "Content-Type": "application/json"}
    )
    refused(sent)
    params = {"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z"}
    assert client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).status_code == 200


def test_a_far_future_millisecond_time_is_refused_not_moved_to_1971(client: TestClient) -> None:
    message = {
        "detail-type": "ingestUsage",
        "detail": {
            "tenantId": "acme",
            "meterApiName": "api_calls",
            "meterTimeInMillis": 32503680000000,
        },
    }
    refused(client.post("/events", json=message, headers=ACME))


def test_repeated_dimensions_in_an_update_are_refused_and_change_nothing(
    client: TestClient, meter_id: str
) -> None:
    refused(client.put(f"/meters/{meter_id}", json={"dimensions": ["a", "a"]}, headers=ADMIN))
    assert client.get(f"/meters/{meter_id}", headers=ADMIN).json()["dimensions"] == []


def test_cancel_ids_are_bounded_like_event_ids(client: TestClient) -> None:
    huge = client.request("DELETE", "/usage", json={"event_ids": ["x" * 100_000]}, headers=ADMIN)
    refused(huge, "event_ids.0")
    assert len(huge.content) < 2_000


def test_a_grouped_query_stops_at_the_row_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import metering_core.memory as memory
    from metering_core import ValidationError

    monkeypatch.setattr(memory, "MAX_ROWS", 10)
    provider = MemoryProvider()

    async def scenario() -> None:
        meter = await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["req"]))
        at = datetime(2026, 1, 1, tzinfo=UTC)
        await provider.ingest_usage_events(
            [
                UsageEvent(
                    event_name="api_calls",
                    customer_id="t",
                    timestamp=at,
                    dimensions={"req": str(i)},
                )
                for i in range(50)
            ]
        )
        from metering_core import UsageQuery

        query = UsageQuery(
            meter_id=meter.id, start=at, end=at + timedelta(days=1), group_by=("req",)
        )
        with pytest.raises(ValidationError, match="more than"):
            await provider.fetch_usage(query)

    asyncio.run(scenario())


def test_metrics_need_their_scope_and_count_requests_and_events() -> None:
    keys = {**KEYS, "scraper": {"scopes": ["metrics:read"]}}
    with TestClient(create_app(AsyncMetering("memory"), keys=keys)) as client:
        client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN).raise_for_status()
        events = [
            {"id": f"m{i}", "event_name": "api_calls", "customer_id": "acme"} for i in range(3)
        ]
        client.post("/usage", json={"events": events}, headers=ACME).raise_for_status()
        client.post("/usage", json={"events": events[:1]}, headers=ACME).raise_for_status()
        client.get("/meters/mtr_nope", headers=ADMIN)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=ACME).status_code == 403
        page = client.get("/metrics", headers={"Authorization": "Bearer scraper"})
    assert page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert 'metering_events_ingested_total{outcome="accepted"} 3.0' in text
    assert 'metering_events_ingested_total{outcome="duplicate"} 1.0' in text
    # an outcome not yet met is there at 0: an alert on its rate sees a series from the start
    assert 'metering_events_ingested_total{outcome="rejected"} 0.0' in text
    assert 'route="/meters/{meter_id}",status="404"' in text  # the template, not the id
    assert "mtr_nope" not in text
    assert "metering_http_request_duration_seconds_bucket" in text
    assert 'metering_pipeline_queue_depth{provider="memory"} 0.0' in text


def test_made_up_methods_cannot_grow_the_metrics() -> None:
    app = create_app(AsyncMetering("memory"), keys=KEYS, public_metrics=True)
    with TestClient(app) as client:
        for n in range(30):
            client.request(f"X{n}", "/nowhere")
        text = client.get("/metrics").text
    assert 'method="other",route="unmatched",status="404"} 30.0' in text
    assert "X1" not in text


def test_metrics_can_be_public_when_the_operator_says_so() -> None:
    app = create_app(AsyncMetering("memory"), keys=KEYS, public_metrics=True)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200


def test_a_body_over_the_limit_is_refused_in_the_error_shape_and_nothing_is_stored() -> None:
    """Told by its length or sent in chunks of unknown length, a body over the limit is
    refused before it is read whole; a batch within it then goes through."""
    app = create_app(AsyncMetering("memory"), keys=KEYS, max_body_bytes=20_000)
    events = [{"id": f"e{i}", "event_name": "api_calls", "customer_id": "t"} for i in range(400)]
    body = json.dumps({"events": events}).encode()
    assert len(body) > 20_000
    with TestClient(app, headers={**ADMIN, "content-type": "application/json"}) as client:
        client.post("/meters", json={"event_name": "api_calls"}).raise_for_status()
        for sent in (body, (body[i : i + 4096] for i in range(0, len(body), 4096))):
            refused = client.post("/usage", content=sent)
            assert refused.status_code == 413
            assert refused.json()["error"] == {
                "type": "validation_error",
                "message": "the request body is over the service's limit of 20000 bytes: send less",
                "field": "body",
            }
        assert client.post("/usage", json={"events": events[:100]}).json()["accepted"] == [
            f"e{i}" for i in range(100)
        ]
        again = client.post("/usage", json={"events": events[:150]}).json()
        assert (len(again["accepted"]), len(again["duplicates"])) == (50, 100)


def test_serve_hands_its_options_to_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """`metering serve --public-metrics --max-body-bytes N` reach the app it runs."""
    from metering_core.server import serve

    served: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.append(app))
    serve(AsyncMetering("memory"), allow_anonymous=True, public_metrics=True, max_body_bytes=100)
    with TestClient(served[0]) as client:  # type: ignore[arg-type]
        assert client.get("/metrics").status_code == 200
        assert client.post("/usage", content=b"x" * 101).status_code == 413


LONG = "12345678901234567890.123456789"  # more digits than a float carries


def test_a_json_number_longer_than_a_float_is_billed_to_the_last_digit() -> None:
    """A value sent as a bare JSON number keeps every digit, whatever the spelling of its
    key; one a float would round or empty (more places than a value may have, an
    exponent past any range) is refused, not rounded. (A float would have billed
    12345678901234567890.123456789 as 12345678901234567000, and 1e-400 as 0.)"""
    at = "2026-03-01T00:00:00Z"

    def batch(event_id: str, value: str, key: str = "value") -> str:
        return (
            f'{{"events": [{{"id": "{event_id}", "event_name": "api_calls", '
            f'"customer_id": "t", "{key}": {value}, "timestamp": "{at}"}}]}}'
        )

    with TestClient(
        create_app(AsyncMetering("memory"), keys=KEYS),
        headers={**ADMIN, "content-type": "application/json"},
    ) as client:
        meter = client.post("/meters", json={"event_name": "api_calls"}).json()["id"]
        for event_id, key in (("plain", "value"), ("escaped", "valu\\u0065")):
            answer = client.post("/usage", content=batch(event_id, LONG, key)).json()
            assert answer["accepted"] == [event_id]
        rows = client.get(
            f"/usage/{meter}", params={"start": at, "end": "2026-03-02T00:00:00Z"}
        ).json()["rows"]
        assert [row["value"] for row in rows] == ["24691357802469135780.246913578"]  # twice LONG
        for value in ("0.1234567890123456789", "1e-400", "1e400", "1e9999999999999999999"):
            refused = client.post("/usage", content=batch("x", value))
            assert (refused.status_code, refused.json()["error"]["field"]) == (
                422,
                "events.0.value",
            ), value


def test_a_body_of_more_events_than_any_batch_is_refused_at_once(client: TestClient) -> None:
    """A million bad items cost one error, not one each (gigabytes, and the loop held)."""
    body = '{"events": [' + ",".join(["1"] * 1_000_000) + "]}"
    refused = client.post(
        "/usage", content=body, headers={**ADMIN, "content-type": "application/json"}
    )
    assert refused.status_code == 422
    assert "at most 10000 items" in refused.json()["error"]["message"]


def test_many_bad_items_cost_one_error_each_place_they_can_hide(client: TestClient) -> None:
    """Cancel ids, event-bus items and dimensions were unbounded: a tenant's 16 MiB body of
    bad items cost gigabytes of errors and tens of seconds of the event loop."""
    cancel = json.dumps({"event_ids": [""] * 1_000_000})
    many_ids = client.request(
        "DELETE", "/usage", content=cancel, headers={**ACME, "content-type": "application/json"}
    )
    assert "at most 10000 items" in refused(many_ids, "event_ids")
    items = [{"event_name": "api_calls", "tenantId": "acme", "value": 1}] * 10_001
    message = {"id": "m", "detail-type": "ingestUsage", "detail": items}
    assert "at most 10000" in refused(client.post("/events", json=message, headers=ACME), "detail")
    dimensions = {f"k{i}": "\x00" for i in range(100_000)}
    event = {"id": "d", "event_name": "api_calls", "customer_id": "acme", "dimensions": dimensions}
    bad = client.post("/usage", json={"events": [event]}, headers=ACME)
    assert refused(bad).count("holds a NUL") == 1
    assert client.post(
        "/usage", json={"events": [{**event, "dimensions": {}}]}, headers=ACME
    ).json()["accepted"] == ["d"]


def test_a_thousand_bad_events_are_described_as_far_as_a_message_goes_then_counted(
    client: TestClient,
) -> None:
    events = [
        {"id": f"v{i}", "event_name": "api_calls", "customer_id": "acme", "value": "lots"}
        for i in range(1_000)
    ]
    message = refused(
        client.post("/usage", json={"events": events}, headers=ACME), "events.0.value"
    )
    described = message.count("Input should be a valid decimal")
    assert 1 < described < 20
    assert message.endswith(f"; and {1_000 - described} more")


def test_a_key_that_may_send_no_events_is_refused_before_the_message_is_validated() -> None:
    keys = {**KEYS, "watcher": {"scopes": ["metrics:read", "usage:read"]}}
    with TestClient(create_app(AsyncMetering("memory"), keys=keys)) as client:
        answer = client.post(
            "/events", json={"detail-type": "nonsense"}, headers={"Authorization": "Bearer watcher"}
        )
        assert answer.status_code == 403
        assert "usage:write" in answer.json()["error"]["message"]


def test_a_body_that_is_not_json_names_the_body_on_every_route(client: TestClient) -> None:
    for method, path in (("POST", "/meters"), ("DELETE", "/usage"), ("POST", "/customers")):
        answer = client.request(
            method,
            path,
            content=b'{"event_name": ',
            headers={**ADMIN, "content-type": "application/json"},
        )
        assert answer.status_code == 422
        assert refused(answer, "body")


def test_bodies_nested_past_the_recursion_limit_are_refused_not_failed(
    client: TestClient,
) -> None:
    """Event-bus messages, and usage on the exact-number path too."""
    deep = "[" * 100_000 + "]" * 100_000
    usage = '{"events": [{"value": ' + LONG + ', "x": ' + deep + "}]}"
    for path, body in (("/events", deep), ("/usage", usage)):
        answer = client.post(
            path, content=body, headers={**ADMIN, "content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()["error"]["field"]) == (422, "body")


def test_a_store_failure_tells_callers_what_failed_and_only_the_log_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tenant's request meeting an unreachable store learns it is unavailable, not the
    store's address, user or database; the operator's log has them."""
    url = "postgresql://billing_svc:pw@127.0.0.1:1/metering_prod"
    with TestClient(create_app(AsyncMetering("sql", url=url), keys=KEYS)) as client:
        answer = client.get("/meters", headers=ADMIN)
    error = answer.json()["error"]
    assert (answer.status_code, error["type"]) == (503, "provider_unavailable")
    assert "retry later" in error["message"]
    for detail in ("billing_svc", "127.0.0.1", "metering_prod", "pw"):
        assert detail not in error["message"]
    assert "metering_prod" in caplog.text
    assert ":pw@" not in caplog.text


def test_the_batch_size_offered_is_one_a_request_may_carry() -> None:
    """A provider taking 20,000 a batch: a client splitting cancels (or usage) to that
    size had every request of more than 10,000 refused."""
    from metering_core.memory import MemorySettings

    provider = MemoryProvider(MemorySettings(max_batch_size=20_000))
    with TestClient(create_app(AsyncMetering(provider), keys=KEYS)) as client:
        offered = client.get("/capabilities", headers=ADMIN).json()["max_batch_size"]
        ids = [f"c{i}" for i in range(offered)]
        cancel = client.request("DELETE", "/usage", json={"event_ids": ids}, headers=ADMIN)
    assert offered == 10_000
    assert len(cancel.json()["not_found"]) == 10_000


@pytest.mark.parametrize("behind_a_gateway", [False, True])
def test_every_security_requirement_documented_is_defined(behind_a_gateway: bool) -> None:
    from metering_core.server.auth import GatewayClaims

    gateway = GatewayClaims() if behind_a_gateway else None
    document = create_app(AsyncMetering("memory"), keys=KEYS, gateway=gateway).openapi()
    defined = set(document.get("components", {}).get("securitySchemes", {}))
    required = {
        name
        for path in document["paths"].values()
        for operation in path.values()
        for requirement in operation.get("security", [])
        for name in requirement
    }
    assert required <= defined


@pytest.mark.parametrize("provider", ["memory", "sql"])
def test_a_meter_update_clearing_dimensions_is_refused_and_changes_nothing(
    provider: str, tmp_path: object
) -> None:
    """`dimensions: null` answered 500 on memory and left GET /meters answering 500."""
    options = {"url": f"sqlite:///{tmp_path}/store.db"} if provider == "sql" else {}
    with TestClient(create_app(AsyncMetering(provider, **options), keys=KEYS)) as client:
        meter = client.post(
            "/meters", json={"event_name": "calls", "dimensions": ["region"]}, headers=ADMIN
        ).json()
        response = client.put(f"/meters/{meter['id']}", json={"dimensions": None}, headers=ADMIN)
        assert "dimensions" in refused(response, "dimensions")
        assert response.status_code == 422
        listed = client.get("/meters", headers=ADMIN)
        assert listed.status_code == 200
        assert listed.json()["items"][0]["dimensions"] == ["region"]
    with Metering(provider, **options) as m, pytest.raises(ValidationError):
        m.update_meter(meter["id"], dimensions=None)


def test_an_idempotency_key_makes_a_retried_request_of_events_without_ids_count_once(
    client: TestClient, meter_id: str
) -> None:
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=400)
    body = {
        "events": [
            {
                "event_name": "api_calls",
                "customer_id": "acme",
                "value": 2,
                "timestamp": at.isoformat(),
            },
            {
                "id": "own-1",
                "event_name": "api_calls",
                "customer_id": "acme",
                "timestamp": at.isoformat(),
            },
            {
                "event_name": "api_calls",
                "customer_id": "acme",
                "value": 5,
                "timestamp": at.isoformat(),
            },
        ]
    }
    keyed = {**ACME, "Idempotency-Key": "order-7781"}
    first = client.post("/usage", json=body, headers=keyed).json()
    assert len(first["accepted"]) == 3
    assert "own-1" in first["accepted"]  # an event's own id is kept
    assigned = [i for i in first["accepted"] if i != "own-1"]
    assert all(i.startswith("key-") for i in assigned)
    again = client.post("/usage", json=body, headers=keyed).json()
    assert (again["accepted"], again["duplicates"]) == ([], first["accepted"])
    # the same key from another caller (here one bound to no tenant): its own ids
    other = client.post("/usage", json=body, headers={**ADMIN, "Idempotency-Key": "order-7781"})
    assert len(other.json()["accepted"]) == 3
    assert set(other.json()["accepted"]).isdisjoint(assigned)
    # another key from the same caller: new ids for the id-less events, own-1 a duplicate
    fresh = client.post("/usage", json=body, headers={**ACME, "Idempotency-Key": "x"}).json()
    assert (len(fresh["accepted"]), fresh["duplicates"]) == (2, ["own-1"])
    params = {
        "start": at.isoformat(),
        "end": (at + timedelta(seconds=1)).isoformat(),
        "customer_id": "acme",
    }
    total = client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"]
    assert [row["value"] for row in total] == [str(8 + 8 + 7)]


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there"])
def test_an_idempotency_key_that_is_not_one_is_refused_naming_the_header(
    client: TestClient, key: str
) -> None:
    event = {"event_name": "api_calls", "customer_id": "acme"}
    response = client.post(
        "/usage", json={"events": [event]}, headers={**ACME, "Idempotency-Key": key}
    )
    assert "Idempotency-Key" in refused(response, "Idempotency-Key")


def test_an_idempotency_key_never_makes_two_callers_or_two_requests_share_ids() -> None:
    """Two services (their own admin keys) both using `job-1`, and one reusing a key for
    other events: every event counts. Ids from the key alone made the second a duplicate."""
    keys = {"svc-a": {"scopes": ALL}, "svc-b": {"scopes": ALL}}
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    with TestClient(create_app(AsyncMetering("memory"), keys=keys)) as client:
        a = {"Authorization": "Bearer svc-a", "Idempotency-Key": "job-1"}
        b = {"Authorization": "Bearer svc-b", "Idempotency-Key": "job-1"}
        meter = client.post("/meters", json={"event_name": "api_calls"}, headers=a).json()

        def send(headers: dict[str, str], customer: str, value: int) -> dict[str, Any]:
            event = {
                "event_name": "api_calls",
                "customer_id": customer,
                "value": value,
                "timestamp": at.isoformat(),
            }
            return client.post("/usage", json={"events": [event]}, headers=headers).json()

        assert len(send(a, "acme", 5)["accepted"]) == 1
        assert len(send(b, "globex", 7)["accepted"]) == 1  # another caller, same key
        assert len(send(a, "acme", 9)["accepted"]) == 1  # the key reused for another event
        assert len(send(a, "acme", 5)["duplicates"]) == 1  # the first request, retried
        params = {
            "start": at.isoformat(),
            "end": (at + timedelta(seconds=1)).isoformat(),
            "group_by": "customer_id",
        }
        rows = client.get(f"/usage/{meter['id']}", params=params, headers=a).json()["rows"]
        assert {row["customer_id"]: row["value"] for row in rows} == {"acme": "14", "globex": "7"}


def test_the_pipelines_counters_and_hook_see_usage_sent_to_the_service() -> None:
    """POST /usage and POST /events went around the delivery pipeline: the
    metering_pipeline_* series and the usage_delivered hook never saw them, so the
    operations page's alerts could not fire on a service."""
    from prometheus_client.parser import text_string_to_metric_families

    from metering_core import IngestResult, hookimpl, register_plugin
    from metering_core.plugins import unregister_plugin

    seen: list[IngestResult] = []

    class Watcher:
        @hookimpl
        def usage_delivered(self, provider: str, result: IngestResult) -> None:
            seen.append(result)

    watcher = Watcher()
    register_plugin(watcher)
    keys = {**KEYS, "scraper": {"scopes": ["metrics:read"]}}
    try:
        with TestClient(create_app(AsyncMetering("memory"), keys=keys)) as client:
            client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
            events = [
                {"id": f"p{i}", "event_name": "api_calls", "customer_id": "acme"} for i in range(4)
            ]
            client.post("/usage", json={"events": events}, headers=ADMIN).raise_for_status()
            again = [*events[:1], {"id": "x", "event_name": "nometer", "customer_id": "acme"}]
            client.post("/usage", json={"events": again}, headers=ADMIN).raise_for_status()
            message = {
                "id": "eb-1",
                "detail-type": "INGEST_USAGE",
                "detail": {"event_name": "api_calls", "tenantId": "acme"},
            }
            client.post("/events", json=message, headers=ADMIN).raise_for_status()
            page = client.get("/metrics", headers={"Authorization": "Bearer scraper"}).text
    finally:
        unregister_plugin(watcher)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }
    memory = (("provider", "memory"),)
    assert samples[("metering_pipeline_events_queued_total", memory)] == 7
    assert samples[("metering_pipeline_queue_depth", memory)] == 0
    ingested = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "metering_events_ingested_total"
    }
    assert ingested == {"accepted": 5, "duplicate": 1, "rejected": 1}
    assert sorted(len(r.accepted) + len(r.duplicates) + len(r.rejected) for r in seen) == [1, 2, 4]


def test_no_request_waits_on_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dependency is a coroutine: FastAPI runs a plain function dependency in a
    worker thread, a handoff there and back on each request (the shared `service` was
    one: `/health`, `POST /events` and every read paid it)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dependency ran in a worker thread")

    monkeypatch.setattr("fastapi.dependencies.utils.run_in_threadpool", refuse)
    now = datetime.now(UTC)
    window = {"start": (now - timedelta(hours=1)).isoformat(), "end": now.isoformat()}
    with TestClient(create_app(AsyncMetering("memory"), keys=KEYS)) as client:
        assert client.get("/health").status_code == 200
        made = client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
        assert made.status_code == 201, made.text
        assert client.get("/meters", headers=ADMIN).status_code == 200
        usage = client.get(f"/usage/{made.json()['id']}", params=window, headers=ACME)
        assert usage.status_code == 200, usage.text
        listed = client.get(
            "/usage/events", params={**window, "event_name": "api_calls"}, headers=ACME
        )
        assert listed.status_code == 200, listed.text
