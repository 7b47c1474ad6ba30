"""The events behind a number through the service: filters and customer lists on
`GET /usage/{id}`, `GET /usage/events` and its streamed export, with every key confined
to what it may read."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from metering_core import AsyncMetering, ProviderUnavailableError
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

KEYS = {
    "admin": {"scopes": ["meters:read", "meters:write", "usage:read", "usage:write"]},
    "acme": {"scopes": ["usage:read", "usage:write"], "tenant": "acme"},
}
ADMIN = {"Authorization": "Bearer admin"}
ACME = {"Authorization": "Bearer acme"}
RANGE = {"start": "2026-03-01T00:00:00Z", "end": "2026-03-02T00:00:00Z"}
EVENTS = [  # values are powers of two: every total names the events in it
    ("e1", "acme", "eu", 1, "2026-03-01T10:00:00Z"),
    ("e2", "acme", "us", 2, "2026-03-01T10:01:00Z"),
    ("e3", "globex", "eu", 4, "2026-03-01T10:02:00Z"),
    ("e4", "globex", "us", 8, "2026-03-01T10:02:00Z"),
    ("e5", "initech", "ap", 16, "2026-03-01T10:03:30Z"),
]


@pytest.fixture(params=["memory", "sql"])
def client(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[TestClient, str]]:
    settings = {} if request.param == "memory" else {"url": f"sqlite:///{tmp_path / 'm.db'}"}
    with TestClient(create_app(AsyncMetering(request.param, **settings), keys=KEYS)) as client:
        meter = client.post(
            "/meters", json={"event_name": "api_calls", "dimensions": ["region"]}, headers=ADMIN
        ).json()
        sent = [
            {
                "id": i,
                "event_name": "api_calls",
                "customer_id": c,
                "value": v,
                "timestamp": t,
                "dimensions": {"region": r},
            }
            for i, c, r, v, t in EVENTS
        ]
        client.post("/usage", json={"events": sent}, headers=ADMIN).raise_for_status()
        yield client, meter["id"]


def usage_of(meter: str) -> str:
    return f"/usage/{meter}"


def total(answer: Any) -> int:
    assert answer.status_code == 200, answer.text
    return sum(int(row["value"]) for row in answer.json()["rows"])


def test_filters_and_customer_lists_narrow_the_usage(client: tuple[TestClient, str]) -> None:
    http, meter = client
    usage = f"/usage/{meter}"
    assert total(http.get(usage, params=RANGE, headers=ADMIN)) == 31
    eu_us = [("filter", "region:eu"), ("filter", "region:us")]
    assert total(http.get(usage, params=[*RANGE.items(), *eu_us], headers=ADMIN)) == 15
    listed = [("customer_ids", "globex"), ("customer_ids", "initech")]
    assert total(http.get(usage, params=[*RANGE.items(), *listed], headers=ADMIN)) == 28
    both = [*RANGE.items(), *listed, ("filter", "region:eu")]
    assert total(http.get(usage, params=both, headers=ADMIN)) == 4
    minutes = http.get(usage, params={**RANGE, "window": "minute"}, headers=ADMIN).json()
    assert [(row["start"][11:16], row["value"]) for row in minutes["rows"]] == [
        ("10:00", "1"),
        ("10:01", "2"),
        ("10:02", "12"),
        ("10:03", "16"),
    ]


@pytest.mark.parametrize("bad", ["region", ":eu", "region=eu"])
def test_a_filter_not_in_key_value_form_is_refused_naming_it(
    client: tuple[TestClient, str], bad: str
) -> None:
    http, meter = client
    refused = http.get(f"/usage/{meter}", params={**RANGE, "filter": bad}, headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["error"]["field"].startswith("filter")


def test_a_filter_on_a_dimension_the_meter_lacks_is_refused(
    client: tuple[TestClient, str],
) -> None:
    http, meter = client
    refused = http.get(f"/usage/{meter}", params={**RANGE, "filter": "plan:pro"}, headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "filters"


def pages(http: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**RANGE, "limit": 2, **params, **({"cursor": cursor} if cursor else {})}
        answer = http.get("/usage/events", params=query, headers=headers)
        assert answer.status_code == 200, answer.text
        found += answer.json()["items"]
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            return found


def test_listing_pages_through_the_events_oldest_first(client: tuple[TestClient, str]) -> None:
    http, meter = client
    everything = pages(http, ADMIN, meter_id=meter)
    assert [e["id"] for e in everything] == ["e1", "e2", "e3", "e4", "e5"]
    assert everything[0] | {"ingested_at": None} == {
        "id": "e1",
        "event_name": "api_calls",
        "customer_id": "acme",
        "timestamp": "2026-03-01T10:00:00Z",
        "value": "1",
        "dimensions": {"region": "eu"},
        "cancelled": False,
        "ingested_at": None,
    }
    us = pages(http, ADMIN, event_name="api_calls", filter="region:us")
    assert [e["id"] for e in us] == ["e2", "e4"]
    http.request("DELETE", "/usage", json={"event_ids": ["e4"]}, headers=ADMIN)
    assert [e["id"] for e in pages(http, ADMIN, meter_id=meter, filter="region:us")] == ["e2"]
    shown = pages(http, ADMIN, meter_id=meter, filter="region:us", include_cancelled="true")
    assert [(e["id"], e["cancelled"]) for e in shown] == [("e2", False), ("e4", True)]


def test_the_longest_cursor_a_store_gives_is_taken_back(client: tuple[TestClient, str]) -> None:
    """An id of 100 four-byte characters, last on its page, makes a cursor of some 560
    characters; the service takes it as the next request's `cursor`."""
    http, meter = client
    wide = "\U0001f600" * 100
    event = {"id": wide, "event_name": "api_calls", "customer_id": "acme", "value": 32}
    stamp = {"timestamp": "2026-03-01T09:00:00Z", "dimensions": {"region": "eu"}}
    http.post("/usage", json={"events": [event | stamp]}, headers=ADMIN).raise_for_status()
    first = http.get(
        "/usage/events", params={**RANGE, "meter_id": meter, "limit": 1}, headers=ADMIN
    )
    assert [e["id"] for e in first.json()["items"]] == [wide]
    assert len(first.json()["next_cursor"]) > 500
    assert [e["id"] for e in pages(http, ADMIN, meter_id=meter)] == [
        wide,
        *(i for i, *_ in EVENTS),
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "meter_id"),
        ({"meter_id": "x", "event_name": "api_calls"}, "meter_id"),
        ({"meter_id": "x", "cursor": "bm90LW91cnM="}, "cursor"),
        ({"meter_id": "x", "limit": "1001"}, "limit"),
    ],
)
def test_a_listing_that_names_no_one_meter_or_a_foreign_cursor_is_refused(
    client: tuple[TestClient, str], params: dict[str, str], field: str
) -> None:
    http, meter = client
    params = {k: (meter if v == "x" else v) for k, v in params.items()}
    refused = http.get("/usage/events", params={**RANGE, **params}, headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"].endswith(field)


def test_a_tenant_key_lists_exports_and_filters_only_its_own_events(
    client: tuple[TestClient, str],
) -> None:
    http, meter = client
    own = pages(http, ACME, meter_id=meter)
    assert {e["customer_id"] for e in own} == {"acme"}
    assert len(own) == 2
    for params in (
        {"meter_id": meter, "customer_id": "globex"},
        {"meter_id": "no-such-meter", "customer_id": "globex"},
        {"meter_id": meter, "customer_id": "globex", "filter": "region:eu"},
    ):
        assert (
            http.get("/usage/events", params={**RANGE, **params}, headers=ACME).status_code == 403
        )
        export = http.get("/usage/events/export", params={**RANGE, **params}, headers=ACME)
        assert export.status_code == 403
    exported = http.get("/usage/events/export", params={**RANGE, "meter_id": meter}, headers=ACME)
    assert [json.loads(line)["id"] for line in exported.text.splitlines()] == ["e1", "e2"]

    # the tenant's own events are listed by the ids they are stored by; sent again, such
    # an id is refused, never counted a second time
    event = {"id": "a9", "event_name": "api_calls", "customer_id": "acme", "value": 4}
    stamp = {"timestamp": "2026-03-01T11:00:00Z", "dimensions": {"region": "eu"}}
    http.post("/usage", json={"events": [event | stamp]}, headers=ACME).raise_for_status()
    listed = pages(http, ACME, meter_id=meter)[-1]
    assert listed["id"] != "a9"
    assert listed["value"] == "4"
    again = {k: v for k, v in listed.items() if k not in {"cancelled", "ingested_at"}}
    resent = http.post("/usage", json={"events": [again]}, headers=ACME).json()
    assert list(resent["rejected"]) == [listed["id"]]
    assert "reserved" in resent["rejected"][listed["id"]]
    assert total(http.get(usage_of(meter), params=RANGE, headers=ACME)) == 1 + 2 + 4
    usage = f"/usage/{meter}"
    for path in (usage, "/usage/events", "/usage/events/export"):  # the number, its events
        for listed in (["globex"], ["acme", "globex"]):
            query = [*RANGE.items(), ("meter_id", meter), *(("customer_ids", c) for c in listed)]
            if path == usage:
                query.remove(("meter_id", meter))
            assert http.get(path, params=query, headers=ACME).status_code == 403, path
    query = [*RANGE.items(), ("customer_ids", "acme"), ("filter", "region:eu")]
    assert total(http.get(usage, params=query, headers=ACME)) == 1 + 4
    behind = pages(http, ACME, meter_id=meter, customer_ids="acme", filter="region:eu")
    assert [int(event["value"]) for event in behind] == [1, 4]


def test_the_export_streams_csv_and_json_lines_that_ingest_reads(
    client: tuple[TestClient, str],
) -> None:
    http, meter = client
    params = {**RANGE, "meter_id": meter, "filter": "region:eu"}
    as_csv = http.get("/usage/events/export", params={**params, "format": "csv"}, headers=ADMIN)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert rows == [
        {
            "id": "e1",
            "event_name": "api_calls",
            "customer_id": "acme",
            "timestamp": "2026-03-01T10:00:00+00:00",
            "value": "1",
            "dimensions.region": "eu",
        },
        {
            "id": "e3",
            "event_name": "api_calls",
            "customer_id": "globex",
            "timestamp": "2026-03-01T10:02:00+00:00",
            "value": "4",
            "dimensions.region": "eu",
        },
    ]
    as_lines = http.get("/usage/events/export", params=params, headers=ADMIN)
    assert as_lines.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in as_lines.text.splitlines()][1] == {
        "id": "e3",
        "event_name": "api_calls",
        "customer_id": "globex",
        "timestamp": "2026-03-01T10:02:00+00:00",
        "value": "4",
        "dimensions": {"region": "eu"},
    }
    empty = {**params, "start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"}
    header = http.get("/usage/events/export", params={**empty, "format": "csv"}, headers=ADMIN)
    assert header.text == "id,event_name,customer_id,timestamp,value,dimensions.region\r\n"


def test_a_refused_export_is_an_error_status_not_a_stream(client: tuple[TestClient, str]) -> None:
    http, meter = client
    unknown = http.get("/usage/events/export", params={**RANGE, "meter_id": "nope"}, headers=ADMIN)
    assert unknown.status_code == 404
    bad = http.get(
        "/usage/events/export",
        params={**RANGE, "meter_id": meter, "filter": "plan:x"},
        headers=ADMIN,
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "filters"


def test_an_export_that_fails_midway_is_cut_short_not_ended(tmp_path: Any) -> None:
    """A store failing after the first page: the client sees an incomplete response (no
    final chunk), never a file that ends as a whole one would."""
    metering = AsyncMetering("memory")
    provider = metering.provider
    pages = 0
    listed = provider.list_usage_events

    async def failing_after_one_page(query: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages > 1:
            raise ProviderUnavailableError("the store went away", provider="memory")
        return await listed(query)

    provider.list_usage_events = failing_after_one_page  # type: ignore[method-assign]
    app = create_app(metering, keys=KEYS)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=ADMIN) as http:
        http.post("/meters", json={"event_name": "api_calls"}).raise_for_status()
        sent = [
            {
                "event_name": "api_calls",
                "customer_id": "acme",
                "timestamp": f"2026-03-01T10:{m:02}:00Z",
            }
            for m in range(60)
        ] * 20
        for offset in range(0, len(sent), 500):
            http.post("/usage", json={"events": sent[offset : offset + 500]}).raise_for_status()
        meter = http.get("/meters").json()["items"][0]["id"]
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/usage/events/export", params={**RANGE, "meter_id": meter}).read()
    assert pages == 2
