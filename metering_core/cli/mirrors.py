"""`metering mirror`: the ledger's mirrors, watched or fed from the command line (for cron
or a container of its own, beside or instead of the service's forwarder)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from metering_core.cli.app import app, connect, err, out
from metering_core.cli.commands import Format, FormatOption

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
    table = Table("mirror", "provider", "owed", "oldest", "dead letters")
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
            try:
                statuses = m.flush_mirrors(timeout)
            except TimeoutError:
                owed = sum(s.depth for s in m.mirror_status())
                err.print(f"error: {owed} row(s) still owed after {timeout} s; they wait")
                raise typer.Exit(1) from None
            dead = sum(s.dead_letters for s in statuses)
            err.print(f"mirrors up to date; {dead} dead letter(s)")
            return
        m.mirror_status()  # refuses a provider without mirrors, naming the setting
        err.print("forwarding to the mirrors; Ctrl-C stops")
        try:
            m.forward_mirrors()
        except KeyboardInterrupt:
            err.print("stopped")
