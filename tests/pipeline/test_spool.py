"""The spool: acknowledged events survive SIGKILL and are delivered exactly once afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metering_core import ConfigurationError, MeterCreate, Metering, UsageEvent
from metering_core.memory import MemoryProvider
from metering_core.spool import Spool

CHILD = [sys.executable, "-m", "tests.pipeline.spool_child"]
ROOT = Path(__file__).resolve().parents[2]


def test_acknowledged_events_survive_sigkill_and_are_delivered_exactly_once(tmp_path: Path) -> None:
    ledger, spool = tmp_path / "ledger.txt", tmp_path / "spool.db"
    child = subprocess.Popen(
        [*CHILD, str(ledger), str(spool), "ingest"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(3000)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    acknowledged += [line.strip() for line in child.stdout if line.endswith("\n")]
    delivered_before = ledger.read_text().count("\n") if ledger.exists() else 0
    assert delivered_before < len(acknowledged), "the crash should strand some events in the spool"

    resumed = subprocess.run(
        [*CHILD, str(ledger), str(spool), "resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr
    lines = ledger.read_text().split("\n")[:-1]
    assert len(lines) == len(set(lines)), "an event was delivered twice"
    assert set(acknowledged) <= set(lines), "an acknowledged event was lost"


@pytest.mark.parametrize("by_alias", [False, True], ids=["same-name", "symlink"])
def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path, by_alias: bool) -> None:
    """Two processes delivering one backlog would each think it theirs: the lock goes with
    the file, whatever name (a symlink) the second opens it by."""
    spool = tmp_path / "spool.db"
    opened = spool
    if by_alias:
        (tmp_path / "other").mkdir()
        opened = tmp_path / "other" / "alias.db"
        opened.symlink_to(spool)
    with Metering("memory", spool_path=spool):
        script = (
            f"from metering_core import Metering; Metering('memory', spool_path={str(opened)!r})"
        )
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode != 0
    assert "in use by another process" in other.stderr


def test_rejected_events_wait_in_dead_letters_and_can_be_retried(tmp_path: Path) -> None:
    with Metering("memory", spool_path=tmp_path / "spool.db", linger=0) as m:
        event = UsageEvent(id="late", event_name="api_calls", customer_id="t1", value=3)
        m.ingest_usage_event(event)
        assert "no meter" in m.flush().rejected["late"]
        [letter] = m.dead_letters()
        assert (letter.event, "no meter" in letter.reason) == (event, True)
        m.create_meter(event_name="api_calls")
        assert m.retry_dead_letters() == ["late"]
        assert m.flush().accepted == ["late"]
        assert m.dead_letters() == []


def test_events_left_in_a_spool_are_delivered_on_the_next_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    outbox = Spool(spool)
    outbox.add(
        [UsageEvent(id=f"left-{i}", event_name="api_calls", customer_id="t1") for i in range(3)]
    )
    outbox.close()
    provider = MemoryProvider()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    with Metering(provider, spool_path=spool, linger=0) as m:
        assert sorted(m.flush().accepted) == ["left-0", "left-1", "left-2"]
    assert Spool(spool).pending() == []


def test_no_spool_means_no_dead_letters() -> None:
    with Metering("memory") as m:
        assert m.dead_letters() == []
        assert m.retry_dead_letters() == []


def test_a_spool_in_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="spool_path"):
        Metering("memory", spool_path=tmp_path / "missing" / "spool.db")
