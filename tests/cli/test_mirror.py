"""`metering mirror` as an operator uses it: status, and forwarding once from cron."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from metering_core import AsyncMetering, Metering
from metering_core.cli import app
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

runner = CliRunner()
KEYS = {"admin": {"scopes": ["meters:read", "meters:write", "usage:read", "usage:write"]}}


def ledger_mirrored_to(url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a SQLite ledger whose mirror `billing` is the service at `url`."""
    return {
        "METERING_SQL_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "METERING_SQL_MIRRORS": json.dumps(
            {"billing": {"provider": "http", "base_url": url, "api_key": "admin"}}
        ),
    }


def test_status_and_one_forwarding_pass_from_the_command_line(tmp_path: Path) -> None:
    behind = AsyncMetering("memory")
    with serve_in_thread(create_app(behind, keys=KEYS)) as url:
        env = ledger_mirrored_to(url, tmp_path)

        def metering(*args: str) -> tuple[int, str]:
            result = runner.invoke(app, ["--provider", "sql", *args], env=env)
            return result.exit_code, result.output

        assert metering("meters", "create", "calls")[0] == 0
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(
                json.dumps({"id": f"e{n}", "event_name": "calls", "customer_id": "acme"}) + "\n"
                for n in range(5)
            )
        )
        assert metering("ingest", str(rows))[0] == 0
        code, shown = metering("mirror", "status", "--format", "json")
        assert code == 0
        owed = [(s["mirror"], s["depth"]) for s in json.loads(shown)]
        assert owed == [("billing", 6)]  # the meter, then 5 events

        code, said = metering("mirror", "run", "--once", "--timeout", "30")
        assert code == 0, said
        assert "mirrors up to date: 6 row(s) settled in " in said  # the meter, 5 events
        code, shown = metering("mirror", "status", "--format", "json")
        assert [(s["depth"], s["dead_letters"]) for s in json.loads(shown)] == [(0, 0)]

        span = ["--from", "2020-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"]
        code, said = metering("reconcile", "--mirror", "billing", *span, "--window", "month")
        assert code == 0, said
        with Metering("http", base_url=url, api_key="admin") as billing_side:
            billing_side.cancel_usage_events(["e0"])  # the mirror now holds one less
        code, said = metering(
            "reconcile", "--mirror", "billing", *span, "--window", "month", "--format", "json"
        )
        assert code == 1
        [cell] = [c for c in json.loads(said)["cells"] if c["status"] != "equal"]
        assert (cell["status"], cell["ledger"], cell["mirror"]) == ("short", "5", "4")

        code, said = metering(
            "reconcile", "--mirror", "billing", *span, "--window", "month", "--repair"
        )
        assert code == 1  # the drift it found
        assert "repaired 1 cell(s)" in said
        code, said = metering("reconcile", "--mirror", "billing", *span, "--window", "month")
        assert code == 0, said  # the mirror agrees again

        twice = [
            "--meter",
            "calls",
            "--meter",
            json.loads(metering("meters", "list", "--format", "json")[1])[0]["id"],
        ]
        code, said = metering(
            "reconcile",
            "--mirror",
            "billing",
            *span,
            "--window",
            "month",
            *twice,
            "--format",
            "json",
        )
        assert len(json.loads(said)["cells"]) == 1  # one meter named twice: compared once
        code, said = metering("mirror", "link", "--mirror", "billing", "--format", "json")
        assert code == 0, said
        assert [(link["kind"], link["outcome"]) for link in json.loads(said)] == [
            ("meter", "unchanged")
        ]
        code, said = metering("mirror", "backfill", "--mirror", "billing", "--from", span[1])
        assert code == 0
        # none: the repair holds them (one the mirror had lost, sent again, would count
        # twice beside the correction)
        assert "0 event(s) owed" in said
        assert metering("mirror", "run", "--once", "--timeout", "30")[0] == 0
        code, said = metering("mirror", "retry", "--mirror", "billing")
        assert code == 0
        assert "0 dead letter(s)" in said
        code, said = metering("reconcile", "--mirror", "billing", *span, "--window", "month")
        assert code == 0, said  # a backfill over what the mirror has changes nothing
        code, said = metering("mirror", "link", "--mirror", "elsewhere")
        assert code != 0
        assert "mirror='elsewhere'" in said

        late = tmp_path / "late.jsonl"
        late.write_text(json.dumps({"id": "late", "event_name": "calls", "customer_id": "acme"}))
        assert metering("ingest", str(late))[0] == 0
        assert metering("cancel", "late")[0] == 0  # before it was sent: it never is
        code, said = metering("mirror", "run", "--once", "--timeout", "30")
        assert code == 0, said
        assert "mirrors up to date: 2 row(s) settled in " in said  # the event, its cancel


def test_a_store_without_mirrors_is_refused_naming_the_setting(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["--provider", "sql", "mirror", "status"],
        env={"METERING_SQL_URL": f"sqlite:///{tmp_path / 'ledger.db'}"},
    )
    assert result.exit_code != 0
    assert "METERING_SQL_MIRRORS" in result.output


def test_mirrors_that_do_not_parse_or_a_meter_named_wrong_are_bad_input(
    tmp_path: Path,
) -> None:
    """Exit 2 and one line, not a traceback (an empty METERING_SQL_MIRRORS) nor exit 1,
    which from reconcile means drift (a --meter naming none): probe."""
    store = {"METERING_SQL_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    span = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-02T00:00:00Z"]
    unparsed = runner.invoke(
        app,
        ["--provider", "sql", "reconcile", "--mirror", "billing", *span],
        env={**store, "METERING_SQL_MIRRORS": ""},
    )
    assert unparsed.exit_code == 2, unparsed.output
    assert unparsed.output.startswith('error: error parsing value for field "mirrors"')
    misnamed = runner.invoke(
        app,
        ["--provider", "sql", "reconcile", "--mirror", "billing", *span, "--meter", "nosuch"],
        env={**store, "METERING_SQL_MIRRORS": json.dumps({"billing": {"provider": "memory"}})},
    )
    assert misnamed.exit_code == 2, misnamed.output
    assert "'nosuch'" in misnamed.output


def test_a_reversed_range_is_bad_input_naming_to_whatever_the_ledger_holds(
    tmp_path: Path,
) -> None:
    """Exit 2 naming --to, before anything is asked: a ledger with no meters answered
    reconcile's reversed range "no usage", exit 0 (probe)."""
    env = {
        "METERING_SQL_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "METERING_SQL_MIRRORS": json.dumps({"billing": {"provider": "memory"}}),
    }
    reversed_ = ["--from", "2026-03-10", "--to", "2026-03-01"]
    for command in (
        ["reconcile", "--mirror", "billing", *reversed_, "--repair"],
        ["mirror", "backfill", "--mirror", "billing", *reversed_],
        ["usage", "calls", *reversed_],
        ["events", "list", "calls", *reversed_],
    ):
        result = runner.invoke(app, ["--provider", "sql", *command], env=env)
        assert result.exit_code == 2, (command, result.output)
        assert "--to='2026-03-01' must be after --from='2026-03-10'" in result.output, command


def test_ids_in_the_reconcile_table_are_shown_as_they_are_whole(tmp_path: Path) -> None:
    """Not read as markup ("[red]acme[/red]" showed "acme", and "[/x]" failed the
    command) nor for emoji codes ("acme:cat:" showed a cat: review), nor cut to an
    80-column pipe's width."""
    behind = AsyncMetering("memory")
    with serve_in_thread(create_app(behind, keys=KEYS)) as url:
        env = ledger_mirrored_to(url, tmp_path)
        customers = ["[red]acme[/red]", "[/x]", "acme:cat:"]
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(
                json.dumps(
                    {
                        "id": f"e{n}",
                        "event_name": "calls",
                        "customer_id": customer,
                        "timestamp": "2026-03-02T10:00:00Z",
                    }
                )
                + "\n"
                for n, customer in enumerate(customers)
            )
        )
        for command in (["meters", "create", "calls"], ["ingest", str(rows)]):
            assert runner.invoke(app, ["--provider", "sql", *command], env=env).exit_code == 0
        span = ["--from", "2026-03-01T00:00:00Z", "--to", "2026-03-03T00:00:00Z"]
        reconcile = ["--provider", "sql", "reconcile", "--mirror", "billing", *span]
        wide = runner.invoke(app, reconcile, env={**env, "COLUMNS": "200"})
        piped = runner.invoke(app, reconcile, env=env)  # 80 columns
    assert (wide.exit_code, piped.exit_code) == (0, 0), piped.output  # pending: none sent
    for customer in customers:
        assert f" {customer} " in wide.output
    assert "…" not in piped.output  # wrapped where it must be, never cut
    assert "2026-03-02T00" in piped.output
