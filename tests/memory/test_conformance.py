"""The memory provider passes the conformance suite every provider runs."""

from collections.abc import AsyncIterator

import pytest

from metering_core.memory import MemoryProvider
from metering_core.testing import ProviderConformance


class TestMemoryConformance(ProviderConformance):
    @pytest.fixture
    async def provider(self) -> AsyncIterator[MemoryProvider]:
        provider = MemoryProvider()
        yield provider
        await provider.aclose()
