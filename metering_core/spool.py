"""The durable outbox behind the pipeline (stdlib sqlite3, WAL).

With `spool_path` set, an event is acknowledged only after it is committed here; it leaves
the outbox when the provider has it (accepted or duplicate), or moves to the dead-letter
table with its reason when rejected. Whatever is left after a crash is delivered when the
next process opens the spool; event ids make that redelivery harmless.

Durability: WAL with synchronous=NORMAL survives a crash of the process (SIGKILL
included), not the loss of the machine's power. One process per spool file: a second one
gets `ConfigurationError`.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from metering_core.errors import ConfigurationError
from metering_core.models import IngestResult, UsageEvent

__all__ = ["DeadLetter", "Spool"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_id ON outbox (id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY, event TEXT NOT NULL, reason TEXT NOT NULL
);
"""


class DeadLetter:
    """An event the provider rejected for good, with the reason."""

    __slots__ = ("event", "reason")

    def __init__(self, event: UsageEvent, reason: str) -> None:
        self.event = event
        self.reason = reason

    def __repr__(self) -> str:
        return f"DeadLetter(id={self.event.id!r}, reason={self.reason!r})"


class Spool:
    """A SQLite outbox of events not yet delivered, and a table of rejected ones."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigurationError(f"spool_path={str(self.path)!r}: its folder does not exist")
        self._lock_file = self._lock_exclusively(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._mutex = threading.Lock()
        with self._mutex:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    @staticmethod
    def _lock_exclusively(path: Path) -> int:
        descriptor = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigurationError(
                f"spool {str(path)!r} is in use by another process; one process per spool file"
            ) from None
        return descriptor

    def add(self, events: Sequence[UsageEvent]) -> None:
        """Commit events to the outbox; returns once they are durable."""
        rows = [(event.id, event.model_dump_json()) for event in events]
        with self._mutex:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO outbox (id, event) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def pending(self) -> list[UsageEvent]:
        """Events still waiting for delivery, in the order they were committed."""
        with self._mutex:
            rows = self._db.execute("SELECT event FROM outbox ORDER BY seq").fetchall()
        return [UsageEvent.model_validate_json(event) for (event,) in rows]

    def settle(self, batch: Sequence[UsageEvent], result: IngestResult) -> None:
        """Remove delivered events; move rejected ones, with their reasons, to dead letters."""
        rejected = [
            (e.id, e.model_dump_json(), result.rejected[e.id])
            for e in batch
            if e.id in result.rejected
        ]
        with self._mutex:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM outbox WHERE id = ?", [(event.id,) for event in batch]
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO dead_letters (id, event, reason) VALUES (?, ?, ?)", rejected
            )
            self._db.execute("COMMIT")

    def dead_letters(self) -> list[DeadLetter]:
        """Events the provider rejected for good."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT event, reason FROM dead_letters ORDER BY rowid"
            ).fetchall()
        return [DeadLetter(UsageEvent.model_validate_json(event), reason) for event, reason in rows]

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> list[UsageEvent]:
        """Move dead letters (all, or these ids) back to the outbox in one transaction, so a
        crash leaves each event in exactly one of the two tables; returns them to deliver."""
        with self._mutex:
            self._db.execute("BEGIN")
            if ids is None:
                rows = self._db.execute(
                    "SELECT id, event FROM dead_letters ORDER BY rowid"
                ).fetchall()
            else:
                found = (
                    self._db.execute("SELECT id, event FROM dead_letters WHERE id = ?", (i,))
                    for i in ids
                )
                rows = [row for cursor in found for row in cursor]
            self._db.executemany("INSERT INTO outbox (id, event) VALUES (?, ?)", rows)
            self._db.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(event_id,) for event_id, _ in rows]
            )
            self._db.execute("COMMIT")
        return [UsageEvent.model_validate_json(event) for _, event in rows]

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        os.close(self._lock_file)
