"""`metering events list` and `metering export`: the stored events behind a usage number,
a page on screen or every one of them to a file."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NamedTuple, TextIO

import typer
from rich.cells import cell_len
from rich.measure import Measurement
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from metering_core.cli.app import app, connect, err, out
from metering_core.cli.commands import (
    CustomerIdsOption,
    FilterOption,
    Format,
    FormatOption,
    parse_filters,
    parse_range,
    resolve_meter,
)
from metering_core.cli.tables import EscapedTable, escaped
from metering_core.client import Metering
from metering_core.collector import eased
from metering_core.export import ExportFormat, export_keys, header, piece
from metering_core.models import MAX_EVENTS_PER_PAGE, EventQuery, Page, StoredEvent

events_app = typer.Typer(help="The stored events behind usage.", no_args_is_help=True)
app.add_typer(events_app, name="events")

MeterArgument = Annotated[str, typer.Argument(help="The meter's id or event name.")]
FromOption = Annotated[str, typer.Option("--from", help="Start, ISO 8601 (inclusive).")]
ToOption = Annotated[str, typer.Option("--to", help="End, ISO 8601 (exclusive).")]
CustomerOption = Annotated[str | None, typer.Option("--customer", help="One customer's events.")]


BESIDE_THE_ID = 120
"""Columns an events table with long ids gives, at most, to the cells beside them."""


class _Asked(NamedTuple):
    """The options `events list` and `export` share: which events."""

    from_: str
    to: str
    customer: str | None
    filters: list[str] | None
    customer_ids: list[str] | None

    def query(self, m: Metering, meter: str, **more: object) -> EventQuery:
        start, end = parse_range(self.from_, self.to)
        return EventQuery.model_validate(
            {
                "meter_id": resolve_meter(m, meter),
                "customer_id": self.customer,
                "start": start,
                "end": end,
                "filters": parse_filters(self.filters),
                "customer_ids": self.customer_ids or [],
                **more,
            }
        )


@events_app.command("list")
def list_events(
    ctx: typer.Context,
    meter: MeterArgument,
    from_: FromOption,
    to: ToOption,
    customer: CustomerOption = None,
    filter_: FilterOption = None,
    customer_ids: CustomerIdsOption = None,
    include_cancelled: Annotated[bool, typer.Option(help="Show cancelled events too.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=MAX_EVENTS_PER_PAGE)] = 100,
    cursor: Annotated[str | None, typer.Option(help="Where the last page ended.")] = None,
    output: FormatOption = Format.table,
) -> None:
    """One page of a meter's stored events, oldest first."""
    asked = _Asked(from_, to, customer, filter_, customer_ids)
    with connect(ctx) as m:
        query = asked.query(
            m, meter, include_cancelled=include_cancelled, limit=limit, cursor=cursor
        )
        page = m.list_usage_events(query)
    _print_page(page, output)


def _print_page(page: Page[StoredEvent], output: Format) -> None:
    if output is Format.json:
        out.print_json(page.model_dump_json())
        return
    if output is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(
            [
                "id",
                "event_name",
                "customer_id",
                "timestamp",
                "value",
                "dimensions",
                "cancelled",
                "ingested_at",
            ]
        )
        for event in page.items:
            writer.writerow(
                [
                    event.id,
                    event.event_name,
                    event.customer_id,
                    event.timestamp.isoformat(),
                    event.value,
                    json.dumps(event.dimensions, ensure_ascii=False),
                    event.cancelled,
                    event.ingested_at.isoformat() if event.ingested_at else "",
                ]
            )
    else:
        widest = max((cell_len(escaped(event.id)) for event in page.items), default=2)
        table = EscapedTable()
        table.add_column("id", no_wrap=True, min_width=widest)  # what `cancel` takes: whole
        for title in ("timestamp", "customer", "value", "dimensions", "cancelled"):
            table.add_column(title, overflow="fold")
        for event in page.items:
            table.add_row(
                event.id,
                event.timestamp.isoformat(),
                event.customer_id,
                f"{event.value:f}",
                ", ".join(f"{k}={v}" for k, v in event.dimensions.items()),
                "yes" if event.cancelled else "",
            )
        # In a pipe (80 columns to rich) as wide as the table wants, and in a terminal
        # too when its ids take more than half of it: its longest cells folded past
        # BESIDE_THE_ID, rather than an id cut and the cells beside it squeezed to
        # nothing (review). A terminal wide enough for the ids folds the other cells.
        natural = Measurement.get(out, out.options.update_width(10**6), table).maximum
        if natural > out.width and (not out.is_terminal or widest > out.width // 2):
            table.width = min(natural, widest + BESIDE_THE_ID)
        out.print(table, crop=False)
    if page.next_cursor is not None:
        err.print(f"more: --cursor {page.next_cursor}")


@app.command("export")
def export(
    ctx: typer.Context,
    meter: MeterArgument,
    from_: FromOption,
    to: ToOption,
    customer: CustomerOption = None,
    filter_: FilterOption = None,
    customer_ids: CustomerIdsOption = None,
    form: Annotated[
        ExportFormat, typer.Option("--format", case_sensitive=False, help="csv or jsonl.")
    ] = ExportFormat.jsonl,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="A file, not stdout.")
    ] = None,
) -> None:
    """Every stored event of a meter in a range (cancelled ones left out), as CSV or JSON
    Lines that `metering ingest` reads back."""
    asked = _Asked(from_, to, customer, filter_, customer_ids)
    with connect(ctx) as m:
        query = asked.query(m, meter, limit=MAX_EVENTS_PER_PAGE)
        found = m.fetch_meter(query.meter_id or "")
        keys = export_keys(found.dimensions, found.unique_dimension)
        with _target(output) as file, _progress() as progress, eased():
            task = progress.add_task("exporting", total=None)
            file.write(header(form, keys))
            for page in _pages(m, query):
                file.write(piece(page.items, form, keys))
                progress.advance(task, len(page.items))
            count = int(progress.tasks[0].completed)
    err.print(f"exported {count:,} events" + (f" to {output}" if output else ""))


def _pages(m: Metering, query: EventQuery) -> Iterator[Page[StoredEvent]]:
    """Every page of a listing, one held at a time."""
    while True:
        page = m.list_usage_events(query)
        yield page
        if page.next_cursor is None:
            return
        query = query.model_copy(update={"cursor": page.next_cursor})


@contextlib.contextmanager
def _target(output: Path | None) -> Iterator[TextIO]:
    """The file to write, or stdout; a file is written beside its name and moved into
    place once whole, so an interrupted export never leaves a file that looks complete."""
    if output is None:
        yield sys.stdout
        return
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as file:
            yield file
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.completed:,.0f} events"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
