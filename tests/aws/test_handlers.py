"""The Lambda entry points, driven as sbt-aws drives them: API Gateway HTTP API (payload
2.0, JWT authorizer) and REST API (1.0) requests, and EventBridge messages, on the memory
and sql providers."""

from __future__ import annotations

import base64
import json
import os
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

import metering_core.aws as aws
from metering_core import ConfigurationError

AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
ADMIN = {"sub": "admin-1", "cognito:username": "admin"}
ACME = {"sub": "user-1", "custom:tenantId": "acme"}


def http_api(
    method: str,
    path: str,
    claims: dict[str, str] | None,
    body: Any = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An API Gateway HTTP API event (payload 2.0) as the JWT authorizer hands it over."""
    context: dict[str, Any] = {
        "accountId": "123456789012",
        "apiId": "api1",
        "domainName": "api1.execute-api.us-east-1.amazonaws.com",
        "http": {
            "method": method,
            "path": path,
            "protocol": "HTTP/1.1",
            "sourceIp": "10.0.0.1",
            "userAgent": "test",
        },
        "requestId": "r1",
        "routeKey": f"{method} {path}",
        "stage": "$default",
        "time": "25/Nov/2026:10:00:00 +0000",
        "timeEpoch": 1795600000000,
    }
    if claims is not None:
        context["authorizer"] = {"jwt": {"claims": claims, "scopes": ["metering/any"]}}
    return {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": urlencode(query or {}),
        "headers": {"content-type": "application/json", "host": context["domainName"]},
        "queryStringParameters": query,
        "requestContext": context,
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def rest_api(method: str, path: str, claims: dict[str, str], body: Any = None) -> dict[str, Any]:
    """An API Gateway REST API event (payload 1.0) with a Cognito authorizer."""
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": {"Content-Type": "application/json", "Host": "api1.example.com"},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "requestContext": {
            "httpMethod": method,
            "path": path,
            "stage": "prod",
            "requestId": "r2",
            "identity": {"sourceIp": "10.0.0.2"},
            "authorizer": {"claims": claims},
        },
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def eventbridge(detail_type: str, detail: dict[str, Any], envelope: str) -> dict[str, Any]:
    """An EventBridge event as sbt-aws's event manager publishes it."""
    source = (
        "controlPlaneEventSource" if "boarding" in detail_type else "applicationPlaneEventSource"
    )
    return {
        "version": "0",
        "id": envelope,
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": "2026-11-25T10:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": detail,
    }


def answer(response: dict[str, Any]) -> tuple[int, Any]:
    return response["statusCode"], json.loads(response["body"]) if response["body"] else None


@pytest.fixture(params=["memory", "sql"])
def provider(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[str]:
    for name in ("METERING_PROVIDER", "METERING_SQL_URL", "METERING_SECRETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METERING_PROVIDER", request.param)
    monkeypatch.setenv("METERING_AWS_ALLOW_EPHEMERAL", "1")  # memory: allowed for these tests
    if request.param == "sql":  # under Lambda, the durable store is PostgreSQL's
        monkeypatch.setenv("METERING_SQL_URL", request.getfixturevalue("postgres_url"))
    monkeypatch.setattr(aws, "_api", None)  # a new container
    monkeypatch.setattr(aws, "_metering", None)
    yield request.param
    if aws._metering is not None:
        aws._metering.close()


def test_an_sbt_aws_control_plane_meters_and_a_tenant_reads_only_its_usage(provider: str) -> None:
    status, meter = answer(
        aws.api_handler(http_api("POST", "/meters", ADMIN, {"event_name": "api_calls"}), None)
    )
    assert status == 201
    events = [
        {
            "id": "o-1",
            "event_name": "api_calls",
            "customer_id": "acme",
            "value": 3,
            "timestamp": AT.isoformat(),
        }
    ]
    status, ingested = answer(
        aws.api_handler(http_api("POST", "/usage", ACME, {"events": events}), None)
    )
    assert (status, ingested["accepted"]) == (200, ["o-1"])
    span = {
        "start": (AT - timedelta(hours=1)).isoformat(),
        "end": (AT + timedelta(hours=1)).isoformat(),
    }
    status, usage = answer(
        aws.api_handler(http_api("GET", f"/usage/{meter['id']}", ACME, query=span), None)
    )
    assert (status, [row["value"] for row in usage["rows"]]) == (200, ["3"])
    other = {**span, "customer_id": "globex"}
    status, error = answer(
        aws.api_handler(http_api("GET", f"/usage/{meter['id']}", ACME, query=other), None)
    )
    assert (status, error["error"]["type"]) == (403, "forbidden")
    status, refused = answer(
        aws.api_handler(
            http_api("POST", "/usage", ACME, {"events": [{**events[0], "customer_id": "globex"}]}),
            None,
        )
    )
    assert (status, list(refused["rejected"])) == (200, [events[0]["id"]])


def test_a_tenant_lists_and_exports_only_its_own_events_through_the_api(provider: str) -> None:
    status, meter = answer(
        aws.api_handler(
            http_api("POST", "/meters", ADMIN, {"event_name": "api_calls", "dimensions": ["r"]}),
            None,
        )
    )
    assert status == 201
    events = [
        {
            "id": f"{who}-1",
            "event_name": "api_calls",
            "customer_id": who,
            "timestamp": AT.isoformat(),
            "dimensions": {"r": "eu"},
        }
        for who in ("acme", "globex")
    ]
    status, _ = answer(aws.api_handler(http_api("POST", "/usage", ADMIN, {"events": events}), None))
    assert status == 200
    span = {
        "meter_id": meter["id"],
        "start": (AT - timedelta(hours=1)).isoformat(),
        "end": (AT + timedelta(hours=1)).isoformat(),
    }
    status, page = answer(aws.api_handler(http_api("GET", "/usage/events", ACME, query=span), None))
    assert (status, [e["customer_id"] for e in page["items"]]) == (200, ["acme"])
    for query in (
        {**span, "customer_id": "globex"},
        {**span, "customer_id": "globex", "filter": "r:eu"},
    ):
        for path in ("/usage/events", "/usage/events/export"):
            status, error = answer(aws.api_handler(http_api("GET", path, ACME, query=query), None))
            assert (status, error["error"]["type"]) == (403, "forbidden"), path
    response = aws.api_handler(http_api("GET", "/usage/events/export", ACME, query=span), None)
    assert response["statusCode"] == 200
    body = response["body"]  # API Gateway decodes a body Mangum sent as base64
    lines = (base64.b64decode(body).decode() if response["isBase64Encoded"] else body).splitlines()
    assert [json.loads(line)["customer_id"] for line in lines] == ["acme"]
    times = {key: span[key] for key in ("start", "end")}
    status, _ = answer(
        aws.api_handler(
            http_api(
                "GET", f"/usage/{meter['id']}", ACME, query={**times, "customer_ids": "globex"}
            ),
            None,
        )
    )
    assert status == 403


@pytest.mark.parametrize(
    "claim", ["", None, 7, ["acme", "globex"], {"id": "acme"}, "acme\x00", "t" * 101]
)
def test_a_tenant_claim_that_names_no_tenant_is_refused_not_read_as_acting_for_every_tenant(
    provider: str, claim: object
) -> None:
    """A token whose tenant claim is present but not one tenant's id (empty, null, not a
    string, a list) is no admin: it is refused on every route, where a missing claim (an
    operator's token) acts for all tenants. A null claim read another tenant's usage."""
    aws.api_handler(http_api("POST", "/meters", ADMIN, {"event_name": "api_calls"}), None)
    event = {"id": "g1", "event_name": "api_calls", "customer_id": "globex", "value": 100}
    assert answer(aws.api_handler(http_api("POST", "/usage", ADMIN, {"events": [event]}), None))[1][
        "accepted"
    ] == ["g1"]
    empty = {"sub": "user-2", "custom:tenantId": claim}
    for request in (
        http_api("GET", "/meters", empty),
        http_api("DELETE", "/usage", empty, {"event_ids": ["g1"]}),
        rest_api("GET", "/meters", empty),
    ):
        status, error = answer(aws.api_handler(request, None))
        assert (status, error["error"]["type"]) == (403, "forbidden"), error
        assert "custom:tenantId" in error["error"]["message"]
    again = answer(aws.api_handler(http_api("POST", "/usage", ADMIN, {"events": [event]}), None))
    assert again[1]["duplicates"] == ["g1"]  # still stored, never cancelled


def test_a_request_without_an_authorizer_is_refused(provider: str) -> None:
    status, error = answer(aws.api_handler(http_api("GET", "/meters", None), None))
    assert (status, error["error"]["type"]) == (401, "unauthorized")


def test_without_an_authorizer_only_when_configured(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_AWS_ALLOW_UNAUTHENTICATED", "1")
    assert answer(aws.api_handler(http_api("GET", "/meters", None), None))[0] == 200


def test_a_rest_api_request_is_served_too(provider: str) -> None:
    status, meter = answer(
        aws.api_handler(rest_api("POST", "/meters", ADMIN, {"event_name": "storage"}), None)
    )
    assert (status, meter["event_name"]) == (201, "storage")


@pytest.mark.parametrize("name", ["ingestUsage", "sbt_aws_ingestUsage"])
def test_a_redelivered_eventbridge_event_is_counted_once(provider: str, name: str) -> None:
    onboard = eventbridge(
        "onboardingRequest",
        {"tenantId": "acme", "tenantName": "Acme", "email": "a@acme.test"},
        "eb-0",
    )
    assert aws.event_handler(onboard, None) == {"ok": True, "customer": "acme"}
    assert aws._metering is not None
    meter = aws._metering.create_meter(event_name="api_calls")
    usage = eventbridge(
        name,
        {
            "tenantId": "acme",
            "meterApiName": "api_calls",
            "meterValue": 5,
            "meterTimeInMillis": int(AT.timestamp() * 1000),
        },
        "eb-7",
    )
    first = aws.event_handler(usage, None)
    again = aws.event_handler(usage, None)  # EventBridge delivers at least once
    assert (first["ingested"], again["duplicates"]) == (["eb-7:0"], ["eb-7:0"])
    total = aws._metering.fetch_usage(
        meter.id, customer_id="acme", start=AT - timedelta(hours=1), end=AT + timedelta(hours=1)
    ).total
    assert total == 5


def test_secrets_come_from_secrets_manager_at_cold_start(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    class SecretsManager:
        def get_secret_value(self, SecretId: str) -> dict[str, str]:
            asked.append(SecretId)
            return {"SecretString": json.dumps({"METERING_MEMORY_MAX_BATCH_SIZE": "7"})}

    fake = types.ModuleType("boto3")
    fake.client = lambda service: SecretsManager()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", fake)
    monkeypatch.setenv("METERING_PROVIDER", "memory")
    monkeypatch.setenv(
        "METERING_SECRETS",
        json.dumps(
            {"METERING_MEMORY_MAX_BATCH_SIZE": "arn:aws:secretsmanager:us-east-1:1:secret:m"}
        ),
    )
    # set, then unset: the variable the handler writes is removed again after the test
    monkeypatch.setenv("METERING_MEMORY_MAX_BATCH_SIZE", "unset by the test")
    monkeypatch.delenv("METERING_MEMORY_MAX_BATCH_SIZE")
    status, capabilities = answer(aws.api_handler(http_api("GET", "/capabilities", ADMIN), None))
    assert (status, capabilities["max_batch_size"]) == (200, 7)
    assert asked == ["arn:aws:secretsmanager:us-east-1:1:secret:m"]


def secrets_holding(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets Manager answering every secret with `text`; METERING_X asked of it."""

    class SecretsManager:
        def get_secret_value(self, SecretId: str) -> dict[str, str]:
            return {"SecretString": text}

    fake = types.ModuleType("boto3")
    fake.client = lambda service: SecretsManager()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", fake)
    monkeypatch.setenv("METERING_SECRETS", json.dumps({"METERING_X": "arn:secret:x"}))
    monkeypatch.setenv("METERING_X", "unset by the test")
    monkeypatch.delenv("METERING_X")


@pytest.mark.parametrize(
    ("text", "held"),
    [("sk_plain", "sk_plain"), ('"sk_quoted"', "sk_quoted"), ('{"METERING_X": "sk_in"}', "sk_in")],
)
def test_a_secret_is_its_text_a_json_string_or_the_variables_own_field(
    text: str, held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets_holding(text, monkeypatch)
    aws.load_secrets()
    assert os.environ["METERING_X"] == held


@pytest.mark.parametrize(
    "text", ['{"apiKey": "sk_live_SECRET"}', '{"METERING_X": null, "k": "sk_live_SECRET"}']
)
def test_a_secret_without_the_variables_value_fails_cold_start_naming_it_not_its_value(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set to '' or 'None', the first delivery failed instead, naming nothing (probe)."""
    secrets_holding(text, monkeypatch)
    with pytest.raises(ConfigurationError, match="arn:secret:x") as caught:
        aws.load_secrets()
    assert "METERING_X" in str(caught.value)
    assert "SECRET" not in str(caught.value)
    assert "METERING_X" not in os.environ


@pytest.mark.parametrize("url", [None, "sqlite:///{tmp}/metering.db", "memory"])
@pytest.mark.parametrize("handler", ["api_handler", "event_handler"])
def test_a_store_on_the_containers_own_disk_is_refused_at_cold_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, url: str | None, handler: str
) -> None:
    """The default (SQLite in the user data directory) or any sqlite: URL would keep usage
    on a Lambda container's disk, lost with the container."""
    for name in (
        "METERING_PROVIDER",
        "METERING_SQL_URL",
        "METERING_SECRETS",
        "METERING_AWS_ALLOW_EPHEMERAL",
    ):
        monkeypatch.delenv(name, raising=False)
    if url == "memory":
        monkeypatch.setenv("METERING_PROVIDER", "memory")
    elif url is not None:
        monkeypatch.setenv("METERING_PROVIDER", "sql")
        monkeypatch.setenv("METERING_SQL_URL", url.format(tmp=tmp_path))
    monkeypatch.setattr(aws, "_api", None)
    monkeypatch.setattr(aws, "_metering", None)
    request = (
        http_api("GET", "/meters", ADMIN)
        if handler == "api_handler"
        else eventbridge("OFFBOARDING_REQUEST", {"tenantId": "acme"}, "eb-1")
    )
    with pytest.raises(ConfigurationError, match="METERING_SQL_URL") as refused:
        getattr(aws, handler)(request, None)
    assert "Lambda container's own" in str(refused.value)
    assert (aws._metering, aws._api) == (None, None)  # the next invocation checks again
