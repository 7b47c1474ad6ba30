"""The published contract: the committed OpenAPI document is current, and the app honours it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from metering_core import AsyncMetering
from metering_core.server import create_app
from tests.examples import examples

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
KEY = {"Authorization": "Bearer admin"}
ALL = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]


def app() -> object:
    return create_app(AsyncMetering("memory"), keys={"admin": {"scopes": ALL}})


def test_the_committed_openapi_document_is_current() -> None:
    current = create_app(AsyncMetering("memory"), allow_anonymous=True).openapi()
    committed = json.loads(OPENAPI.read_text())
    assert committed == json.loads(json.dumps(current)), (
        "docs/openapi.json is stale: run python -m metering_core.server > docs/openapi.json"
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", app())


@schema.parametrize()
@settings(max_examples=examples(15), deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.filterwarnings("ignore")
def test_no_server_errors_and_answers_match_the_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers=KEY,
        checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.response_schema_conformance,
        ],
    )
