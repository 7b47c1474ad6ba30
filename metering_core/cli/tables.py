"""Rich renderings: the provider capability matrix, meters and usage answers."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table

from metering_core.interface import Capabilities, Operation
from metering_core.models import Aggregation, Meter, Usage, Window
from metering_core.plugins import ProviderSpec

_ESCAPED = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    ord("\\"): "\\\\",
}
"""Control characters, and a backslash (so that no two texts show alike), and the escapes
a table shows them as."""


def escaped(text: str) -> str:
    """`text` with control characters shown as escapes (`\\x1b`, `\\n`) and a backslash
    doubled: the text is a tenant's (ids, customers, dimensions), and raw an escape
    sequence drove the operator's terminal, a newline split an id over two rows
    (review). `--format json` or `csv` gives it as it is."""
    return text.translate(_ESCAPED)


class EscapedTable(Table):
    """A table whose text cells are `escaped`."""

    def add_row(self, *renderables: RenderableType | None, **options: Any) -> None:
        super().add_row(*(escaped(r) if isinstance(r, str) else r for r in renderables), **options)


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
        ("filters", lambda c: _mark(c.filters)),
        ("usage needs a customer", lambda c: _mark(c.requires_customer)),
        ("updatable meter fields", lambda c: ", ".join(sorted(c.updatable_meter_fields)) or "—"),
        ("max batch size", lambda c: f"{c.max_batch_size:,}"),
        ("oldest event accepted", lambda c: _duration(c.max_event_age)),
        ("furthest future event", lambda c: _duration(c.max_future_skew)),
        ("cancellable for", lambda c: _duration(c.cancel_window, "always")),
    ]


def capability_table(specs: Sequence[ProviderSpec]) -> Table:
    """A row per capability, a column per provider; `?` where the backend states it later."""
    table = Table("", *(spec.name for spec in specs), title="Installed providers")
    table.add_row("plugin", *(spec.plugin for spec in specs), end_section=True)
    for label, read in _capability_rows():
        table.add_row(label, *(read(s.capabilities) if s.capabilities else "?" for s in specs))
    return table


METER_FIELDS = ("id", "event_name", "display_name", "aggregation", "dimensions", "status")


def print_meters(out: Console, meters: Sequence[Meter], output: str) -> None:
    """Meters as a table (ids and event names whole, however narrow the terminal), a JSON
    list, or CSV."""
    if output == "json":
        out.print_json(json.dumps([meter.model_dump(mode="json") for meter in meters]))
        return
    if output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(METER_FIELDS)
        for meter in meters:
            record = meter.model_dump(mode="json")
            writer.writerow(
                [" ".join(v) if isinstance(v := record[f], list) else v for f in METER_FIELDS]
            )
        return
    table = EscapedTable()
    for title, widest in (
        ("id", max((len(meter.id) for meter in meters), default=2)),
        ("event name", max((len(meter.event_name) for meter in meters), default=10)),
    ):  # what other commands take: whole, however narrow the terminal
        table.add_column(title, no_wrap=True, min_width=widest)
    for title in ("display name", "aggregation", "dimensions", "status"):
        table.add_column(title, overflow="fold")
    for meter in meters:
        table.add_row(
            meter.id,
            meter.event_name,
            meter.display_name,
            meter.aggregation.value,
            ", ".join(meter.dimensions),
            meter.status,
        )
    out.print(table)


def print_usage(out: Console, usage: Usage, output: str) -> None:
    """A usage answer as a table with bars, JSON, or CSV."""
    if output == "json":
        out.print_json(usage.model_dump_json())
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
    table = EscapedTable("start", "end", "customer", *keys, "value", "")
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
