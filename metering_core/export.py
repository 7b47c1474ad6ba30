"""Stored events as files: CSV and JSON Lines in the shape `metering ingest` reads back, so
an export re-imported into another store gives the same usage. Written a page at a time
(the CLI and the service each hold one page): memory stays flat however many events."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from enum import StrEnum

from metering_core.models import StoredEvent

__all__ = ["ExportFormat", "export_keys", "header", "piece"]

_FIELDS = ("id", "event_name", "customer_id", "timestamp", "value")


class ExportFormat(StrEnum):
    """`csv` (one `dimensions.<key>` column per dimension of the meter) or `jsonl` (every
    dimension an event has)."""

    csv = "csv"
    jsonl = "jsonl"

    @property
    def media_type(self) -> str:
        return "text/csv" if self is ExportFormat.csv else "application/x-ndjson"


def _row(event: StoredEvent) -> tuple[str, ...]:
    return (
        event.id,
        event.event_name,
        event.customer_id,
        event.timestamp.isoformat(),
        str(event.value),
    )


def _csv(events: Sequence[StoredEvent], keys: Sequence[str]) -> str:
    """Rows of a page; a dimension an event lacks is an empty cell, as is an empty value:
    CSV cannot tell them apart (JSON Lines can)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # lines end in \r\n (RFC 4180): a \r in a field is quoted
    writer.writerows(
        [(*_row(event), *[event.dimensions.get(key, "") for key in keys]) for event in events]
    )
    return buffer.getvalue()


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _jsonl(events: Sequence[StoredEvent]) -> str:
    """A line per event, its dimensions' keys in sorted order: the same bytes from every
    store (PostgreSQL keeps dimensions as `jsonb`, which orders keys its own way)."""
    return "".join(
        _encode(
            {
                **dict(zip(_FIELDS, _row(event), strict=True)),
                "dimensions": dict(sorted(event.dimensions.items())),
            }
        )
        + "\n"
        for event in events
    )


def header(form: ExportFormat, keys: Sequence[str]) -> str:
    """What a file starts with: for CSV, its header (a column per dimension in `keys`)."""
    if form is ExportFormat.jsonl:
        return ""
    buffer = io.StringIO()  # written as rows are: a line break in a name is quoted too
    csv.writer(buffer).writerow([*_FIELDS, *(f"dimensions.{key}" for key in keys)])
    return buffer.getvalue()


def piece(events: Sequence[StoredEvent], form: ExportFormat, keys: Sequence[str]) -> str:
    """The lines of a page of events."""
    return _csv(events, keys) if form is ExportFormat.csv else _jsonl(events)


def export_keys(dimensions: Sequence[str], unique_dimension: str | None) -> list[str]:
    """The dimension columns of a meter's CSV: those it declares, and the one it counts."""
    return list(dict.fromkeys([*dimensions, *filter(None, [unique_dimension])]))
