"""The exact requests the HTTP provider sends, and how each error answer is mapped (respx)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
import respx
from metering_http import HttpProvider, HttpSettings

from metering_core import (
    AuthenticationError,
    Capabilities,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    UnsupportedOperationError,
    UsageEvent,
    UsageQuery,
    ValidationError,
)

BASE = "http://metering.test"


def only_request(route: respx.Route) -> httpx.Request:
    assert route.call_count == 1
    return route.calls.last.request


SECRET = "sk_test_do_not_print"


@pytest.fixture
async def provider() -> AsyncIterator[HttpProvider]:
    provider = HttpProvider(HttpSettings(base_url=BASE, api_key=SECRET))
    yield provider
    await provider.aclose()


@respx.mock
async def test_ingest_posts_one_batch_with_the_key_and_exact_values(provider: HttpProvider) -> None:
    route = respx.post(f"{BASE}/usage").respond(
        200, json={"accepted": ["e1"], "duplicates": ["e2"], "rejected": {}}
    )
    at = datetime(2026, 11, 1, 12, tzinfo=UTC)
    events = [
        UsageEvent(
            id="e1", event_name="api_calls", customer_id="t1", value=Decimal("0.1"), timestamp=at
        ),
        UsageEvent(
            id="e2", event_name="api_calls", customer_id="t1", timestamp=at, dimensions={"r": "eu"}
        ),
    ]
    result = await provider.ingest_batch(events)
    assert result.duplicates == ["e2"]
    request = only_request(route)
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    sent = json.loads(request.content)["events"]
    assert [e["id"] for e in sent] == ["e1", "e2"]
    assert sent[0]["value"] == "0.1"  # Decimal as a string: exact end to end
    assert sent[0]["timestamp"] == "2026-11-01T12:00:00Z"
    assert sent[1]["dimensions"] == {"r": "eu"}


@respx.mock
async def test_usage_query_goes_as_query_parameters(provider: HttpProvider) -> None:
    route = respx.get(f"{BASE}/usage/mtr_1").respond(
        200,
        json={
            "meter_id": "mtr_1",
            "aggregation": "sum",
            "start": "2026-11-01T00:00:00Z",
            "end": "2026-11-02T00:00:00Z",
            "rows": [],
        },
    )
    query = UsageQuery(
        meter_id="mtr_1",
        customer_id="t1",
        start=datetime(2026, 11, 1, tzinfo=UTC),
        end=datetime(2026, 11, 2, tzinfo=UTC),
        window="hour",
        group_by=("customer_id", "region"),
        tz="Europe/Paris",
    )
    await provider.fetch_usage(query)
    params = only_request(route).url.params
    assert params.get_list("group_by") == ["customer_id", "region"]
    assert (params["customer_id"], params["window"], params["tz"]) == ("t1", "hour", "Europe/Paris")
    assert params["start"] == "2026-11-01T00:00:00+00:00"


@respx.mock
async def test_cancel_sends_ids_and_event_name_in_a_delete_body(provider: HttpProvider) -> None:
    respx.get(f"{BASE}/capabilities").respond(200, content=Capabilities().model_dump_json())
    route = respx.delete(f"{BASE}/usage").respond(
        200, json={"cancelled": ["e1"], "not_found": [], "rejected": {}}
    )
    await provider.cancel_usage_events(["e1"], event_name="api_calls")
    assert json.loads(only_request(route).content) == {
        "event_ids": ["e1"],
        "event_name": "api_calls",
    }


def error(status: int, kind: str, message: str = "nope", **extra: object) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message, **extra}})


@pytest.mark.parametrize("status", [400, 401, 500])
@respx.mock
async def test_a_key_the_service_echoes_back_never_reaches_an_error_or_a_log(
    provider: HttpProvider, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A service (or a proxy answering in its shape) quoting the request's Authorization
    put the key in the exception and in every log line that quoted it (probe)."""

    def echo(request: httpx.Request) -> httpx.Response:
        said = f"bad key {request.headers['Authorization']} (token {SECRET})"
        return error(status, "unauthorized" if status == 401 else "validation_error", said)

    respx.get(f"{BASE}/meters/m").mock(side_effect=echo)
    with pytest.raises(MeteringError) as caught:
        await provider.fetch_meter("m")
    assert SECRET not in str(caught.value)
    assert "bad key **********" in str(caught.value)
    assert SECRET not in caplog.text


@respx.mock
async def test_a_short_key_echoed_with_its_scheme_is_masked_and_the_message_kept() -> None:
    provider = HttpProvider(HttpSettings(base_url=BASE, api_key="k"))

    def echo(request: httpx.Request) -> httpx.Response:
        return error(422, "validation_error", f"key {request.headers['Authorization']}: kept")

    respx.get(f"{BASE}/meters/m").mock(side_effect=echo)
    with pytest.raises(ValidationError) as caught:
        await provider.fetch_meter("m")
    await provider.aclose()
    assert "key **********: kept" in str(caught.value)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (error(404, "not_found"), NotFoundError),
        (error(409, "conflict"), ConflictError),
        (error(422, "validation_error", field="event_name"), ValidationError),
        (error(400, "unsupported_operation"), UnsupportedOperationError),
        (error(401, "unauthorized"), AuthenticationError),
        (error(403, "forbidden"), AuthenticationError),
        (error(503, "provider_unavailable"), ProviderUnavailableError),
        (httpx.Response(502, text="<html>bad gateway</html>"), ProviderUnavailableError),
        (error(500, "configuration_error"), ProviderError),  # another backend's 500
        (error(503, "configuration_error"), ProviderUnavailableError),
        (error(503, "provider_authentication"), ProviderUnavailableError),
        (error(503, "provider_error"), ProviderUnavailableError),
        (error(500, "internal_error"), ProviderUnavailableError),
        (httpx.Response(400, text="malformed"), ValidationError),
    ],
)
@respx.mock
async def test_error_answers_map_to_the_core_hierarchy(
    provider: HttpProvider, response: httpx.Response, expected: type[Exception]
) -> None:
    respx.get(f"{BASE}/meters/m").mock(return_value=response)
    with pytest.raises(expected) as caught:
        await provider.fetch_meter("m")
    assert type(caught.value) is expected
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("status", [500, 503])
@respx.mock
async def test_a_misconfigured_service_is_retried_never_taken_as_refused_data(
    provider: HttpProvider, status: int, tmp_path: object
) -> None:
    """The events are fine; the service is not. Retried up to max_attempts without a spool
    (then reported, saying why); with one, kept and retried, never a dead letter."""
    from metering_core import AsyncMetering

    respx.get(f"{BASE}/capabilities").respond(200, content=Capabilities().model_dump_json())
    route = respx.post(f"{BASE}/usage").mock(
        return_value=error(status, "configuration_error", "no STRIPE key")
    )
    async with AsyncMetering(provider, linger=0, retry_backoff=0.001, max_attempts=3) as m:
        await m.ingest_usage_event(id="a", event_name="api_calls", customer_id="t1")
        rejected = (await m.flush()).rejected
    assert route.call_count == 3
    assert "gave up after 3 attempts" in rejected["a"]
    assert "misconfigured: no STRIPE key" in rejected["a"]
    spooled = HttpProvider(HttpSettings(base_url=BASE, api_key=SECRET))
    async with AsyncMetering(
        spooled,
        linger=0,
        retry_backoff=0.001,
        max_attempts=3,
        delivery_timeout=0.5,
        spool_path=f"{tmp_path}/spool.db",
    ) as m:
        await m.ingest_usage_event(id="b", event_name="api_calls", customer_id="t1")
        with pytest.raises(TimeoutError):
            await m.flush(timeout=0.5)
        assert route.call_count > 6  # still trying past max_attempts
        assert m.dead_letters() == []


@respx.mock
async def test_a_foreign_error_body_is_never_copied_into_the_message(
    provider: HttpProvider,
) -> None:
    echoed = f"<pre>Authorization: Bearer sk_live_LEAKED\nX-Key: {SECRET}</pre>" + "x" * 10**6
    respx.get(f"{BASE}/meters/m").mock(return_value=httpx.Response(502, text=echoed))
    with pytest.raises(ProviderUnavailableError) as caught:
        await provider.fetch_meter("m")
    message = str(caught.value)
    assert "sk_live_LEAKED" not in message
    assert SECRET not in message
    assert "HTTP 502" in message
    assert len(message) < 300


@respx.mock
async def test_a_huge_message_in_the_error_shape_is_clipped(provider: HttpProvider) -> None:
    respx.get(f"{BASE}/meters/m").mock(return_value=error(422, "validation_error", "v" * 10**6))
    with pytest.raises(ValidationError) as caught:
        await provider.fetch_meter("m")
    assert len(str(caught.value)) < 1_000


@respx.mock
async def test_validation_errors_keep_the_field(provider: HttpProvider) -> None:
    respx.get(f"{BASE}/meters/m").mock(
        return_value=error(422, "validation_error", "bad", field="limit")
    )
    with pytest.raises(ValidationError) as caught:
        await provider.fetch_meter("m")
    assert caught.value.field == "limit"


@respx.mock
async def test_429_carries_retry_after(provider: HttpProvider) -> None:
    respx.post(f"{BASE}/usage").mock(
        return_value=httpx.Response(
            429,
            headers={"Retry-After": "3"},
            json={"error": {"type": "rate_limited", "message": "slow"}},
        )
    )
    with pytest.raises(RateLimitedError) as caught:
        await provider.ingest_batch([UsageEvent(event_name="a", customer_id="t")])
    assert caught.value.retry_after == 3.0
    assert caught.value.retryable


@respx.mock
async def test_connection_failures_are_retryable_unavailability(provider: HttpProvider) -> None:
    respx.get(f"{BASE}/meters/m").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ProviderUnavailableError) as caught:
        await provider.fetch_meter("m")
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


@respx.mock
async def test_capabilities_are_the_services_fetched_once(provider: HttpProvider) -> None:
    route = respx.get(f"{BASE}/capabilities").respond(
        200, content=Capabilities(max_batch_size=7, group_by=False).model_dump_json()
    )
    assert (await provider.load_capabilities()).max_batch_size == 7
    assert not (await provider.load_capabilities()).group_by
    assert route.call_count == 1


def test_the_key_never_shows_in_repr_or_settings() -> None:
    settings = HttpSettings(base_url=BASE, api_key=SECRET)
    assert SECRET not in repr(settings)
    assert SECRET not in repr(HttpProvider(settings))


def _usage_ok(request: httpx.Request) -> httpx.Response:
    ids = [e["id"] for e in json.loads(request.content)["events"]]
    return httpx.Response(200, json={"accepted": ids, "duplicates": [], "rejected": {}})


@pytest.mark.parametrize(
    "capabilities",
    [httpx.Response(404, text="no such route"), httpx.Response(503, text="down")],
)
@respx.mock
def test_ingestion_needs_no_route_but_post_usage(
    capabilities: httpx.Response, tmp_path: object
) -> None:
    from metering_core import Metering

    respx.get(f"{BASE}/capabilities").mock(return_value=capabilities)
    respx.post(f"{BASE}/usage").mock(side_effect=_usage_ok)
    spool = f"{tmp_path}/spool.db"
    with Metering("http", base_url=BASE, spool_path=spool, linger=0) as m:
        ids = m.ingest_usage_events([{"event_name": "a", "customer_id": "t"} for _ in range(4)])
        assert sorted(m.flush(timeout=10).accepted) == sorted(ids)
        assert m.dead_letters() == []


@pytest.mark.parametrize(
    "first",
    [
        httpx.Response(408, text="proxy timeout"),
        httpx.Response(404, text="<html>deploying</html>"),
        httpx.Response(200, text="<html>maintenance</html>"),
        httpx.Response(502, text="bad gateway"),
    ],
)
@respx.mock
def test_a_foreign_answer_is_retried_never_a_dead_letter(
    first: httpx.Response, tmp_path: object
) -> None:
    from metering_core import Metering

    respx.get(f"{BASE}/capabilities").respond(200, content=Capabilities().model_dump_json())
    answers = iter([first])
    respx.post(f"{BASE}/usage").mock(side_effect=lambda r: next(answers, None) or _usage_ok(r))
    with Metering(
        "http", base_url=BASE, spool_path=f"{tmp_path}/spool.db", linger=0, retry_backoff=0.01
    ) as m:
        event_id = m.ingest_usage_event(event_name="a", customer_id="t")
        assert m.flush(timeout=10).accepted == [event_id]
        assert m.dead_letters() == []


@respx.mock
def test_a_batch_the_service_finds_too_large_is_split() -> None:
    from metering_core import Metering

    respx.get(f"{BASE}/capabilities").respond(200, content=Capabilities().model_dump_json())

    def small_only(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["events"]) > 2:
            return httpx.Response(413, text="<html>Request Entity Too Large</html>")
        return _usage_ok(request)

    respx.post(f"{BASE}/usage").mock(side_effect=small_only)
    with Metering("http", base_url=BASE, linger=0) as m:
        ids = m.ingest_usage_events([{"event_name": "a", "customer_id": "t"} for _ in range(7)])
        assert sorted(m.flush(timeout=10).accepted) == sorted(ids)


@respx.mock
async def test_an_answer_that_cannot_be_decoded_is_retried_not_a_dead_letter(
    provider: HttpProvider,
) -> None:
    """The service stored the batch, then its 200 came back with a body that cannot be
    decoded (a broken gzip stream): the outcome is unknown, so the batch is sent again and
    the ids settle it, instead of every event being reported rejected."""
    from metering_core import AsyncMetering

    respx.get(f"{BASE}/capabilities").respond(200, content=Capabilities().model_dump_json())
    answers = iter(
        [
            httpx.Response(
                200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
            ),
            httpx.Response(200, json={"accepted": [], "duplicates": ["a"], "rejected": {}}),
        ]
    )
    route = respx.post(f"{BASE}/usage").mock(side_effect=lambda request: next(answers))
    async with AsyncMetering(provider, linger=0, retry_backoff=0.001) as m:
        await m.ingest_usage_event(id="a", event_name="api_calls", customer_id="t1")
        report = await m.flush()
    assert route.call_count == 2
    assert (report.duplicates, report.rejected) == (["a"], {})
