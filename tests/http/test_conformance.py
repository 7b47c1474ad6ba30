"""The HTTP provider, against the real service on loopback, passes the conformance suite."""

from collections.abc import AsyncIterator

import pytest
from metering_http import HttpProvider, HttpSettings

from metering_core.testing import ProviderConformance


class TestHttpConformance(ProviderConformance):
    @pytest.fixture
    async def provider(self, service_url: str) -> AsyncIterator[HttpProvider]:
        provider = HttpProvider(HttpSettings(base_url=service_url, api_key="admin-key"))
        yield provider
        await provider.aclose()
