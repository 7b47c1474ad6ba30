"""The `metering` command: providers, meters, customers, usage, backfills, the service, a demo.

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad input. Errors print as one
line; `--debug` shows the traceback.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.table import Table
from rich.text import Text

from metering_core.client import Metering
from metering_core.errors import ConfigurationError, MeteringError, ValidationError
from metering_core.interface import Capabilities, Operation
from metering_core.models import Aggregation, Usage, UsageEvent, Window
from metering_core.plugins import providers

__all__ = ["app", "main"]

app = typer.Typer(help="Usage metering on whichever provider is configured.", no_args_is_help=True)
meters_app = typer.Typer(help="Create, list, show, update and delete meters.", no_args_is_help=True)
customers_app = typer.Typer(help="Register and remove customers (tenants).", no_args_is_help=True)
app.add_typer(meters_app, name="meters")
app.add_typer(customers_app, name="customers")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class Options:
    """Options every command shares, set by the top-level callback."""

    provider: str | None = None
    config: Path | None = None
    debug: bool = False


@app.callback()
def _global(
    provider: Annotated[
        str | None, typer.Option(help="Provider name (else configuration).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Config file (metering.toml or pyproject.toml).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    Options.provider, Options.config, Options.debug = provider, config, debug


def _reported(command: F) -> F:
    """Turn library errors into one line and the documented exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValidationError, ConfigurationError) as exc:
            _fail(exc, 2)
        except MeteringError as exc:
            _fail(exc, 1)

    return run  # type: ignore[return-value]


def _fail(exc: Exception, code: int) -> None:
    if Options.debug:
        err.print_exception()
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def _metering(**options: Any) -> Metering:
    return Metering(Options.provider, config_file=Options.config, **options)


def _json(model: Any) -> None:
    out.print_json(model.model_dump_json())


# providers


def _mark(yes: bool) -> str:
    return "✓" if yes else "—"


def _duration(value: timedelta | None, unlimited: str = "no limit") -> str:
    """A limit in its largest whole unit: `35 days`, `5 minutes`."""
    if value is None:
        return unlimited
    seconds = int(value.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} s"


def _member(field: str, item: object) -> Callable[[Capabilities], str]:
    return lambda caps: _mark(item in getattr(caps, field))


def _capability_rows() -> list[tuple[str, Callable[[Capabilities], str]]]:
    """The capability matrix's rows: a label and how to read it off `Capabilities`."""
    return [
        *((op.value, _member("operations", op)) for op in Operation),
        *((f"aggregation {a.value}", _member("aggregations", a)) for a in Aggregation),
        *((f"window {w.value}", _member("windows", w)) for w in Window),
        ("dimensions", lambda c: _mark(c.dimensions)),
        ("group_by", lambda c: _mark(c.group_by)),
        ("usage needs a customer", lambda c: _mark(c.requires_customer)),
        ("updatable meter fields", lambda c: ", ".join(sorted(c.updatable_meter_fields)) or "—"),
        ("max batch size", lambda c: f"{c.max_batch_size:,}"),
        ("oldest event accepted", lambda c: _duration(c.max_event_age)),
        ("furthest future event", lambda c: _duration(c.max_future_skew)),
        ("cancellable for", lambda c: _duration(c.cancel_window, "always")),
    ]


@app.command("providers")
@_reported
def list_providers() -> None:
    """Installed providers and a matrix of what each can do."""
    specs = providers()
    table = Table("", *(spec.name for spec in specs), title="Installed providers")
    table.add_row("plugin", *(spec.plugin for spec in specs), end_section=True)
    for label, read in _capability_rows():
        table.add_row(label, *(read(s.capabilities) if s.capabilities else "?" for s in specs))
    out.print(table)
    if any(spec.capabilities is None for spec in specs):
        out.print("?: stated by the backend when connected")


# meters


@meters_app.command("create")
@_reported
def create_meter(
    event_name: str,
    display_name: Annotated[str | None, typer.Option()] = None,
    aggregation: Annotated[str, typer.Option()] = "sum",
    dimension: Annotated[list[str] | None, typer.Option(help="Repeat for each dimension.")] = None,
    unique_dimension: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a meter for one event name."""
    with _metering() as m:
        _json(
            m.create_meter(
                event_name=event_name,
                display_name=display_name,
                aggregation=aggregation,
                dimensions=dimension or [],
                unique_dimension=unique_dimension,
            )
        )


@meters_app.command("list")
@_reported
def list_meters() -> None:
    """Every meter, across pages."""
    with _metering() as m:
        table = Table("id", "event name", "display name", "aggregation", "status")
        for meter in m.iter_meters():
            table.add_row(
                meter.id,
                meter.event_name,
                meter.display_name,
                meter.aggregation.value,
                meter.status,
            )
        out.print(table)


@meters_app.command("get")
@_reported
def get_meter(meter_id: str) -> None:
    """One meter."""
    with _metering() as m:
        _json(m.fetch_meter(meter_id))


@meters_app.command("update")
@_reported
def update_meter(
    meter_id: str,
    display_name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a meter's display name or description."""
    changes = {
        k: v
        for k, v in {"display_name": display_name, "description": description}.items()
        if v is not None
    }
    with _metering() as m:
        _json(m.update_meter(meter_id, **changes))


@meters_app.command("delete")
@_reported
def delete_meter(meter_id: str) -> None:
    """Delete a meter (Stripe deactivates it)."""
    with _metering() as m:
        m.delete_meter(meter_id)
    out.print(f"deleted {meter_id}")


# customers


@customers_app.command("create")
@_reported
def create_customer(
    customer_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Register a tenant with the provider."""
    with _metering() as m:
        _json(m.create_customer(id=customer_id, name=name, email=email))


@customers_app.command("delete")
@_reported
def delete_customer(customer_id: str) -> None:
    """Remove a tenant from the provider."""
    with _metering() as m:
        m.delete_customer(customer_id)
    out.print(f"deleted {customer_id}")


# usage


def _parse_time(value: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{option}={value!r} is not an ISO 8601 time", field=option, value=value
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def print_usage(usage: Usage, output: str) -> None:
    """A usage answer as a table with bars, JSON, or CSV."""
    if output == "json":
        _json(usage)
        return
    keys = sorted({key for row in usage.rows for key in row.dimensions})
    if output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["start", "end", "customer_id", *keys, "value"])
        for row in usage.rows:
            writer.writerow(
                [
                    row.start.isoformat(),
                    row.end.isoformat(),
                    row.customer_id or "",
                    *(row.dimensions.get(k, "") for k in keys),
                    row.value,
                ]
            )
        return
    table = Table("start", "end", "customer", *keys, "value", "")
    top = max((abs(row.value) for row in usage.rows), default=0) or 1
    for row in usage.rows:
        bar = "█" * round(float(abs(row.value) / top) * 30)
        table.add_row(
            f"{row.start:%Y-%m-%d %H:%M}",
            f"{row.end:%Y-%m-%d %H:%M}",
            row.customer_id or "all",
            *(row.dimensions.get(k, "") for k in keys),
            f"{row.value:f}",
            bar,
        )
    out.print(table)
    out.print(f"{usage.aggregation.value} of {usage.meter_id}, total {usage.total:f}")


@app.command("usage")
@_reported
def usage(
    meter_id: str,
    from_: Annotated[str, typer.Option("--from", help="Start, ISO 8601 (inclusive).")],
    to: Annotated[str, typer.Option("--to", help="End, ISO 8601 (exclusive).")],
    customer: Annotated[str | None, typer.Option()] = None,
    window: Annotated[Window | None, typer.Option()] = None,
    group_by: Annotated[list[str] | None, typer.Option(help="Repeat per key.")] = None,
    tz: Annotated[str, typer.Option()] = "UTC",
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
) -> None:
    """Aggregated usage of one meter by window and group."""
    if output not in {"table", "json", "csv"}:
        raise ValidationError(
            f"--format={output!r} must be table, json or csv", field="format", value=output
        )
    with _metering() as m:
        answer = m.fetch_usage(
            meter_id,
            customer_id=customer,
            start=_parse_time(from_, "--from"),
            end=_parse_time(to, "--to"),
            window=window,
            group_by=group_by or [],
            tz=tz,
        )
    print_usage(answer, output)


@app.command("cancel")
@_reported
def cancel(
    event_ids: list[str],
    event_name: Annotated[str | None, typer.Option(help="Needed by some providers.")] = None,
) -> None:
    """Cancel usage events by id."""
    with _metering() as m:
        _json(m.cancel_usage_events(event_ids, event_name=event_name))


# ingest


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) from JSON Lines or CSV (by extension)."""
    with path.open(encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            for number, row in enumerate(csv.DictReader(file), start=2):
                dimensions = {
                    k.removeprefix("dimensions."): v
                    for k, v in row.items()
                    if k.startswith("dimensions.")
                }
                plain = {
                    k: v for k, v in row.items() if not k.startswith("dimensions.") and v != ""
                }
                yield number, {**plain, "dimensions": dimensions} if dimensions else plain
            return
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, {"__error__": f"not JSON: {exc.msg}"}


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
    """(line number, the event or why the row is bad), streaming the file."""
    seen: Counter[str] = Counter()
    for number, row in _rows(path):
        if "__error__" in row:
            yield number, row["__error__"]
            continue
        try:
            event = UsageEvent.model_validate(row)
        except ValidationError as exc:
            yield number, str(exc)
            continue
        if "id" not in row:
            event = event.model_copy(update={"id": _backfill_id(event, "timestamp" in row, seen)})
        yield number, event


def _check_rows(path: Path, skip_invalid: bool) -> int:
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


def _deliver(path: Path, total: int, spool: Path | None) -> tuple[int, int, dict[str, str]]:
    """Second pass: send the valid rows; (accepted, duplicates, rejected {id: reason})."""
    accepted = duplicates = 0
    rejected: dict[str, str] = {}
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), EventRate())
    with _metering(spool_path=spool) as m, Progress(*columns, console=err) as progress:
        task = progress.add_task("delivering", total=total)
        for chunk in _chunks(path, BACKFILL_CHUNK):
            m.ingest_usage_events(chunk)
            report = m.flush()  # the bar counts delivered events, not queued ones
            accepted += len(report.accepted)
            duplicates += len(report.duplicates)
            rejected.update(report.rejected)
            progress.advance(task, len(chunk))
    return accepted, duplicates, rejected


@app.command("ingest")
@_reported
def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines or .csv")],
    skip_invalid: Annotated[
        bool, typer.Option(help="Send the valid rows even if some are bad.")
    ] = False,
    spool: Annotated[
        Path | None, typer.Option(help="SQLite spool: an interrupted backfill resumes.")
    ] = None,
) -> None:
    """Backfill usage from a file: every row is validated before anything is sent.

    A row without an `id` gets one derived from its content, so a rerun never counts twice.
    The file is read twice (check, then send), so it is never held in memory whole.
    """
    total = _check_rows(file, skip_invalid)
    accepted, duplicates, rejected = _deliver(file, total, spool)
    out.print(f"accepted {accepted:,}, duplicates {duplicates:,}, rejected {len(rejected):,}")
    for event_id, reason in rejected.items():
        typer.echo(f"rejected {event_id}: {reason}", err=True)
    if rejected:
        raise typer.Exit(1)


# service and demo


@app.command("serve")
@_reported
def serve(
    host: Annotated[str, typer.Option(help="Bind address; loopback unless told otherwise.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option()] = 8000,
    allow_anonymous: Annotated[
        bool, typer.Option(help="Serve without API keys (trusted local network only).")
    ] = False,
) -> None:
    """Run the REST service; API keys come from configuration (METERING_KEYS)."""
    from metering_core.client import AsyncMetering
    from metering_core.server import serve as run_service

    service = AsyncMetering(Options.provider, config_file=Options.config)
    run_service(service, host=host, port=port, allow_anonymous=allow_anonymous)


@app.command("demo")
@_reported
def demo() -> None:
    """A month of usage for a few tenants on the in-memory provider, by day and by tenant."""
    from metering_core.demo import run_demo

    run_demo(out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
