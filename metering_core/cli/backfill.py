"""`metering ingest`: reading JSON Lines and CSV, stable ids, checking, then delivering."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import typer
from rich.progress import MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.text import Text

from metering_core.cli.app import connect, err
from metering_core.errors import ValidationError
from metering_core.models import UsageEvent

_EXTRA = "__extra__"

_LARGEST_FIELD = 2**31 - 1
"""The csv module's field limit while reading a file (its default is 128 KiB)."""


def _utf8_problem(text: str) -> str | None:
    """Why a line read with surrogateescape is not UTF-8, if it is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not UTF-8: byte {text[exc.start].encode('utf-8', 'surrogateescape')!r}"
    return None


def _csv_events(file: TextIO) -> Iterator[tuple[int, UsageEvent | str]]:
    """Each record as an event; `dimensions.<name>` columns are its dimensions."""
    # a dimension's value has no bound of its own: an export's is read back whole
    csv.field_size_limit(max(csv.field_size_limit(), _LARGEST_FIELD))
    reader = csv.DictReader(file, restkey=_EXTRA)
    header = reader.fieldnames or []
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # a later column would silently win: the file is refused, not guessed
        yield 1, f"the header names {', '.join(map(repr, repeated))} more than once"
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field past `_LARGEST_FIELD`
            # line_num has not counted the failed record yet: it begins on the next line
            yield reader.line_num + 1, f"not a CSV row: {exc}"
            continue
        number = reader.line_num  # where the record ends (quoted newlines count)
        problem = _utf8_problem(json.dumps(row, ensure_ascii=False))
        if problem is not None:
            yield number, problem
        elif _EXTRA in row:
            yield number, f"{len(row[_EXTRA])} more field(s) than the header names"
        elif None in row.values():
            yield number, "fewer fields than the header names"
        else:
            dimensions = {
                k.removeprefix("dimensions."): v
                for k, v in row.items()
                if k.startswith("dimensions.")
            }
            plain = {k: v for k, v in row.items() if not k.startswith("dimensions.") and v != ""}
            try:
                yield (
                    number,
                    UsageEvent.model_validate(
                        {**plain, "dimensions": dimensions} if dimensions else plain
                    ),
                )
            except ValidationError as exc:
                yield number, str(exc)


def _json_events(file: TextIO) -> Iterator[tuple[int, UsageEvent | str]]:
    """Each line parsed and validated in one pass, straight into an event."""
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        problem = _utf8_problem(line)
        if problem is not None:
            yield number, problem
            continue
        try:
            yield number, UsageEvent.model_validate_json(line)
        except ValidationError as exc:
            yield number, _json_problem(exc)


def _json_problem(exc: ValidationError) -> str:
    """Why a line is not an event: not JSON, not an object, or a bad field."""
    first = exc.errors[0] if exc.errors else {}
    if first.get("type") == "json_invalid":
        return f"not JSON: {str(first['msg']).removeprefix('Invalid JSON: ')}"
    if first.get("type") == "model_type":
        return "not a JSON object"
    return str(exc)


def _read(path: Path) -> Iterator[tuple[int, UsageEvent | str]]:
    """(line number, the event or why the row is not one) from JSON Lines or CSV (by
    extension): bad bytes, a ragged or oversized CSV record, not JSON, a bad field."""
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as file:
        yield from _csv_events(file) if path.suffix.lower() == ".csv" else _json_events(file)


BACKFILL_CHUNK = 5000
"""Events queued per flush: the progress bar moves once per delivered chunk."""


class EventRate(ProgressColumn):
    """Events per second, for the backfill progress bar."""

    def render(self, task: Task) -> Text:
        return Text(
            f"{task.speed:,.0f} events/s" if task.speed else "", style="progress.data.speed"
        )


def _backfill_id(event: UsageEvent, timed: bool, seen: Counter[str]) -> str:
    """A stable id for a row without one: its content and which occurrence of it this is.

    Rerunning the file, or editing other rows, gives every row the same id again, so a
    resumed or repeated backfill is reported as duplicates instead of counted twice.
    """
    content = json.dumps(
        [
            event.event_name,
            event.customer_id,
            str(event.value.normalize()),
            event.timestamp.isoformat() if timed else None,
            sorted(event.dimensions.items()),
        ]
    )
    seen[content] += 1
    return "backfill-" + hashlib.sha256(f"{content}#{seen[content]}".encode()).hexdigest()[:40]


def _events(path: Path) -> Iterator[tuple[int, UsageEvent | str]]:
    """(line number, the event or why the row is bad), streaming the file; a row without
    an id gets its stable backfill id."""
    seen: Counter[str] = Counter()
    for number, event in _read(path):
        if isinstance(event, UsageEvent) and "id" not in event.model_fields_set:
            timed = "timestamp" in event.model_fields_set
            event = event.model_copy(update={"id": _backfill_id(event, timed, seen)})
        yield number, event


def check_rows(path: Path, skip_invalid: bool) -> int:
    """First pass: report each bad row; stop before sending unless told to skip them."""
    good = bad = 0
    for number, event in _events(path):
        if isinstance(event, str):
            bad += 1
            typer.echo(f"{path}:{number}: {event}", err=True)
        else:
            good += 1
    if bad and not skip_invalid:
        typer.echo(
            f"error: {bad} bad row(s); nothing was sent (use --skip-invalid to send the rest)",
            err=True,
        )
        raise typer.Exit(2)
    return good


def _chunks(path: Path, size: int) -> Iterator[list[UsageEvent]]:
    chunk: list[UsageEvent] = []
    for _, event in _events(path):
        if isinstance(event, UsageEvent):
            chunk.append(event)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def deliver(
    ctx: typer.Context, path: Path, total: int, spool: Path | None
) -> tuple[int, int, dict[str, str]]:
    """Second pass: send the valid rows; (accepted, duplicates, rejected {id: reason})."""
    accepted = duplicates = 0
    rejected: dict[str, str] = {}
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), EventRate())
    with connect(ctx, spool_path=spool) as m, Progress(*columns, console=err) as progress:
        task = progress.add_task("delivering", total=total)
        for chunk in _chunks(path, BACKFILL_CHUNK):
            m.ingest_usage_events(chunk)
            report = m.flush()  # the bar counts delivered events, not queued ones
            accepted += len(report.accepted)
            duplicates += len(report.duplicates)
            rejected.update(report.rejected)
            progress.advance(task, len(chunk))
    return accepted, duplicates, rejected
