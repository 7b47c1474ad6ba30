"""Cursors of event listings on every store that lists events (memory, SQLite,
PostgreSQL): what a tenant's cursors may reveal, and the order ties are listed in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from metering_core import Metering, ValidationError
from tests.stores import new_database

T0 = datetime(2026, 3, 1, 10, tzinfo=UTC)
RANGE = {"start": T0, "end": T0 + timedelta(days=1)}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Options of a new, empty store; several may be opened in one test."""
    if request.param == "memory":
        yield {"provider": "memory"}
        return
    databases = iter(range(10**6))

    def url() -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / f'store{next(databases)}.db'}"
        return new_database(request.getfixturevalue("postgres_server"))

    yield {"provider": "sql", "url": url}


def opened(store: dict[str, Any]) -> Metering:
    options = {k: (v() if callable(v) else v) for k, v in store.items() if k != "provider"}
    return Metering(store["provider"], linger=0, **options)


def walk(m: Metering, meter_id: str, **query: Any) -> list[tuple[list[str], str | None]]:
    """Every page of a listing: its ids and the cursor it gave."""
    pages, cursor = [], None
    while True:
        page = m.list_usage_events(meter_id, **RANGE, cursor=cursor, **query)
        pages.append(([e.id for e in page.items], page.next_cursor))
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def test_a_tenants_cursors_say_nothing_of_other_tenants_events(store: dict[str, Any]) -> None:
    """The same events of acme, stored once alone and once between thousands of globex's:
    acme's pages and cursors are the same, so nothing in them counts globex's events (a
    cursor holding the store's sequence did: the gap between two of acme's numbers was
    what the others had sent between them)."""
    acme = [("a1", 0), ("a2", 0), ("a3", 5), ("a4", 9)]  # (id, minute): two share a time

    def acme_pages(others_between: int) -> list[tuple[list[str], str | None]]:
        with opened(store) as m:
            meter = m.create_meter(event_name="api_calls")
            for event_id, minute in acme:
                m.ingest_usage_events(
                    [
                        {
                            "id": f"g-{event_id}-{n}",
                            "event_name": "api_calls",
                            "customer_id": "globex",
                            "value": 1,
                            "timestamp": T0 + timedelta(minutes=minute),
                        }
                        for n in range(others_between)
                    ]
                )
                m.ingest_usage_event(
                    id=event_id,
                    event_name="api_calls",
                    customer_id="acme",
                    value=1,
                    timestamp=T0 + timedelta(minutes=minute),
                )
                assert m.flush().rejected == {}
            return walk(m, meter.id, customer_id="acme", limit=1)

    alone, among_others = acme_pages(0), acme_pages(1000)
    assert [ids for ids, _ in alone] == [["a1"], ["a2"], ["a3"], ["a4"]]
    assert among_others == alone


def test_events_of_one_time_are_listed_by_id_across_pages(store: dict[str, Any]) -> None:
    """Ties are ordered by id in code-point order (not by arrival, and not by a locale's
    rules): every store lists them alike, and a page boundary inside them loses none."""
    ids = ["b", "a", "B", "a-b", "ab", "é", "z", "a.b", "10", "9"]
    with opened(store) as m:
        meter = m.create_meter(event_name="api_calls")
        m.ingest_usage_events(
            [
                {"id": i, "event_name": "api_calls", "customer_id": f"c{n % 3}", "value": 1}
                | {"timestamp": T0}
                for n, i in enumerate(ids)
            ]
        )
        assert m.flush().rejected == {}
        for limit in (1, 3, 100):
            pages = walk(m, meter.id, limit=limit)
            assert [i for page, _ in pages for i in page] == sorted(ids)


def test_a_cursor_naming_the_longest_id_in_wide_characters_pages_on(
    store: dict[str, Any],
) -> None:
    """An id of 100 four-byte characters makes the longest cursor a store gives; the
    facade's query takes it back."""
    wide = "\U0001f600" * 100
    with opened(store) as m:
        meter = m.create_meter(event_name="api_calls")
        for event_id in (wide, "z"):
            m.ingest_usage_event(
                id=event_id, event_name="api_calls", customer_id="acme", value=1, timestamp=T0
            )
        assert m.flush().rejected == {}
        pages = walk(m, meter.id, limit=1)
        assert [ids for ids, _ in pages] == [["z"], [wide]]


@pytest.mark.parametrize("text", ["t5.", "t5." + "x" * 101, "t5.a\x00b", "e5.12"])
def test_an_event_cursor_naming_no_id_a_store_holds_is_refused(text: str) -> None:
    """An empty id, one too long, a NUL; and a cursor of the earlier (time, sequence)
    form, given back after an upgrade: read as an id it would repeat or skip events."""
    import base64

    cursor = base64.urlsafe_b64encode(text.encode()).decode()
    with Metering("memory", linger=0) as m:
        meter = m.create_meter(event_name="api_calls")
        with pytest.raises(ValidationError, match="is not a cursor this provider gave") as refused:
            m.list_usage_events(meter.id, **RANGE, cursor=cursor)
    assert (refused.value.field, refused.value.value) == ("cursor", cursor)
