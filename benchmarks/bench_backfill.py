"""`metering ingest` (the CLI backfill): its check pass alone, in this process, and the
whole command into the default SQLite store, in its own process, on the same file.

    python benchmarks/bench_backfill.py [--rows N]

Each JSON line is parsed and validated in one pass (`UsageEvent.model_validate_json`);
the figure beside it parses with `json.loads` and validates the dict after, as the
command did before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metering_core.cli.backfill import check_rows
from metering_core.models import UsageEvent


def write_rows(path: Path, count: int) -> None:
    with path.open("w") as file:
        for i in range(count):
            row = {
                "id": f"b-{i}",
                "event_name": "api_calls",
                "customer_id": f"tenant-{i % 1000}",
                "value": i % 7 + 1,
                "timestamp": f"2026-10-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
                "dimensions": {"region": ("eu", "us", "ap")[i % 3]},
            }
            file.write(json.dumps(row) + "\n")


def two_passes(path: Path) -> float:
    """The old way: json.loads, then validation of the dict."""
    began = time.perf_counter()
    with path.open() as file:
        count = sum(1 for line in file if UsageEvent.model_validate(json.loads(line)))
    return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "usage.jsonl"
        write_rows(path, rows)
        began = time.perf_counter()
        check_rows(path, skip_invalid=False)
        one_pass = rows / (time.perf_counter() - began)
        print(
            f"check pass, one-pass validation: {one_pass:,.0f} rows/s; "
            f"json.loads then validate: {two_passes(path):,.0f} rows/s"
        )
        env = {**os.environ, "XDG_DATA_HOME": folder, "METERING_PROVIDER": "sql"}
        metering = [sys.executable, "-m", "metering_core.cli"]
        subprocess.run(
            [*metering, "meters", "create", "api_calls"], env=env, check=True, capture_output=True
        )
        began = time.perf_counter()
        done = subprocess.run(
            [*metering, "ingest", str(path)], env=env, check=True, capture_output=True, text=True
        )
        elapsed = time.perf_counter() - began
        print(
            f"metering ingest of {rows:,} rows into the SQLite store (process start, both "
            f"passes, delivery): {elapsed:.1f} s = {rows / elapsed:,.0f} events/s; "
            f"{done.stdout.strip().splitlines()[-1]}"
        )


if __name__ == "__main__":
    main()
