"""The published contract: the committed OpenAPI document is current, every status the
service answers is documented in the one error shape, and schemathesis finds no answer
outside the document, over memory, SQLite and PostgreSQL, with admin, read-only and
tenant-bound keys.

One check is left out: `positive_data_acceptance` (a request the schema allows must be
accepted). Some rules cannot be stated in JSON Schema: an opaque cursor must be one the
provider gave, a time zone must exist, `unique_dimension` belongs to unique_count meters
only, a group_by key must be one of the meter's dimensions. Those answer 422, naming the
field, which the document lists for every route."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from metering_core import AsyncMetering
from metering_core.server import create_app
from tests.examples import examples

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
ALL = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
KEYS = {
    "admin": {"scopes": ALL},
    "reader": {"scopes": ["meters:read", "usage:read"]},
    "acme": {"scopes": ["usage:read", "usage:write"], "tenant": "acme"},
}


def test_the_committed_openapi_document_is_current() -> None:
    current = create_app(AsyncMetering("memory"), allow_anonymous=True).openapi()
    committed = json.loads(OPENAPI.read_text())
    assert committed == json.loads(json.dumps(current)), (
        "docs/openapi.json is stale: run python -m metering_core.server > docs/openapi.json"
    )


def test_every_route_documents_every_status_it_answers_in_the_error_shape() -> None:
    document = json.loads(OPENAPI.read_text())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error = {"$ref": "#/components/schemas/Error"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            documented = operation["responses"]
            expected = {"404", "405", "413", "422", "500"}
            if path == "/webhooks/{source}":  # signed by the provider, not a key
                expected |= {"400", "503"}
                assert "security" not in operation
            elif path != "/health":
                expected |= {"400", "401", "403", "409", "429", "503"}
            assert expected <= set(documented), (method, path)
            for status in expected:
                assert documented[status]["content"]["application/json"]["schema"] == error
            if path != "/health":
                assert "Retry-After" in documented["503"]["headers"]


def test_the_documents_constraints_are_the_validations() -> None:
    document = json.loads(OPENAPI.read_text())
    query = {
        (path, parameter["name"]): parameter["schema"]
        for path, operations in document["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    }
    assert query[("/meters", "cursor")]["anyOf"][0]["minLength"] == 1
    assert query[("/usage/{meter_id}", "customer_id")]["anyOf"][0]["minLength"] == 1
    assert document["components"]["schemas"]["MeterUpdate"]["minProperties"] == 1
    dimensions = document["components"]["schemas"]["MeterUpdate"]["properties"]["dimensions"]
    assert dimensions["type"] == "array"  # never null


@pytest.fixture(scope="module")
def client() -> Any:
    with TestClient(create_app(AsyncMetering("memory"), keys=KEYS)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/meters", "GET, POST"),
        ("PATCH", "/meters/m1", "DELETE, GET, PUT"),
        ("PUT", "/usage", "DELETE, POST"),
        ("GET", "/events", "POST"),
    ],
)
def test_a_405_lists_every_method_the_path_takes(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path, headers={"Authorization": "Bearer admin"})
    assert (response.status_code, response.headers["Allow"]) == (405, allowed)
    assert response.json()["error"]["type"] == "http_error"


@pytest.mark.parametrize("timestamp", [1_700_000_000, 1_700_000_000_000, 1.5, "2026", "17"])
def test_a_numeric_timestamp_is_refused_naming_the_field(
    client: TestClient, timestamp: float
) -> None:
    event = {"event_name": "api_calls", "customer_id": "acme", "timestamp": timestamp}
    response = client.post(
        "/usage", json={"events": [event]}, headers={"Authorization": "Bearer admin"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "events.0.timestamp"
    assert "not a number" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/usage/events", "/usage/events/export", "/usage/m1"])
@pytest.mark.parametrize(
    ("start", "end"),
    [("1772323200", "2026-03-02T00:00:00Z"), ("2026-03-01T00:00:00Z", "1772409600000")],
)
def test_a_query_time_given_as_a_number_is_refused_naming_it(
    client: TestClient, path: str, start: str, end: str
) -> None:
    """A number could be seconds or milliseconds (pydantic guesses by its size): the
    query's times are date-times, as the library's own."""
    params = {"start": start, "end": end}
    if path != "/usage/m1":
        params["event_name"] = "api_calls"
    response = client.get(path, params=params, headers={"Authorization": "Bearer admin"})
    assert response.status_code == 422, response.text
    named = "start" if start.isdigit() else "end"
    assert response.json()["error"]["field"] == named
    assert "not a number" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/meters", {"cursor": ""}),
        (
            "/usage/m1",
            {"customer_id": "", "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
        ),
    ],
)
def test_empty_query_values_are_refused_as_the_document_says(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    response = client.get(path, params=params, headers={"Authorization": "Bearer admin"})
    assert response.status_code == 422


def _app(provider: str) -> Any:
    options = {"url": f"sqlite:///{tempfile.mkdtemp()}/contract.db"} if provider == "sql" else {}
    return create_app(AsyncMetering(provider, **options), keys=KEYS)


def _contract(provider: str, key: str) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", _app(provider))

    @schema.parametrize()
    @settings(max_examples=examples(10), deadline=None, suppress_health_check=list(HealthCheck))
    @pytest.mark.filterwarnings("ignore")
    def test(case: schemathesis.Case) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {key}"},
            excluded_checks=[schemathesis.checks.positive_data_acceptance],
        )

    return test


test_the_contract_holds_for_an_admin_on_memory = _contract("memory", "admin")
test_the_contract_holds_for_a_reader_on_memory = _contract("memory", "reader")
test_the_contract_holds_for_a_tenant_on_sqlite = _contract("sql", "acme")


@pytest.mark.filterwarnings("ignore")
def test_the_contract_holds_for_an_admin_on_postgres(postgres_url: str) -> None:
    """Every operation over a fresh database on the private PostgreSQL server (the
    pytest plugin's lazy schemas need a fixture it cannot reach here: each operation's
    strategy is drawn from directly)."""
    app = create_app(AsyncMetering("sql", url=postgres_url), keys=KEYS)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=examples(10), deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers={"Authorization": "Bearer admin"},
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )

        check()


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/meters", {"limt": "5"}),
        (
            "GET",
            "/usage/m1",
            {"customer": "acme", "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
        ),
        ("POST", "/usage", {"dry_run": "1"}),
    ],
)
def test_a_query_parameter_the_route_does_not_take_is_refused_naming_it(
    client: TestClient, method: str, path: str, params: dict[str, str]
) -> None:
    """A misspelt `?customer=acme` was ignored: the answer covered every customer."""
    body = {"events": [{"event_name": "api_calls", "customer_id": "acme"}]}
    response = client.request(
        method,
        path,
        params=params,
        json=body if method == "POST" else None,
        headers={"Authorization": "Bearer admin"},
    )
    unknown = next(name for name in params if name not in ("start", "end"))
    assert (response.status_code, response.json()["error"]["field"]) == (422, unknown)


def test_a_parameter_given_twice_that_takes_one_value_is_refused_naming_it(
    client: TestClient,
) -> None:
    """`?customer_id=acme&customer_id=globex` was answered for globex alone."""
    meter = client.post(
        "/meters",
        json={"event_name": "twice_asked", "dimensions": ["region", "plan"]},
        headers={"Authorization": "Bearer admin"},
    ).json()["id"]
    day = [("start", "2026-01-01T00:00:00Z"), ("end", "2026-01-02T00:00:00Z")]
    admin = {"Authorization": "Bearer admin"}
    twice = [*day, ("customer_id", "acme"), ("customer_id", "globex")]
    refused = client.get(f"/usage/{meter}", params=twice, headers=admin)
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "customer_id"
    assert "given 2 times" in refused.json()["error"]["message"]
    again = client.get(f"/usage/{meter}", params=[*day, day[0]], headers=admin)
    assert (again.status_code, again.json()["error"]["field"]) == (422, "start")
    many = [
        *day,
        ("filter", "region:eu"),
        ("filter", "plan:pro"),
        ("customer_ids", "acme"),
        ("customer_ids", "globex"),
        ("group_by", "customer_id"),
        ("group_by", "region"),
    ]
    assert client.get(f"/usage/{meter}", params=many, headers=admin).status_code == 200
