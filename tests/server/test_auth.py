"""API keys: missing 401, wrong scope 403, tenant-bound keys confined to their tenant."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from metering_core import AsyncMetering, ConfigurationError
from metering_core.server import create_app

ALL = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
KEYS = {
    "admin": {"scopes": ALL},
    "reader": {"scopes": ["meters:read", "usage:read"]},
    "acme": {"scopes": ["usage:read", "usage:write", "customers:write"], "tenant": "acme"},
    "globex": {"scopes": ["usage:write"], "tenant": "globex"},
    "greedy": {"scopes": [*ALL, "metrics:read"], "tenant": "globex"},
    "replicator": {"scopes": ["usage:write", "usage:replicate"]},
}
ADMIN = {"Authorization": "Bearer admin"}
ACME = {"Authorization": "Bearer acme"}
RANGE = {"start": "2026-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"}


def event(event_id: str, customer: str) -> dict[str, object]:
    return {"id": event_id, "event_name": "api_calls", "customer_id": customer, "value": 1}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(AsyncMetering("memory"), keys=KEYS)) as client:
        client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN).raise_for_status()
        yield client


@pytest.fixture
def meter_id(client: TestClient) -> str:
    return str(client.get("/meters", headers=ADMIN).json()["items"][0]["id"])


def error_of(response: object) -> dict[str, str]:
    return response.json()["error"]  # type: ignore[attr-defined, no-any-return]


def test_a_missing_or_unknown_key_is_401(client: TestClient) -> None:
    missing = client.get("/meters")
    assert missing.status_code == 401
    assert error_of(missing)["type"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/meters", headers={"Authorization": "Bearer guess"}).status_code == 401


@pytest.mark.parametrize(
    "path",
    ["/meters", "/usage/events", "/usage/events/export", "/usage/some-meter", "/mirrors"],
)
@pytest.mark.parametrize("authorization", [None, "Bearer guess"])
def test_a_query_a_route_does_not_take_is_refused_only_after_the_key(
    client: TestClient, path: str, authorization: str | None
) -> None:
    """Without a known key the answer is 401, whatever the query: a 422 naming what the
    route takes was an answer to a caller with no right to one. A route with no key
    (`/health`) still refuses the parameter."""
    headers = {"Authorization": authorization} if authorization else {}
    answer = client.get(path, params={"customer": "acme", "limit": "x"}, headers=headers)
    assert answer.status_code == 401, answer.text
    assert client.get(path, params={"customer": "acme"}, headers=ADMIN).status_code == 422
    assert client.get("/health", params={"customer": "acme"}).status_code == 422


def test_a_key_without_the_scope_is_403_and_says_which(client: TestClient) -> None:
    response = client.post(
        "/meters", json={"event_name": "x"}, headers={"Authorization": "Bearer reader"}
    )
    assert response.status_code == 403
    assert "meters:write" in error_of(response)["message"]
    assert client.get("/meters", headers={"Authorization": "Bearer reader"}).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "status", "says"),
    [
        (None, 401, "missing API key"),
        ("Bearer guess", 401, "unknown API key"),
        ("Basic YWRtaW46", 401, "missing API key"),
        ("Bearer ", 401, "missing API key"),
        ("Bearer reader", 403, "usage:write"),
    ],
)
def test_posting_usage_checks_the_key_before_the_body(
    client: TestClient, meter_id: str, authorization: str | None, status: int, says: str
) -> None:
    """The hot route checks its caller itself (not through FastAPI's dependencies): the
    same answers as every other route, given before a byte of the body is parsed."""
    headers = {"Authorization": authorization} if authorization else {}
    for body in (
        b'{"events": [{"id": "e1", "event_name": "api_calls", "customer_id": "t"}]}',
        b"not json at all",
    ):
        response = client.post(
            "/usage", content=body, headers={**headers, "content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert says in error_of(response)["message"]
    assert client.get(f"/usage/{meter_id}", params=RANGE, headers=ADMIN).json()["rows"] == []
    for n, header in enumerate(("bearer admin", "Bearer  admin", "Bearer admin ")):
        sent = client.post(
            "/usage", json={"events": [event(f"e{n}", "t")]}, headers={"Authorization": header}
        )
        assert sent.json()["accepted"] == [f"e{n}"], header  # as every other route reads it
        assert client.get("/meters", headers={"Authorization": header}).status_code == 200


def test_a_tenant_key_cannot_write_another_tenants_usage(client: TestClient, meter_id: str) -> None:
    """Each event is judged alone: the tenant's own is counted, the other refused by the id
    sent, so the client's pipeline dead-letters only the refused one (a whole-batch 403
    sank the good events with it, for good)."""
    mixed = client.post(
        "/usage", json={"events": [event("a1", "acme"), event("g1", "globex")]}, headers=ACME
    )
    assert mixed.json()["accepted"] == ["a1"]
    assert "cannot write usage for 'globex'" in mixed.json()["rejected"]["g1"]
    params = {**RANGE, "customer_id": "globex"}
    assert client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"] == []
    params = {**RANGE, "customer_id": "acme"}
    rows = client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"]
    assert [r["value"] for r in rows] == ["1"]


def test_an_id_sent_twice_with_one_copy_refused_has_one_verdict(
    client: TestClient, meter_id: str
) -> None:
    """Both copies are refused: answered accepted and rejected at once, the client's
    pipeline kept the counted copy as a dead letter under the other's reason."""
    twice = [event("x", "globex"), {**event("x", "acme"), "value": 7}]
    answer = client.post("/usage", json={"events": twice}, headers=ACME).json()
    assert (answer["accepted"], list(answer["rejected"])) == ([], ["x"])
    params = {**RANGE, "customer_id": "acme"}
    assert client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"] == []


def test_a_tenant_key_reads_only_its_tenant(client: TestClient, meter_id: str) -> None:
    client.post(
        "/usage", json={"events": [event("g1", "globex"), event("g2", "globex")]}, headers=ADMIN
    )
    client.post("/usage", json={"events": [event("a1", "acme")]}, headers=ACME).raise_for_status()
    own = client.get(f"/usage/{meter_id}", params=RANGE, headers=ACME).json()
    assert [(r["customer_id"], r["value"]) for r in own["rows"]] == [("acme", "1")]
    other = client.get(
        f"/usage/{meter_id}", params={**RANGE, "customer_id": "globex"}, headers=ACME
    )
    assert other.status_code == 403


def test_a_tenant_key_cannot_cancel_usage_its_own_or_another_tenants(
    client: TestClient, meter_id: str
) -> None:
    """Cancelling lowers a bill: it is the operator's correction. A tenant-bound key has
    every id refused, whoever sent it, and learns nothing of other tenants' ids."""
    client.post(
        "/usage", json={"events": [event("g1", "globex")]}, headers=ADMIN
    ).raise_for_status()
    client.post("/usage", json={"events": [event("a1", "acme")]}, headers=ACME).raise_for_status()
    refused = client.request(
        "DELETE", "/usage", json={"event_ids": ["a1", "g1", "never"]}, headers=ACME
    )
    answer = refused.json()
    assert (refused.status_code, answer["cancelled"], answer["not_found"]) == (200, [], [])
    assert sorted(answer["rejected"]) == ["a1", "g1", "never"]
    assert len(set(answer["rejected"].values())) == 1  # one reason: no id's fate is told
    assert "operator" in answer["rejected"]["a1"]
    total = client.get(f"/usage/{meter_id}", params=RANGE, headers=ADMIN).json()["rows"]
    assert [r["value"] for r in total] == ["2"]  # both events still count
    done = client.request("DELETE", "/usage", json={"event_ids": ["g1"]}, headers=ADMIN)
    assert done.json()["cancelled"] == ["g1"]  # the operator's key can


def test_a_tenant_key_creates_only_its_own_customer_and_deletes_none(client: TestClient) -> None:
    """Deleting its own customer on a billing provider (Stripe) dropped what was not yet
    invoiced: a tenant erasing its own bill, as a cancel would (review)."""
    assert client.post("/customers", json={"id": "globex"}, headers=ACME).status_code == 403
    assert client.post("/customers", json={"id": "acme"}, headers=ACME).status_code == 201
    assert client.delete("/customers/globex", headers=ACME).status_code == 403
    own = client.delete("/customers/acme", headers=ACME)
    assert own.status_code == 403
    assert "cannot delete customers" in error_of(own)["message"]
    offboarding = {"id": "m1", "detail-type": "OFFBOARDING_REQUEST", "detail": {"tenantId": "acme"}}
    assert client.post("/events", json=offboarding, headers=ACME).status_code == 403
    assert client.delete("/customers/acme", headers=ADMIN).status_code == 204


def test_errors_share_one_shape_with_the_field(client: TestClient) -> None:
    bad = client.post(
        "/usage", json={"events": [{**event("x", "acme"), "value": "lots"}]}, headers=ADMIN
    )
    assert bad.status_code == 422
    assert error_of(bad)["field"] == "events.0.value"
    assert "'lots'" in error_of(bad)["message"]
    assert error_of(client.get("/meters/nope", headers=ADMIN))["type"] == "not_found"
    conflict = client.post("/meters", json={"event_name": "api_calls"}, headers=ADMIN)
    assert (conflict.status_code, error_of(conflict)["type"]) == (409, "conflict")


def test_a_service_without_keys_refuses_to_start_unless_told() -> None:
    with pytest.raises(ConfigurationError, match="no API keys"):
        create_app(AsyncMetering("memory"), keys={})
    with TestClient(
        create_app(AsyncMetering("memory"), keys={}, allow_anonymous=True)
    ) as open_client:
        assert open_client.get("/meters").status_code == 200


def test_keys_come_from_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KEYS", '{"from-env": {"scopes": ["meters:read"]}}')
    with TestClient(create_app(AsyncMetering("memory"))) as client:
        assert (
            client.get("/meters", headers={"Authorization": "Bearer from-env"}).status_code == 200
        )
        assert client.get("/meters", headers=ADMIN).status_code == 401


def test_event_bus_messages_follow_the_same_scopes_and_tenants(
    client: TestClient, meter_id: str
) -> None:
    usage = {
        "id": "evb-1",
        "detail-type": "INGEST_USAGE",
        "detail": {"event_name": "api_calls", "tenantId": "acme", "value": 2},
    }
    answer = client.post("/events", json=usage, headers=ACME)
    assert answer.json()["accepted"] == ["evb-1:0"]
    assert client.post("/events", json=usage, headers=ACME).json()["duplicates"] == ["evb-1:0"]
    other = {**usage, "detail": {**usage["detail"], "tenantId": "globex"}}
    refused = client.post("/events", json=other, headers=ACME).json()
    assert (refused["accepted"], list(refused["rejected"])) == ([], ["evb-1:0"])
    onboard = {"type": "ONBOARDING_REQUEST", "data": {"tenantId": "acme", "tenantName": "Acme"}}
    reader = client.post("/events", json=onboard, headers={"Authorization": "Bearer reader"})
    assert (reader.status_code, "customers:write" in error_of(reader)["message"]) == (403, True)
    assert client.post("/events", json=onboard, headers=ACME).json()["name"] == "Acme"
    malformed = client.post("/events", json={"detail-type": "PROVISION"}, headers=ADMIN)
    assert (malformed.status_code, error_of(malformed)["field"]) == (422, "detail-type")


def test_unknown_routes_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    missing = client.get("/no-such-route", headers=ADMIN)
    assert (missing.status_code, error_of(missing)["type"]) == (404, "not_found")
    wrong = client.patch("/meters", headers=ADMIN)
    assert (wrong.status_code, error_of(wrong)["type"]) == (405, "http_error")


def test_any_valid_key_reads_capabilities_but_no_anonymous_caller(client: TestClient) -> None:
    assert client.get("/capabilities", headers=ACME).json()["max_batch_size"] >= 1
    assert client.get("/capabilities").status_code == 401


def test_a_tenant_key_cannot_change_the_meters_every_tenant_shares_whatever_its_scopes(
    client: TestClient, meter_id: str
) -> None:
    """One tenant renaming or deleting a meter took every other tenant's usage with it
    (probe): meters are the operator's to manage."""
    client.post("/usage", json={"events": [event("a1", "acme")]}, headers=ACME)
    greedy = {"Authorization": "Bearer greedy"}
    tries = [
        client.post("/meters", json={"event_name": "mine"}, headers=greedy),
        client.put(f"/meters/{meter_id}", json={"display_name": "x"}, headers=greedy),
        client.delete(f"/meters/{meter_id}", headers=greedy),
    ]
    for refused in tries:
        assert refused.status_code == 403
        assert "cannot change meters" in error_of(refused)["message"]
    metrics = client.get("/metrics", headers=greedy)  # every tenant's counts
    assert metrics.status_code == 403
    assert "cannot read the service's metrics" in error_of(metrics)["message"]
    assert client.get(f"/meters/{meter_id}", headers=greedy).json()["display_name"] == "api_calls"
    assert [m["event_name"] for m in client.get("/meters", headers=ADMIN).json()["items"]] == [
        "api_calls"
    ]
    params = {**RANGE, "customer_id": "acme"}
    rows = client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"]
    assert [r["value"] for r in rows] == ["1"]


def test_the_same_id_from_two_tenants_is_two_events_and_neither_learns_of_the_other(
    client: TestClient, meter_id: str
) -> None:
    globex = {"Authorization": "Bearer globex"}
    first = client.post("/usage", json={"events": [event("order-42", "globex")]}, headers=globex)
    assert first.json()["accepted"] == ["order-42"]
    later = {**event("order-42", "acme"), "value": 1000}
    answer = client.post("/usage", json={"events": [later]}, headers=ACME)
    assert answer.json() == {"accepted": ["order-42"], "duplicates": [], "rejected": {}}
    again = client.post("/usage", json={"events": [later]}, headers=ACME)
    assert again.json()["duplicates"] == ["order-42"]  # a resend in its own space: no charge

    def total(customer: str) -> str:
        params = {**RANGE, "customer_id": customer}
        rows = client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"]
        return str(rows[0]["value"]) if rows else "0"

    assert (total("acme"), total("globex")) == ("1000", "1")


def test_no_other_key_can_send_an_id_in_a_tenants_stored_form(client: TestClient) -> None:
    """A tenant's events are held as tenant-<48 hex>. An unbound key sending such an id
    for another customer shadowed the tenant's own event (answered as a duplicate, never
    counted), and the tenant's cancel then removed the other customer's event."""
    client.post("/usage", json={"events": [event("order-1", "acme")]}, headers=ACME)
    spaced = b"4:acme:order-2"
    stored_form = "tenant-" + hashlib.sha256(spaced).hexdigest()[:48]
    planted = client.post("/usage", json={"events": [event(stored_form, "globex")]}, headers=ADMIN)
    assert "reserved" in planted.json()["rejected"][stored_form]
    own = client.post("/usage", json={"events": [event("order-2", "acme")]}, headers=ACME)
    assert own.json()["accepted"] == ["order-2"]
    ordinary = client.post("/usage", json={"events": [event("tenant-7", "globex")]}, headers=ADMIN)
    assert ordinary.json()["accepted"] == ["tenant-7"]


def test_a_key_that_may_replicate_writes_a_tenants_event_under_its_stored_id(
    client: TestClient,
) -> None:
    """A ledger forwarding a tenant's event, or an export loaded back: the stored id is
    the tenant's event here too, and the tenant sending it is then a duplicate."""
    stored_form = "tenant-" + hashlib.sha256(b"4:acme:order-9").hexdigest()[:48]
    copied = client.post(
        "/usage",
        json={"events": [event(stored_form, "acme")]},
        headers={"Authorization": "Bearer replicator"},
    )
    assert copied.json()["accepted"] == [stored_form]
    own = client.post("/usage", json={"events": [event("order-9", "acme")]}, headers=ACME)
    assert own.json()["duplicates"] == ["order-9"]
    refused = client.post("/usage", json={"events": [event(stored_form, "acme")]}, headers=ADMIN)
    assert "'usage:replicate'" in refused.json()["rejected"][stored_form]


def test_a_tenant_key_cannot_lower_its_own_usage(client: TestClient, meter_id: str) -> None:
    client.post("/usage", json={"events": [event("a1", "acme")]}, headers=ACME).raise_for_status()
    lowered = {**event("a2", "acme"), "value": -5000}
    refused = client.post("/usage", json={"events": [lowered]}, headers=ACME).json()
    assert "cannot lower its usage: value=-5000" in refused["rejected"]["a2"]
    params = {**RANGE, "customer_id": "acme"}
    rows = client.get(f"/usage/{meter_id}", params=params, headers=ADMIN).json()["rows"]
    assert [r["value"] for r in rows] == ["1"]
    correction = {**event("fix-1", "acme"), "value": -1}
    assert client.post("/usage", json={"events": [correction]}, headers=ADMIN).status_code == 200


@pytest.mark.parametrize("aggregation", ["latest", "min", "avg"])
def test_a_tenant_key_cannot_write_to_a_meter_its_events_could_lower(
    client: TestClient, aggregation: str
) -> None:
    """A later 0 (latest), a smaller value (min) or many zeros (avg) would lower what the
    operator recorded: a tenant-bound key writes only meters its events can only raise."""
    meter = client.post(
        "/meters", json={"event_name": "seats", "aggregation": aggregation}, headers=ADMIN
    ).json()
    recorded = {**event("s1", "acme"), "event_name": "seats", "value": 50}
    client.post("/usage", json={"events": [recorded]}, headers=ADMIN).raise_for_status()
    lower = {**recorded, "id": "s2", "value": 0, "timestamp": "2029-12-31T00:00:00Z"}
    refused = client.post("/usage", json={"events": [event("a1", "acme"), lower]}, headers=ACME)
    assert refused.json()["accepted"] == ["a1"]
    assert f"the {aggregation} meter" in refused.json()["rejected"]["s2"]
    assert "may only raise usage" in refused.json()["rejected"]["s2"]
    bus = {"id": "m1", "detail-type": "INGEST_USAGE", "detail": {**lower, "id": "s3"}}
    assert list(client.post("/events", json=bus, headers=ACME).json()["rejected"]) == ["s3"]
    rows = client.get(f"/usage/{meter['id']}", params=RANGE, headers=ADMIN).json()["rows"]
    assert [row["value"] for row in rows] == ["50"]
    assert client.post("/usage", json={"events": [lower]}, headers=ADMIN).json()["accepted"]


def test_a_tenant_key_writes_meters_its_events_can_only_raise(client: TestClient) -> None:
    raised_only = ("max", "count", "unique_count")
    for aggregation in raised_only:
        spec = {"event_name": f"m-{aggregation}", "aggregation": aggregation}
        if aggregation == "unique_count":
            spec["unique_dimension"] = "user"
        client.post("/meters", json=spec, headers=ADMIN).raise_for_status()
    for aggregation in raised_only:
        sent = {**event(f"r-{aggregation}", "acme"), "event_name": f"m-{aggregation}"}
        sent["dimensions"] = {"user": "u1"}
        answer = client.post("/usage", json={"events": [sent]}, headers=ACME)
        assert answer.json()["accepted"] == [sent["id"]], answer.text


def test_a_meter_created_a_moment_ago_is_checked_from_its_first_event(client: TestClient) -> None:
    """The service keeps a copy of which meters could be lowered; creating a meter through
    it drops the copy, so the new meter is checked from its first event."""
    client.post("/usage", json={"events": [event("x1", "acme")]}, headers=ACME).raise_for_status()
    client.post(
        "/meters", json={"event_name": "seats", "aggregation": "latest"}, headers=ADMIN
    ).raise_for_status()
    sent = {**event("x2", "acme"), "event_name": "seats", "value": 0}
    answer = client.post("/usage", json={"events": [sent]}, headers=ACME).json()
    assert "the latest meter" in answer["rejected"]["x2"]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_tenants_right_to_a_meter_is_judged_by_the_store_not_a_stale_copy(
    store: str, request: pytest.FixtureRequest, tmp_path: object
) -> None:
    """Two services over one store: one keeps a copy of the meters (a sum meter), the
    other replaces it with a latest meter. The first must still refuse a tenant's event
    that would lower the new meter: it judged by its copy, kept up to 30 s."""
    url = (
        f"sqlite:///{tmp_path}/shared.db"
        if store == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    first = TestClient(create_app(AsyncMetering("sql", url=url), keys=KEYS))
    second = TestClient(create_app(AsyncMetering("sql", url=url), keys=KEYS))
    with first, second:
        old = first.post("/meters", json={"event_name": "seats"}, headers=ADMIN).json()
        sent = {**event("ok-1", "acme"), "event_name": "seats", "value": 5}
        assert first.post("/usage", json={"events": [sent]}, headers=ACME).json()["accepted"]
        assert second.delete(f"/meters/{old['id']}", headers=ADMIN).status_code == 204
        second.post(
            "/meters", json={"event_name": "seats", "aggregation": "latest"}, headers=ADMIN
        ).raise_for_status()
        lowering = {**sent, "id": "low-1", "value": 0}
        answer = first.post("/usage", json={"events": [lowering]}, headers=ACME).json()
        assert answer["accepted"] == []
        assert "the latest meter" in answer["rejected"]["low-1"]


def test_an_event_name_without_a_meter_costs_only_its_own_events(client: TestClient) -> None:
    """Batches naming an event with no meter, sent back to back: each is answered per
    event, the good ones counted (a 429 for the whole batch, once a second, sank them)."""
    for n in range(5):
        typo = {**event(f"t{n}", "acme"), "event_name": "api_callz"}
        answer = client.post(
            "/usage", json={"events": [event(f"g{n}", "acme"), typo]}, headers=ACME
        ).json()
        assert answer["accepted"] == [f"g{n}"]
        assert "no meter" in answer["rejected"][f"t{n}"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/meters"),
        ("PUT", "/meters/m1"),
        ("DELETE", "/usage"),
        ("POST", "/customers"),
        ("POST", "/events"),
    ],
)
def test_no_body_is_parsed_for_a_caller_without_a_known_key(
    client: TestClient, method: str, path: str
) -> None:
    """FastAPI parses a route's body before the dependencies that check the key: anyone
    could make the service parse 16 MiB of JSON a request. A body that is not even JSON
    shows whether it was read: 401, not a 422 about the body."""
    for headers in ({}, {"Authorization": "Bearer guess"}):
        answer = client.request(
            method,
            path,
            content=b"{not json",
            headers={**headers, "content-type": "application/json"},
        )
        assert answer.status_code == 401, answer.text
        assert error_of(answer)["type"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    known = client.request(
        method, path, content=b"{not json", headers={**ADMIN, "content-type": "application/json"}
    )
    assert (known.status_code, error_of(known)["field"]) == (422, "body")
