"""The sql provider passes the shared conformance suite on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider
from metering_core.testing import ProviderConformance


class TestSqlite(ProviderConformance):
    @pytest.fixture
    async def provider(self, sqlite_url: str) -> AsyncIterator[SqlProvider]:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        yield provider
        await provider.aclose()


class TestPostgres(ProviderConformance):
    @pytest.fixture
    async def provider(self, postgres_url: str) -> AsyncIterator[SqlProvider]:
        provider = SqlProvider(SqlSettings(url=postgres_url))
        yield provider
        await provider.aclose()
