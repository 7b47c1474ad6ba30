"""`metering mirror` and `metering reconcile`: the ledger's mirrors, watched, fed and
compared from the command line (for cron, or a container of their own)."""

from __future__ import annotations

import csv
import sys
import time
from collections import Counter
from typing import Annotated

import typer
from rich.progress import Progress

from metering_core.cli.app import app, connect, err, out
from metering_core.cli.commands import (
    Format,
    FormatOption,
    parse_range,
    parse_time,
    resolve_meter,
)
from metering_core.cli.events import FromOption, ToOption
from metering_core.cli.tables import EscapedTable
from metering_core.client import Metering
from metering_core.collector import eased
from metering_core.errors import NotFoundError, ValidationError
from metering_core.models import (
    CellStatus,
    LinkOutcome,
    ReconcileCell,
    ReconcileReport,
    Window,
)

mirror_app = typer.Typer(help="The ledger's mirrors: status, and forwarding.", no_args_is_help=True)
app.add_typer(mirror_app, name="mirror")


@mirror_app.command("status")
def status(ctx: typer.Context, output: FormatOption = Format.table) -> None:
    """Each mirror's outbox: rows owed, the oldest one's age, dead letters."""
    with connect(ctx) as m:
        statuses = m.mirror_status()
    if output is Format.json:
        out.print_json(data=[s.model_dump(mode="json") for s in statuses])
        return
    if output is Format.csv:
        out.print("mirror,provider,depth,oldest_seconds,dead_letters")
        for s in statuses:
            oldest = "" if s.oldest_seconds is None else f"{s.oldest_seconds:.3f}"
            out.print(f"{s.mirror},{s.provider},{s.depth},{oldest},{s.dead_letters}")
        return
    table = EscapedTable("mirror", "provider", "owed", "oldest", "dead letters")
    for s in statuses:
        oldest = "" if s.oldest_seconds is None else f"{s.oldest_seconds:.0f} s"
        table.add_row(s.mirror, s.provider, str(s.depth), oldest, str(s.dead_letters))
    out.print(table)


@mirror_app.command("run")
def run(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Forward what is owed now, then stop (for cron).")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --once: give up after this many seconds.")
    ] = None,
) -> None:
    """Forward what the mirrors are owed, until stopped (or, with --once, until none is
    owed). Several may run over one PostgreSQL: none sends a row another is sending."""
    with connect(ctx) as m:
        if once:
            began = time.perf_counter()
            try:
                with eased():
                    statuses = m.flush_mirrors(timeout)
            except TimeoutError:
                owed = sum(s.depth for s in m.mirror_status())
                err.print(f"error: {owed} row(s) still owed after {timeout} s; they wait")
                raise typer.Exit(1) from None
            took = time.perf_counter() - began
            settled = sum(s.delivered + s.withheld + s.refused for s in statuses)
            dead = sum(s.dead_letters for s in statuses)
            # the rate for a cron's log, past the command's start (`bench_mirrors` reads it)
            err.print(
                f"mirrors up to date: {settled:,} row(s) settled in {took:.2f} s; "
                f"{dead} dead letter(s)"
            )
            return
        m.mirror_status()  # refuses a provider without mirrors, naming the setting
        err.print("forwarding to the mirrors; Ctrl-C stops")
        try:
            with eased():
                m.forward_mirrors()
        except KeyboardInterrupt:
            err.print("stopped")


MirrorOption = Annotated[str, typer.Option("--mirror", help="The mirror, by its name.")]


@mirror_app.command("link")
def link(ctx: typer.Context, mirror: MirrorOption, output: FormatOption = Format.table) -> None:
    """Bring every meter and customer of the ledger to a mirror added after them: each
    meter found there by its event name and linked, or created; each customer created.
    Exits 1 when the mirror refuses a meter (the reason is shown)."""
    with connect(ctx) as m:
        links = m.link_mirror(mirror)
    if output is Format.json:
        out.print_json(data=[link.model_dump(mode="json") for link in links])
    elif output is Format.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["kind", "id", "mirror_id", "outcome", "reason"])
        for found in links:
            writer.writerow(
                [found.kind, found.id, found.mirror_id or "", found.outcome, found.reason or ""]
            )
    else:
        table = EscapedTable("kind", "id", "on the mirror", "outcome", "reason")
        for found in links:
            table.add_row(
                found.kind, found.id, found.mirror_id or "", found.outcome, found.reason or ""
            )
        out.print(table)
    if any(found.outcome is LinkOutcome.refused for found in links):
        raise typer.Exit(1)


@mirror_app.command("backfill")
def backfill(
    ctx: typer.Context,
    mirror: MirrorOption,
    from_: FromOption,
    to: Annotated[
        str | None, typer.Option("--to", help="End, exclusive (ISO 8601; default: now).")
    ] = None,
    mirror_added: Annotated[
        str | None,
        typer.Option(
            "--mirror-added",
            help="When the mirror was first configured on this store (ISO 8601), where the "
            "store does not know: one that forwarded before it noted that.",
        ),
    ] = None,
) -> None:
    """Owe a mirror every live event of the ledger from --from (to --to): for a mirror
    added after they were stored. `metering mirror run --once` (or the service) then
    sends them, and `metering reconcile` proves the result."""
    start, end = (parse_time(from_, "--from"), None) if to is None else parse_range(from_, to)
    with connect(ctx) as m:
        owed = m.backfill_mirror(
            mirror,
            start=start,
            end=end,
            mirror_added=None
            if mirror_added is None
            else parse_time(mirror_added, "--mirror-added"),
        )
    err.print(f"{owed} event(s) owed to {mirror!r}; forward them with `metering mirror run`")


@mirror_app.command("retry")
def retry(ctx: typer.Context, mirror: MirrorOption) -> None:
    """Owe a mirror again what it refused (its dead letters), once the cause is fixed."""
    with connect(ctx) as m:
        count = m.retry_mirror_dead_letters(mirror)
    err.print(f"{count} dead letter(s) owed to {mirror!r} again")


def _named(m: Metering, name: str) -> str:
    """The meter `--meter` names: one that names none is bad input (exit 2), not drift,
    which exit 1 means here."""
    try:
        return resolve_meter(m, name)
    except NotFoundError as exc:
        raise ValidationError(str(exc), field="--meter", value=name) from None


@app.command("reconcile")
def reconcile(
    ctx: typer.Context,
    mirror: Annotated[str, typer.Option("--mirror", help="The mirror to compare with.")],
    from_: FromOption,
    to: ToOption,
    window: Annotated[Window, typer.Option(case_sensitive=False, help="Cell width.")] = Window.DAY,
    meter: Annotated[
        list[str] | None, typer.Option("--meter", help="Only this meter (id or event name).")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Send each short cell of a sum or count meter its difference (ids derived "
            "from the cell: repairing twice sends nothing twice).",
        ),
    ] = False,
    output: FormatOption = Format.table,
) -> None:
    """Compare each meter, customer and window of the ledger with the mirror's. Exits 1
    when a cell is short, over or refused (drift); pending and not comparable cells are
    listed. A progress bar counts the meters on the terminal."""
    start, end = parse_range(from_, to)
    with connect(ctx) as m:
        meter_ids = list(  # a meter named twice (by id and event name) is compared once
            dict.fromkeys(
                [found.id for found in m.iter_meters()]
                if not meter
                else [_named(m, name) for name in meter]
            )
        )
        reports = []
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(f"reconciling with {mirror}", total=len(meter_ids))
            for meter_id in meter_ids:  # one meter at a time: the bar moves on long ranges
                reports.append(
                    m.reconcile(
                        mirror,
                        start=start,
                        end=end,
                        window=window,
                        meter_ids=[meter_id],
                        repair=repair,
                    )
                )
                progress.advance(task)
    report = ReconcileReport(
        mirror=mirror,
        ok=all(part.ok for part in reports),
        cells=[cell for part in reports for cell in part.cells],
    )
    if output is Format.json:
        out.print_json(report.model_dump_json())
    elif output is Format.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(
            ["event_name", "customer_id", "start", "end", "ledger", "mirror", "status", "repaired"]
        )
        for cell in report.cells:
            writer.writerow(_cell_fields(cell))
    else:
        table = EscapedTable()
        for title in ("meter", "customer", "start", "ledger", "mirror", "status", "repaired"):
            table.add_column(title, overflow="fold")  # whole, however narrow: wrapped, not cut
        for cell in report.cells:
            if cell.status is not CellStatus.equal:
                name, customer, began, _, ours, theirs, status, repaired = _cell_fields(cell)
                table.add_row(name, customer, began, ours, theirs, status, repaired)
        out.print(table)
        counts = Counter(cell.status.value for cell in report.cells)
        err.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no usage")
    if repair:
        fixed = sum(cell.repaired for cell in report.cells)
        err.print(f"repaired {fixed} cell(s); reconcile again to see the mirror agree")
    if not report.ok:
        raise typer.Exit(1)


def _cell_fields(cell: ReconcileCell) -> list[str]:
    return [
        cell.event_name,
        cell.customer_id,
        cell.start.isoformat(),
        cell.end.isoformat(),
        "" if cell.ledger is None else str(cell.ledger),
        "" if cell.mirror is None else str(cell.mirror),
        cell.status.value,
        "yes" if cell.repaired else "",
    ]
