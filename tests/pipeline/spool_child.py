"""Child process for the crash test: ingests through a spool into a file-backed ledger,
printing each id once ingest has returned (acknowledged); the parent kills it mid-stream."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from metering_core import IngestResult, Metering, UsageEvent
from metering_core.memory import MemoryProvider


class LedgerProvider(MemoryProvider):
    """Delivery appends new ids to a file; ids already there are duplicates. Slow on purpose."""

    def __init__(self, ledger: Path) -> None:
        super().__init__()
        self.ledger = ledger

    def _known(self) -> set[str]:
        if not self.ledger.exists():
            return set()
        lines = self.ledger.read_text().split("\n")
        return set(lines[:-1])  # the last piece is empty or a torn write

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        await asyncio.sleep(0.002)
        known = self._known()
        fresh = [event.id for event in events if event.id not in known]
        with self.ledger.open("a") as file:
            file.write("".join(f"{event_id}\n" for event_id in dict.fromkeys(fresh)))
        return IngestResult(
            accepted=list(dict.fromkeys(fresh)), duplicates=[e.id for e in events if e.id in known]
        )


def main() -> None:
    ledger, spool, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    with Metering(LedgerProvider(ledger), spool_path=spool, linger=0.001) as m:
        if mode == "resume":
            m.flush()
            print("resumed", flush=True)
            return
        for number in range(100_000):
            event_id = m.ingest_usage_event(
                id=f"event-{number}", event_name="api_calls", customer_id="t1"
            )
            print(event_id, flush=True)


if __name__ == "__main__":
    main()
