"""The `metering` subcommands."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from metering_core.cli.app import (
    app,
    connect,
    customers_app,
    meters_app,
    options,
    out,
    print_json,
)
from metering_core.cli.backfill import check_rows, deliver
from metering_core.cli.tables import capability_table, escaped, print_meters, print_usage
from metering_core.client import Metering
from metering_core.errors import NotFoundError, ValidationError
from metering_core.filters import parse_filters as filters_from_text
from metering_core.models import Window
from metering_core.plugins import providers
from metering_core.server.body_limit import MAX_BODY_BYTES


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command("providers")
def list_providers() -> None:
    """Installed providers and a matrix of what each can do."""
    specs = providers()
    out.print(capability_table(specs))
    if any(spec.capabilities is None for spec in specs):
        out.print("?: stated by the backend when connected")


# meters


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


FormatOption = Annotated[
    Format, typer.Option("--format", case_sensitive=False, help="table, json or csv.")
]


def resolve_meter(m: Metering, meter: str) -> str:
    """A meter's id from its id or its event name (what a person remembers); an id wins
    where one meter's id is another's event name."""
    try:
        return m.fetch_meter(meter).id
    except NotFoundError:
        for found in m.iter_meters():
            if found.event_name == meter:
                return found.id
    raise NotFoundError(f"no meter with id or event name {meter!r} (`metering meters list`)")


@meters_app.command("create")
def create_meter(
    ctx: typer.Context,
    event_name: str,
    display_name: Annotated[str | None, typer.Option()] = None,
    aggregation: Annotated[str, typer.Option()] = "sum",
    dimension: Annotated[list[str] | None, typer.Option(help="Repeat for each dimension.")] = None,
    unique_dimension: Annotated[str | None, typer.Option()] = None,
    output: FormatOption = Format.table,
) -> None:
    """Create a meter for one event name; answers as `meters list` does."""
    with connect(ctx) as m:
        created = m.create_meter(
            event_name=event_name,
            display_name=display_name,
            aggregation=aggregation,
            dimensions=dimension or [],
            unique_dimension=unique_dimension,
        )
    print_meters(out, [created], output.value)


@meters_app.command("list")
def list_meters(ctx: typer.Context, output: FormatOption = Format.table) -> None:
    """Every meter, across pages."""
    with connect(ctx) as m:
        meters = list(m.iter_meters())
    print_meters(out, meters, output.value)


@meters_app.command("get")
def get_meter(
    ctx: typer.Context, meter: Annotated[str, typer.Argument(help="Id or event name.")]
) -> None:
    """One meter, by its id or its event name."""
    with connect(ctx) as m:
        print_json(m.fetch_meter(resolve_meter(m, meter)))


@meters_app.command("update")
def update_meter(
    ctx: typer.Context,
    meter: Annotated[str, typer.Argument(help="Id or event name.")],
    display_name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a meter's display name or description."""
    changes = {
        k: v
        for k, v in {"display_name": display_name, "description": description}.items()
        if v is not None
    }
    with connect(ctx) as m:
        print_json(m.update_meter(resolve_meter(m, meter), **changes))


@meters_app.command("delete")
def delete_meter(
    ctx: typer.Context, meter: Annotated[str, typer.Argument(help="Id or event name.")]
) -> None:
    """Delete a meter, by its id or its event name (Stripe deactivates it)."""
    with connect(ctx) as m:
        meter_id = resolve_meter(m, meter)
        m.delete_meter(meter_id)
    out.print(f"deleted {meter_id}")


# customers


@customers_app.command("create")
def create_customer(
    ctx: typer.Context,
    customer_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Register a tenant with the provider."""
    with connect(ctx) as m:
        print_json(m.create_customer(id=customer_id, name=name, email=email))


@customers_app.command("delete")
def delete_customer(ctx: typer.Context, customer_id: str) -> None:
    """Remove a tenant from the provider."""
    with connect(ctx) as m:
        m.delete_customer(customer_id)
    out.print(f"deleted {customer_id}")


# usage

FilterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--filter",
        help="Only events whose dimension has this value, as key=value; repeat "
        "(values of one key are OR-ed, keys AND-ed).",
    ),
]


def parse_filters(given: list[str] | None) -> dict[str, list[str]]:
    """`--filter region=eu --filter region=us` as `{"region": ["eu", "us"]}`."""
    return filters_from_text(given, "=", "--filter")


def parse_time(value: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{option}={value!r} is not an ISO 8601 time", field=option, value=value
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


CustomerIdsOption = Annotated[
    list[str] | None,
    typer.Option("--customer-ids", help="Only these customers; repeat per customer."),
]


def parse_range(from_: str, to: str) -> tuple[datetime, datetime]:
    """`--from` and `--to` as times, `--to` after `--from`: said of the options given,
    not of the query's `end` they become (a ledger with nothing to ask answered a
    reversed range "no usage", exit 0: probe)."""
    start, end = parse_time(from_, "--from"), parse_time(to, "--to")
    if end <= start:
        raise ValidationError(f"--to={to!r} must be after --from={from_!r}", field="--to", value=to)
    return start, end


@app.command("usage")
def usage(
    ctx: typer.Context,
    meter: Annotated[str, typer.Argument(help="The meter's id or event name.")],
    from_: Annotated[str, typer.Option("--from", help="Start, ISO 8601 (inclusive).")],
    to: Annotated[str, typer.Option("--to", help="End, ISO 8601 (exclusive).")],
    customer: Annotated[str | None, typer.Option()] = None,
    window: Annotated[Window | None, typer.Option()] = None,
    group_by: Annotated[list[str] | None, typer.Option(help="Repeat per key.")] = None,
    tz: Annotated[str, typer.Option()] = "UTC",
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    filter_: FilterOption = None,
    customer_ids: CustomerIdsOption = None,
) -> None:
    """Aggregated usage of one meter by window and group."""
    if output not in {"table", "json", "csv"}:
        raise ValidationError(
            f"--format={output!r} must be table, json or csv", field="format", value=output
        )
    start, end = parse_range(from_, to)
    with connect(ctx) as m:
        answer = m.fetch_usage(
            resolve_meter(m, meter),
            customer_id=customer,
            start=start,
            end=end,
            window=window,
            group_by=group_by or [],
            tz=tz,
            filters=parse_filters(filter_),
            customer_ids=customer_ids or [],
        )
    print_usage(out, answer, output)


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    event_ids: list[str],
    event_name: Annotated[str | None, typer.Option(help="Needed by some providers.")] = None,
) -> None:
    """Cancel usage events by id."""
    with connect(ctx) as m:
        print_json(m.cancel_usage_events(event_ids, event_name=event_name))


@app.command("ingest")
def ingest(
    ctx: typer.Context,
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
    total = check_rows(file, skip_invalid)
    accepted, duplicates, rejected = deliver(ctx, file, total, spool)
    out.print(f"accepted {accepted:,}, duplicates {duplicates:,}, rejected {len(rejected):,}")
    for event_id, reason in rejected.items():
        typer.echo(f"rejected {escaped(event_id)}: {escaped(reason)}", err=True)
    if rejected:
        raise typer.Exit(1)


# service and demo


@app.command("serve")
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Bind address; loopback unless told otherwise.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option()] = 8000,
    allow_anonymous: Annotated[
        bool, typer.Option(help="Serve without API keys (trusted local network only).")
    ] = False,
    public_metrics: Annotated[
        bool, typer.Option(help="Serve /metrics without a key (a private scraper network).")
    ] = False,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Least severe level logged.")
    ] = LogLevel.info,
    log_json: Annotated[bool, typer.Option(help="One JSON object per log line.")] = False,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body read; larger ones get 413.")
    ] = MAX_BODY_BYTES,
) -> None:
    """Run the REST service; API keys come from configuration (METERING_KEYS)."""
    import logging.config

    from metering_core.cli.logs import log_config
    from metering_core.client import AsyncMetering
    from metering_core.server import serve as run_service

    logging_setup = log_config(log_level.value, log_json)
    logging.config.dictConfig(logging_setup)
    shared = options(ctx)
    service = AsyncMetering(shared.provider, config_file=shared.config)
    run_service(
        service,
        host=host,
        port=port,
        allow_anonymous=allow_anonymous,
        config_file=shared.config,
        public_metrics=public_metrics,
        log_config=logging_setup,
        max_body_bytes=max_body_bytes,
    )


@app.command("demo")
def demo() -> None:
    """A month of usage for a few tenants on the in-memory provider, by day and by tenant."""
    from metering_core.cli.demo import run_demo

    run_demo(out)
