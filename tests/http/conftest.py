"""A real metering service on 127.0.0.1, over the memory provider, for the HTTP provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metering_core import AsyncMetering
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

ALL_SCOPES = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
KEYS = {
    "admin-key": {"scopes": ALL_SCOPES},
    "acme-key": {"scopes": ["usage:read", "usage:write"], "tenant": "acme"},
}


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    with serve_in_thread(create_app(AsyncMetering("memory"), keys=KEYS)) as url:
        yield url
