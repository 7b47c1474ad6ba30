"""The `metering` command: each subcommand, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metering_core import Aggregation, Capabilities, hookimpl, register_plugin
from metering_core.cli import app
from metering_core.errors import ProviderUnavailableError
from metering_core.memory import MemoryProvider, MemorySettings
from metering_core.plugins import unregister_plugin

runner = CliRunner()


class SharedMemory:
    """A provider whose state outlives one command, so commands can build on each other."""

    def __init__(self) -> None:
        self.provider = MemoryProvider()

    @hookimpl
    def register_providers(self, register):  # type: ignore[no-untyped-def]
        register("shared", lambda settings: self.provider, MemorySettings)


@pytest.fixture
def shared() -> Iterator[MemoryProvider]:
    plugin = SharedMemory()
    register_plugin(plugin, name="shared-memory")
    yield plugin.provider
    unregister_plugin(plugin)


def metering(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--provider", "shared", *args])
    return result.exit_code, result.output


def test_meters_lifecycle(shared: MemoryProvider) -> None:
    code, out = metering(
        "meters", "create", "api_calls", "--display-name", "API calls", "--dimension", "region"
    )
    assert code == 0
    meter_id = json.loads(metering("meters", "get", "api_calls")[1])["id"]  # by event name
    assert meter_id in out  # create answers as list does: a table holding the whole id
    assert metering("meters", "list")[1].count("api_calls") == 1
    assert json.loads(metering("meters", "get", meter_id)[1])["display_name"] == "API calls"
    assert (
        json.loads(metering("meters", "update", meter_id, "--display-name", "Calls")[1])[
            "display_name"
        ]
        == "Calls"
    )
    assert metering("meters", "delete", meter_id) == (0, f"deleted {meter_id}\n")
    code, out = metering("meters", "get", meter_id)
    assert code == 1
    assert out.strip().count("\n") == 0
    assert out.startswith("error: no meter with id")


def test_bad_input_exits_2_with_one_line(shared: MemoryProvider) -> None:
    code, out = metering("meters", "create", "Not A Slug")
    assert code == 2
    assert out.startswith("error: invalid MeterCreate: event_name='Not A Slug'")


def test_ingest_validates_every_row_before_sending(shared: MemoryProvider, tmp_path: Path) -> None:
    metering("meters", "create", "api_calls")
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"id": "a", "event_name": "api_calls", "customer_id": "t1", "value": 2}\n'
        '{"id": "b", "event_name": "api_calls", "customer_id": "t1", "value": "x"}\n'
        "not json\n"
        "5\n"
    )
    code, out = metering("ingest", str(rows))
    assert code == 2
    assert f"{rows}:2: " in out
    assert f"{rows}:3: not JSON" in out
    assert f"{rows}:4: not a JSON object" in out
    assert "nothing was sent" in out
    assert shared._seen == {}
    code, out = metering("ingest", str(rows), "--skip-invalid")
    assert (code, "accepted 1") == (0, out.strip().splitlines()[-1][:10])


def test_ingest_csv_with_a_spool_resumes_without_duplicates(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    metering("meters", "create", "api_calls", "--dimension", "region")
    rows = tmp_path / "usage.csv"
    rows.write_text(
        "id,event_name,customer_id,value,timestamp,dimensions.region\n"
        "a,api_calls,t1,2,2026-11-01T10:00:00Z,eu\n"
        "b,api_calls,t2,3,2026-11-01T11:00:00Z,us\n"
    )
    spool = str(tmp_path / "spool.db")
    assert (
        metering("ingest", str(rows), "--spool", spool)[1]
        .strip()
        .endswith("accepted 2, duplicates 0, rejected 0")
    )
    assert (
        metering("ingest", str(rows), "--spool", spool)[1]
        .strip()
        .endswith("accepted 0, duplicates 2, rejected 0")
    )
    meter_id = next(iter(shared._meters))
    code, out = metering(
        "usage",
        meter_id,
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-02T00:00:00Z",
        "--group-by",
        "region",
        "--format",
        "csv",
    )
    assert code == 0
    assert out.splitlines() == [
        "start,end,customer_id,region,value",
        "2026-11-01T00:00:00+00:00,2026-11-02T00:00:00+00:00,,eu,2",
        "2026-11-01T00:00:00+00:00,2026-11-02T00:00:00+00:00,,us,3",
    ]


def test_rows_without_ids_rerun_as_duplicates_and_identical_rows_both_count(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    meter_id = json.loads(metering("meters", "create", "api_calls", "--format", "json")[1])[0]["id"]
    row = '{"event_name": "api_calls", "customer_id": "t1", "value": 2, "timestamp": "%s"}\n'
    lines = [row % "2026-11-01T10:00:00Z"] * 2 + [row % "2026-11-01T11:00:00Z"]
    rows = tmp_path / "usage.jsonl"
    rows.write_text("".join(lines[:2]))  # a backfill interrupted after two rows
    assert metering("ingest", str(rows))[1].strip().endswith("accepted 2, duplicates 0, rejected 0")
    rows.write_text("".join(lines))
    assert metering("ingest", str(rows))[1].strip().endswith("accepted 1, duplicates 2, rejected 0")
    window = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-02T00:00:00Z"]
    assert (
        json.loads(metering("usage", meter_id, *window, "--format", "json")[1])["rows"][0]["value"]
        == "6"
    )


def test_serve_without_keys_is_exit_2_and_binds_loopback_by_default(
    shared: MemoryProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = metering("serve")
    assert (code, out.count("\n")) == (2, 1)
    assert out.startswith("error: no API keys configured")
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(
        "metering_core.server.serve", lambda service, **options: calls.append(options)
    )
    assert metering("serve", "--allow-anonymous")[0] == 0
    [options] = calls
    assert (options["host"], options["port"], options["allow_anonymous"]) == (
        "127.0.0.1",
        8000,
        True,
    )
    assert options["public_metrics"] is False
    assert metering("serve", "--allow-anonymous", "--log-json", "--log-level", "debug")[0] == 0
    handlers = calls[1]["log_config"]["formatters"]  # type: ignore[index]
    assert "JsonFormatter" in str(handlers)


def test_a_rejected_backfill_row_fails_the_command(shared: MemoryProvider, tmp_path: Path) -> None:
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"id": "a", "event_name": "unmetered", "customer_id": "t1"}\n'
        '{"id": "b\\u001b[2J", "event_name": "unmetered", "customer_id": "t1"}\n'
    )
    code, out = metering("ingest", str(rows))
    assert code == 1
    assert "rejected a: no meter for event_name='unmetered'" in out
    assert "rejected b\\x1b[2J: " in out  # a tenant's id drives no terminal (review)
    assert "\x1b" not in out


def test_a_backfill_keeps_every_digit_of_a_long_json_number(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    meter_id = json.loads(metering("meters", "create", "api_calls", "--format", "json")[1])[0]["id"]
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"id": "a", "event_name": "api_calls", "customer_id": "t1", '
        '"value": 12345678901234567890.123456789, "timestamp": "2026-11-01T10:00:00Z"}\n'
    )
    assert metering("ingest", str(rows))[0] == 0
    window = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-02T00:00:00Z"]
    usage = json.loads(metering("usage", meter_id, *window, "--format", "json")[1])
    assert [row["value"] for row in usage["rows"]] == ["12345678901234567890.123456789"]


def test_usage_table_json_and_a_bad_time(shared: MemoryProvider) -> None:
    meter_id = json.loads(metering("meters", "create", "api_calls", "--format", "json")[1])[0]["id"]
    window = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-03T00:00:00Z"]
    assert "sum of" in metering("usage", meter_id, *window, "--window", "day")[1]
    assert json.loads(metering("usage", meter_id, *window, "--format", "json")[1])["rows"] == []
    code, out = metering("usage", meter_id, "--from", "yesterday", "--to", "2026-11-03")
    assert (code, out.strip()) == (2, "error: --from='yesterday' is not an ISO 8601 time")


def test_customers_and_cancel(shared: MemoryProvider) -> None:
    assert (
        json.loads(metering("customers", "create", "acme", "--name", "Acme")[1])["name"] == "Acme"
    )
    assert metering("customers", "delete", "acme")[0] == 0
    assert metering("customers", "delete", "acme")[0] == 1
    assert json.loads(metering("cancel", "nope")[1])["not_found"] == ["nope"]


class Limited:
    """A provider that states narrow capabilities up front."""

    @hookimpl
    def register_providers(self, register):  # type: ignore[no-untyped-def]
        caps = Capabilities(
            aggregations=frozenset({Aggregation.SUM}), cancel_window=timedelta(hours=24)
        )
        register("limited", lambda settings: MemoryProvider(), MemorySettings, capabilities=caps)


def test_providers_prints_a_capability_matrix() -> None:
    plugin = Limited()
    register_plugin(plugin, name="limited")
    try:
        result = runner.invoke(app, ["providers"], env={"COLUMNS": "200"})
    finally:
        unregister_plugin(plugin)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    names = [cell.strip() for cell in next(line for line in lines if "memory" in line).split("┃")]
    cells = {line.split("│")[1].strip(): line.split("│") for line in lines if "│" in line}
    column = {name: index for index, name in enumerate(names) if name}
    assert cells["aggregation min"][column["memory"]].strip() == "✓"
    assert cells["aggregation min"][column["limited"]].strip() == "—"
    assert cells["cancellable for"][column["limited"]].strip() == "1 day"
    assert cells["cancellable for"][column["memory"]].strip() == "always"


def command(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `metering` script (or the module when it is not installed)."""
    script = Path(sys.executable).with_name("metering")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "metering_core.cli"]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_demo_prints_usage_by_day_and_by_tenant() -> None:
    result = command("demo")
    assert result.returncode == 0, result.stderr
    assert "API calls by day" in result.stdout
    assert "acme" in result.stdout
    assert "duplicates (resent ids, counted once)" in result.stdout


def test_an_unknown_provider_is_exit_2_naming_the_fix() -> None:
    result = command("--provider", "chargebee", "meters", "list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: provider 'chargebee' is not installed (installed: "
        + result.stderr.split("(installed: ")[1].split(")")[0]
        + "); add it with: pip install metering-chargebee"
    )


def test_debug_adds_the_traceback(shared: MemoryProvider) -> None:
    assert "Traceback" not in metering("meters", "get", "nope")[1]
    result = runner.invoke(app, ["--provider", "shared", "--debug", "meters", "get", "nope"])
    assert result.exit_code == 1
    assert "Traceback" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: no meter with id")


def test_bad_rows_as_a_subprocess_name_each_line_and_exit_2(tmp_path: Path) -> None:
    rows = tmp_path / "usage.csv"
    rows.write_text("event_name,customer_id,value\napi_calls,t1,1\napi_calls,,2\nAPI,t1,3\n")
    result = command("ingest", str(rows))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[:2]] == [f"{rows}:3", f"{rows}:4"]
    assert lines[-1].startswith("error: 2 bad row(s); nothing was sent")
    assert result.stdout == ""


def test_a_multiline_provider_error_prints_as_one_line(
    shared: MemoryProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(meter_id: str) -> None:
        raise ProviderUnavailableError("Unexpected error.\n\n(Network error)", provider="shared")

    monkeypatch.setattr(shared, "fetch_meter", down)
    assert metering("meters", "get", "m1") == (1, "error: Unexpected error. (Network error)\n")


def test_secrets_stay_out_of_errors_and_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("metering_stripe")
    monkeypatch.setenv("METERING_STRIPE_API_KEY", "sk_test_SECRET123")
    monkeypatch.setenv("METERING_STRIPE_TIMEOUT", "soon")
    result = runner.invoke(app, ["--provider", "stripe", "--debug", "meters", "list"])
    assert result.exit_code == 2
    assert "timeout='soon'" in result.output
    assert "SECRET123" not in result.output


def test_the_readme_demo_command_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- ci: demo -->", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    last = block.strip().split("&&")[-1].split()  # after the venv and pip steps
    assert last[0] == "metering"
    result = command(*last[1:])
    assert result.returncode == 0, result.stderr
    assert "API calls by tenant and region" in result.stdout


def test_unreadable_backfill_rows_are_named_by_line_and_exit_2(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    metering("meters", "create", "api_calls")
    rows = tmp_path / "usage.csv"
    rows.write_bytes(
        b"event_name,customer_id,value\n"
        b"api_calls,t1,1,extra\n"  # 2: a column the header does not name
        b"api_calls,t\xe91,1\n"  # 3: a Latin-1 byte
        b"api_calls," + b"x" * 140_000 + b",1\n"  # 4: a customer id of 140,000 characters
        b"api_calls,t1\n"  # 5: a column short
        b"api_calls,t1,5\n"  # 6: good
    )
    code, out = metering("ingest", str(rows))
    assert code == 2
    named = [line.split(": ", 1)[0] for line in out.splitlines()[:4]]
    assert named == [f"{rows}:{n}" for n in (2, 3, 4, 5)]
    assert "Traceback" not in out
    assert shared._seen == {}
    code, out = metering("ingest", str(rows), "--skip-invalid")
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("accepted 1")


def test_an_overflowing_timestamp_is_a_bad_row_not_a_crash(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"event_name": "api_calls", "customer_id": "t1", '
        '"timestamp": "9999-12-31T23:30:00-01:00"}\n'
    )
    code, out = metering("ingest", str(rows))
    assert code == 2
    assert out.startswith(f"{rows}:1: invalid UsageEvent: timestamp=")


def test_absurd_json_rows_and_a_repeated_csv_column_are_bad_rows(
    shared: MemoryProvider, tmp_path: Path
) -> None:
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"event_name": "api_calls", "customer_id": "t1", "value": '
        + "9" * 5000
        + "}\n"
        + "[" * 200_000
        + "\n"
    )
    code, out = metering("ingest", str(rows))
    assert code == 2
    assert "Traceback" not in out
    assert [line.split(": ")[0] for line in out.splitlines()[:2]] == [f"{rows}:1", f"{rows}:2"]
    table = tmp_path / "usage.csv"
    table.write_text("event_name,customer_id,customer_id\napi_calls,a,b\n")
    code, out = metering("ingest", str(table))
    assert code == 2
    assert out.startswith(f"{table}:1: the header names 'customer_id' more than once")


@pytest.mark.parametrize(
    ("provider", "architecture", "platform", "wanted"),
    [
        ("stripe", "x86_64", "manylinux2014_x86_64", ["metering-core[aws]", "metering-stripe"]),
        ("http", "arm64", "manylinux2014_aarch64", ["metering-core[aws]", "metering-http"]),
        ("sql", "x86_64", "manylinux2014_x86_64", ["metering-core[aws,postgres]"]),
    ],
)
def test_aws_bundle_asks_pip_for_lambdas_platform_and_python_wheels_only(
    provider: str, architecture: str, platform: str, wanted: list[str]
) -> None:
    import shlex

    code, printed = metering(
        "aws",
        "bundle",
        "build/fn",
        "--provider",
        provider,
        "--architecture",
        architecture,
        "--python",
        "3.13",
        "--dry-run",
    )
    assert code == 0, printed
    command = shlex.split(printed.strip())
    assert command[1:4] == ["-m", "pip", "install"]
    options = dict(zip(command[4::2], command[5::2], strict=False))
    assert options["--target"] == "build/fn"
    assert options["--platform"] == platform
    assert options["--python-version"] == "3.13"
    assert options["--implementation"] == "cp"
    assert "--only-binary=:all:" in command
    assert command[-len(wanted) :] == wanted


def test_aws_bundle_installs_local_builds_in_place_of_releases_with_their_extras() -> None:
    from pathlib import Path

    from metering_core.cli.bundle import Architecture, bundle_commands

    wheels = [
        Path("w/metering_core-0.1.0-py3-none-any.whl"),
        Path("w/metering_stripe-0.1.0-py3-none-any.whl"),
    ]
    command = bundle_commands(Path("out"), "stripe", "3.12", Architecture.x86_64, wheels)
    assert command[-2:] == [
        "w/metering_core-0.1.0-py3-none-any.whl[aws]",
        "w/metering_stripe-0.1.0-py3-none-any.whl",
    ]


def test_aws_bundle_refuses_a_provider_it_cannot_bundle() -> None:
    code, printed = metering("aws", "bundle", "out", "--provider", "memory", "--dry-run")
    assert code == 2
    assert "provider='memory'" in printed


def test_a_meter_is_named_by_its_id_or_its_event_name_and_tables_keep_ids_whole(
    shared: MemoryProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`metering usage api_calls` answered "no meter with id 'api_calls'", and a narrow
    terminal cut the id `meters list` showed (the id `usage` needed)."""
    monkeypatch.setenv("COLUMNS", "50")
    created = json.loads(metering("meters", "create", "api_calls", "--format", "json")[1])[0]
    listed = metering("meters", "list")[1]
    assert created["id"] in listed
    assert "api_calls" in listed
    window = ["--from", "2026-11-01T00:00:00Z", "--to", "2026-11-02T00:00:00Z"]
    by_name = metering("usage", "api_calls", *window, "--format", "json")
    assert json.loads(by_name[1])["meter_id"] == created["id"]
    code, out = metering("usage", "no_such_meter", *window)
    assert (code, out.strip()) == (
        1,
        "error: no meter with id or event name 'no_such_meter' (`metering meters list`)",
    )
    assert metering("meters", "delete", "api_calls") == (0, f"deleted {created['id']}\n")


def test_meters_list_as_json_and_csv_for_scripts(shared: MemoryProvider) -> None:
    import csv as csv_module

    metering("meters", "create", "api_calls", "--dimension", "region", "--dimension", "plan")
    as_json = json.loads(metering("meters", "list", "--format", "json")[1])
    assert [(m["event_name"], m["dimensions"]) for m in as_json] == [
        ("api_calls", ["region", "plan"])
    ]
    rows = list(csv_module.reader(metering("meters", "list", "--format", "csv")[1].splitlines()))
    assert rows[0] == ["id", "event_name", "display_name", "aggregation", "dimensions", "status"]
    assert rows[1][0] == as_json[0]["id"]
    assert rows[1][4] == "region plan"
