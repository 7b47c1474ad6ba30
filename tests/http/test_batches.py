"""Batches (ingestion and cancellation): the provider splits to the service's limit; the
service refuses larger ones whole."""

from __future__ import annotations

import json

import httpx
import respx
from fastapi.testclient import TestClient
from metering_http import HttpProvider, HttpSettings

from metering_core import AsyncMetering, Capabilities, UsageEvent
from metering_core.server import create_app

BASE = "http://metering.test"


@respx.mock
async def test_the_provider_splits_batches_to_the_services_limit() -> None:
    respx.get(f"{BASE}/capabilities").respond(
        200, content=Capabilities(max_batch_size=2).model_dump_json()
    )

    def accept(request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.content)["events"]]
        return httpx.Response(200, json={"accepted": ids, "duplicates": [], "rejected": {}})

    route = respx.post(f"{BASE}/usage").mock(side_effect=accept)
    provider = HttpProvider(HttpSettings(base_url=BASE))
    events = [UsageEvent(id=f"e{i}", event_name="a", customer_id="t") for i in range(5)]
    result = await provider.ingest_usage_events(events)
    await provider.aclose()
    sizes = [len(json.loads(call.request.content)["events"]) for call in route.calls]
    assert sizes == [2, 2, 1]
    assert result.accepted == [f"e{i}" for i in range(5)]


def test_the_service_refuses_a_batch_over_its_limit_whole() -> None:
    metering = AsyncMetering("memory", max_batch_size=2)
    app = create_app(metering, keys={"k": {"scopes": ["usage:write", "meters:write"]}})
    with TestClient(app, headers={"Authorization": "Bearer k"}) as client:
        client.post("/meters", json={"event_name": "a"}).raise_for_status()
        events = [{"id": f"e{i}", "event_name": "a", "customer_id": "t"} for i in range(3)]
        refused = client.post("/usage", json={"events": events})
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == "events"
        accepted = client.post("/usage", json={"events": events[:2]}).json()["accepted"]
        assert accepted == ["e0", "e1"]  # e0, e1 were not half-applied by the refusal


@respx.mock
async def test_cancellation_is_split_to_the_same_limit_and_merged() -> None:
    respx.get(f"{BASE}/capabilities").respond(
        200, content=Capabilities(max_batch_size=2).model_dump_json()
    )

    def cancel(request: httpx.Request) -> httpx.Response:
        first, *rest = json.loads(request.content)["event_ids"]
        return httpx.Response(200, json={"cancelled": [first], "not_found": rest, "rejected": {}})

    route = respx.delete(f"{BASE}/usage").mock(side_effect=cancel)
    provider = HttpProvider(HttpSettings(base_url=BASE))
    result = await provider.cancel_usage_events(["a", "b", "c"], event_name="x")
    await provider.aclose()
    sent = [json.loads(call.request.content) for call in route.calls]
    assert sent == [
        {"event_ids": ["a", "b"], "event_name": "x"},
        {"event_ids": ["c"], "event_name": "x"},
    ]
    assert (result.cancelled, result.not_found) == (["a", "c"], ["b"])


def test_the_service_refuses_too_many_ids_to_cancel() -> None:
    app = create_app(
        AsyncMetering("memory", max_batch_size=2), keys={"k": {"scopes": ["usage:write"]}}
    )
    with TestClient(app, headers={"Authorization": "Bearer k"}) as client:
        refused = client.request("DELETE", "/usage", json={"event_ids": ["a", "b", "c"]})
        assert (refused.status_code, refused.json()["error"]["field"]) == (422, "event_ids")
        assert client.request("DELETE", "/usage", json={"event_ids": ["a", "b"]}).status_code == 200


def test_a_batch_over_the_services_body_limit_is_sent_again_in_halves() -> None:
    """The service refuses a body over its limit (413); the client's pipeline halves the
    batch until each half fits, and every event is counted once."""
    from datetime import UTC, datetime, timedelta

    from metering_core import Metering
    from metering_core.testing.serving import serve_in_thread

    keys = {"k": {"scopes": ["usage:write", "usage:read", "meters:write"]}}
    app = create_app(AsyncMetering("memory"), keys=keys, max_body_bytes=20_000)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    events = [
        UsageEvent(id=f"e{i}", event_name="a", customer_id="t", value=i, timestamp=at)
        for i in range(400)
    ]
    with serve_in_thread(app) as url, Metering("http", base_url=url, api_key="k") as m:
        meter = m.create_meter(event_name="a")
        m.ingest_usage_events(events)
        report = m.flush()
        total = m.fetch_usage(meter.id, start=at, end=at + timedelta(hours=1)).total
    assert (len(report.accepted), report.rejected) == (400, {})
    assert total == sum(range(400))


def test_a_tenant_keys_refused_event_does_not_sink_the_rest_of_its_batch() -> None:
    """A tenant-bound key's batch with one event it may not send (a negative correction)
    is answered per event: 49 are counted, one is refused with its reason. A whole-batch
    403 used to dead-letter all 50 for good."""
    from datetime import UTC, datetime, timedelta

    from metering_core import Metering
    from metering_core.testing.serving import serve_in_thread

    keys = {
        "admin": {"scopes": ["meters:write", "usage:read"]},
        "acme": {"scopes": ["usage:write"], "tenant": "acme"},
    }
    at = datetime(2026, 3, 1, tzinfo=UTC)
    events = [
        UsageEvent(id=f"e{i}", event_name="a", customer_id="acme", value=1, timestamp=at)
        for i in range(49)
    ]
    events.append(UsageEvent(id="fix", event_name="a", customer_id="acme", value=-3, timestamp=at))
    app = create_app(AsyncMetering("memory"), keys=keys)
    with serve_in_thread(app) as url, Metering("http", base_url=url, api_key="admin") as admin:
        meter = admin.create_meter(event_name="a")
        with Metering("http", base_url=url, api_key="acme") as tenant:
            tenant.ingest_usage_events(events)
            report = tenant.flush()
        total = admin.fetch_usage(meter.id, start=at, end=at + timedelta(hours=1)).total
    assert (len(report.accepted), list(report.rejected)) == (49, ["fix"])
    assert "cannot lower its usage" in report.rejected["fix"]
    assert total == 49
