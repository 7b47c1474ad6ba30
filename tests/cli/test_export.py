"""`metering events list` and `metering export` as a person uses them, and the round trip
an export exists for: into another store with `metering ingest`, giving the same usage."""

from __future__ import annotations

import gc
import json
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metering_core.cli import app

runner = CliRunner()
SPAN = ["--from", "2026-04-01T00:00:00Z", "--to", "2026-04-03T00:00:00Z"]


def on(store: Path, *args: str) -> tuple[int, str]:
    """The command against the SQLite store at `store`."""
    result = runner.invoke(
        app, ["--provider", "sql", *args], env={"METERING_SQL_URL": f"sqlite:///{store}"}
    )
    return result.exit_code, result.output


def usage(store: Path, *args: str) -> list[tuple[str, str, str]]:
    code, out = on(
        store,
        "usage",
        "api_calls",
        *SPAN,
        "--window",
        "hour",
        "--group-by",
        "region",
        "--group-by",
        "customer_id",
        "--format",
        "json",
        *args,
    )
    assert code == 0, out
    rows = json.loads(out)["rows"]
    return [
        (r["start"], f"{r['customer_id']}/{r['dimensions']['region']}", r["value"]) for r in rows
    ]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A store with events across customers, regions (one event has none), hours and
    values with fractions, one of them cancelled."""
    store = tmp_path / "source.db"
    assert on(store, "meters", "create", "api_calls", "--dimension", "region")[0] == 0
    lines = [
        {
            "id": f"e{i}",
            "event_name": "api_calls",
            "customer_id": ["acme", "globex", "initech"][i % 3],
            "value": f"{i}.25",
            "timestamp": f"2026-04-0{1 + i % 2}T{i % 24:02}:{i % 60:02}:00Z",
            "dimensions": {"region": ["eu", "us"][i % 2]} if i % 5 else {},
        }
        for i in range(40)
    ]
    backfill = tmp_path / "events.jsonl"
    backfill.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert on(store, "ingest", str(backfill))[0] == 0
    assert on(store, "cancel", "e7")[0] == 0
    return store


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_an_export_ingested_into_another_store_gives_the_same_usage(
    source: Path, tmp_path: Path, form: str
) -> None:
    exported = tmp_path / f"export.{form}"
    code, out = on(source, "export", "api_calls", *SPAN, "--format", form, "-o", str(exported))
    assert code == 0, out
    assert "exported 39 events" in out
    assert not exported.with_name(exported.name + ".partial").exists()
    target = tmp_path / f"target-{form}.db"
    assert on(target, "meters", "create", "api_calls", "--dimension", "region")[0] == 0
    code, out = on(target, "ingest", str(exported))
    assert (code, out.splitlines()[-1]) == (0, "accepted 39, duplicates 0, rejected 0")
    assert usage(target) == usage(source)
    assert len(usage(source)) > 20
    code, out = on(target, "ingest", str(exported))  # the same file again counts nothing
    assert out.splitlines()[-1] == "accepted 0, duplicates 39, rejected 0"


def test_an_export_leaves_the_collector_as_it_found_it(source: Path, tmp_path: Path) -> None:
    """It eases the garbage collector while it runs (in the caller's process, here)."""
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()  # the suite's service froze
    code, out = on(source, "export", "api_calls", *SPAN, "-o", str(tmp_path / "e.jsonl"))
    assert code == 0, out
    assert gc.get_threshold() == threshold
    assert (gc.get_freeze_count() > 0) == (frozen > 0)


def test_an_export_filtered_to_a_customer_and_a_region_holds_only_those(
    source: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "acme-eu.jsonl"
    code, _ = on(
        source,
        "export",
        "api_calls",
        *SPAN,
        "--customer",
        "acme",
        "--filter",
        "region=eu",
        "-o",
        str(exported),
    )
    assert code == 0
    events = [json.loads(line) for line in exported.read_text().splitlines()]
    assert events
    assert {(e["customer_id"], e["dimensions"]["region"]) for e in events} == {("acme", "eu")}
    eu = usage(source, "--customer", "acme", "--filter", "region=eu")
    assert sum(float(row[2]) for row in eu) == sum(float(e["value"]) for e in events)


def test_the_events_behind_a_number_for_some_customers_are_listed_and_exported(
    source: Path, tmp_path: Path
) -> None:
    """`--customer-ids` narrows `events list` and `export` as it narrows `usage`."""
    some = ["--customer-ids", "acme", "--customer-ids", "initech"]
    number = sum(Decimal(row[2]) for row in usage(source, *some))
    code, out = on(source, "events", "list", "api_calls", *SPAN, *some, "--format", "json")
    assert code == 0, out
    listed = json.loads(out)["items"]
    exported = tmp_path / "some.jsonl"
    assert on(source, "export", "api_calls", *SPAN, *some, "-o", str(exported))[0] == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    for events in (listed, lines):
        assert {e["customer_id"] for e in events} == {"acme", "initech"}
        assert sum(Decimal(e["value"]) for e in events) == number


def test_the_events_table_in_a_pipe_shows_a_long_id_whole_beside_its_time(
    tmp_path: Path,
) -> None:
    """80 columns: a 100-character id was cut, and the columns beside it squeezed to one
    character each (review); `cancel` takes the id as shown."""
    store = tmp_path / "long.db"
    assert on(store, "meters", "create", "api_calls")[0] == 0
    long_id = "tenant-" + "7" * 93
    line = {"id": long_id, "event_name": "api_calls", "customer_id": "acme"}
    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps(line | {"timestamp": "2026-04-01T10:00:00Z"}) + "\n")
    assert on(store, "ingest", str(rows))[0] == 0
    code, out = on(store, "events", "list", "api_calls", *SPAN)
    assert code == 0, out
    [row] = [text for text in out.splitlines() if long_id in text]
    assert "2026-04-01T10:00:00+00:00" in row


def test_the_events_table_shows_control_characters_as_escapes(tmp_path: Path) -> None:
    """Stored text is a tenant's: raw, an escape sequence drove the operator's terminal
    and a newline split an id over two rows (review). JSON keeps the text as it is."""
    store = tmp_path / "controls.db"
    assert on(store, "meters", "create", "api_calls", "--dimension", "region")[0] == 0
    line = {
        "id": "e\x1b[2J1",
        "event_name": "api_calls",
        "customer_id": "acme",
        "timestamp": "2026-04-01T10:00:00Z",
        "dimensions": {"region": "eu\nus"},
    }
    alike = line | {"id": "e\\x1b[2J1", "dimensions": {}}  # a backslash: shown apart
    bells = line | {"id": "evt-" + "\a" * 30, "dimensions": {}}  # 4 columns each, shown
    rows = tmp_path / "three.jsonl"
    rows.write_text("".join(json.dumps(event) + "\n" for event in (line, alike, bells)))
    assert on(store, "ingest", str(rows))[0] == 0
    code, shown = on(store, "events", "list", "api_calls", *SPAN)
    assert code == 0, shown
    assert "\x1b" not in shown
    assert "\a" not in shown
    assert "e\\x1b[2J1" in shown
    assert "e\\\\x1b[2J1" in shown
    assert "region=eu\\nus" in shown
    [row] = [text for text in shown.splitlines() if "evt-" in text]
    assert "evt-" + "\\x07" * 30 in row  # whole, not cut to the raw id's width
    assert "2026-04-01T10:00:00+00:00" in row
    code, exact = on(store, "events", "list", "api_calls", *SPAN, "--format", "json")
    assert sorted(e["id"] for e in json.loads(exact)["items"]) == sorted(
        event["id"] for event in (line, alike, bells)
    )


def test_events_list_pages_with_a_cursor_and_shows_cancelled_events_when_asked(
    source: Path,
) -> None:
    code, out = on(source, "events", "list", "api_calls", *SPAN, "--limit", "5", "--format", "json")
    assert code == 0, out
    first = json.loads(out.split("\nmore: ")[0])
    assert [e["id"] for e in first["items"]] == ["e0", "e24", "e2", "e26", "e4"]
    code, out = on(
        source,
        "events",
        "list",
        "api_calls",
        *SPAN,
        "--cursor",
        first["next_cursor"],
        "--limit",
        "2",
    )
    assert code == 0, out
    assert [i for i in ("e28", "e6", "e30") if i in out] == ["e28", "e6"]
    assert "more: --cursor" in out
    shown = on(
        source, "events", "list", "api_calls", *SPAN, "--include-cancelled", "--format", "csv"
    )
    cancelled = 'e7,api_calls,globex,2026-04-02T07:07:00+00:00,7.25,"{""region"": ""us""}",True,'
    assert cancelled in shown[1]
    hidden = on(source, "events", "list", "api_calls", *SPAN, "--format", "csv")
    assert "e7," not in hidden[1]


def test_a_filter_not_in_key_value_form_exits_2_naming_it(source: Path) -> None:
    code, out = on(source, "usage", "api_calls", *SPAN, "--filter", "region")
    assert code == 2
    assert "--filter='region' must be key=value" in out


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_awkward_text_and_long_numbers_survive_the_round_trip(tmp_path: Path, form: str) -> None:
    """Separators, quotes, line breaks (a lone \\r too), other scripts and 38-digit values
    come back as they were sent."""
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    texts = ["a,b", 'say "hi"', "two\nlines", "x\ry", "crlf\r\n", "é 中 \u2028"]
    lines = [
        {
            "id": f"e{i},{text}",
            "event_name": "api_calls",
            "customer_id": f"c{text}",
            "value": ["0.000000000000000001", "12345678901234567890.123456789012345678"][i % 2],
            "timestamp": "2026-04-01T10:00:00Z",
            "dimensions": {"region": text},
        }
        for i, text in enumerate(texts)
    ]
    backfill = tmp_path / "events.jsonl"
    backfill.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for store in (source, target):
        assert on(store, "meters", "create", "api_calls", "--dimension", "region")[0] == 0
    assert on(source, "ingest", str(backfill))[0] == 0
    exported = tmp_path / f"export.{form}"
    assert on(source, "export", "api_calls", *SPAN, "--format", form, "-o", str(exported))[0] == 0
    code, out = on(target, "ingest", str(exported))
    assert (code, out.splitlines()[-1]) == (0, "accepted 6, duplicates 0, rejected 0")

    def stored(store: Path) -> list[tuple[str, str, str, dict[str, str]]]:
        code, out = on(store, "events", "list", "api_calls", *SPAN, "--format", "json")
        assert code == 0, out
        items = json.loads(out)["items"]
        return sorted((e["id"], e["customer_id"], e["value"], e["dimensions"]) for e in items)

    assert stored(target) == stored(source)
    assert len(stored(source)) == len(texts)


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_a_dimension_named_across_lines_and_a_value_of_200k_characters_round_trip(
    tmp_path: Path, form: str
) -> None:
    """The CSV header quotes a column name with a line break in it, as rows quote values,
    and a value past the csv module's default field limit (128 KiB) is read back whole."""
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    key = "plan\r\ntier"
    lines = [
        {
            "id": f"e{i}",
            "event_name": "api_calls",
            "customer_id": "acme",
            "value": i + 1,
            "timestamp": "2026-04-01T10:00:00Z",
            "dimensions": {key: text},
        }
        for i, text in enumerate(["pro", "x" * 200_000])
    ]
    backfill = tmp_path / "events.jsonl"
    backfill.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for store in (source, target):
        assert on(store, "meters", "create", "api_calls", "--dimension", key)[0] == 0
    assert on(source, "ingest", str(backfill))[0] == 0
    exported = tmp_path / f"export.{form}"
    assert on(source, "export", "api_calls", *SPAN, "--format", form, "-o", str(exported))[0] == 0
    code, out = on(target, "ingest", str(exported))
    assert (code, out.splitlines()[-1]) == (0, "accepted 2, duplicates 0, rejected 0")
    code, out = on(target, "events", "list", "api_calls", *SPAN, "--format", "json")
    assert code == 0, out
    items = sorted(json.loads(out)["items"], key=lambda e: e["id"])
    assert [e["dimensions"] for e in items] == [line["dimensions"] for line in lines]
