"""The durable outbox behind the pipeline (stdlib sqlite3, WAL).

With `spool_path` set, an event is acknowledged only after it is committed here; it leaves
the outbox when the provider has it (accepted or duplicate), or moves to the dead-letter
table with its reason when rejected. Whatever is left after a crash is delivered when the
next process opens the spool; event ids make that redelivery harmless.

Durability: WAL with synchronous=NORMAL survives a crash of the process (SIGKILL
included), not the loss of the machine's power. One process per spool file: a second one
gets `ConfigurationError`, as does a spool that cannot be opened (corrupt, unreadable,
read-only), naming the path and the cause and leaving no lock behind. A row that can no
longer be read as an event becomes a dead letter; it does not block the others.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydantic

from metering_core.errors import ConfigurationError, MeteringError
from metering_core.models import IngestResult, UsageEvent, validation_error

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
    """An event the provider rejected for good, with the reason; or a spool row that could
    no longer be read as an event (`event` is None, `raw` holds what was stored)."""

    __slots__ = ("event", "id", "raw", "reason")

    def __init__(
        self, event: UsageEvent | None, reason: str, *, id: str | None = None, raw: str = ""
    ) -> None:
        self.event = event
        self.reason = reason
        self.id = event.id if event is not None else (id or "")
        self.raw = raw

    def __repr__(self) -> str:
        return f"DeadLetter(id={self.id!r}, reason={self.reason!r})"


def _text(value: bytes | str) -> str:
    """A stored text column (read as bytes, so bad bytes cannot stop a read)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _read(text: str) -> UsageEvent | str:
    """The event a row holds, or why it cannot be read (one line)."""
    try:
        return UsageEvent.model_validate_json(text)
    except pydantic.ValidationError as exc:
        return f"unreadable spool row: {validation_error(exc, 'UsageEvent')}"
    except (MeteringError, ValueError) as exc:
        return f"unreadable spool row: {exc}"


class Spool:
    """A SQLite outbox of events not yet delivered, and a table of rejected ones."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigurationError(f"spool_path={str(self.path)!r}: its folder does not exist")
        # the lock belongs to the file itself: another name for it (a symlink) shares it
        self._lock_file = self._lock_exclusively(self.path.resolve())
        self._mutex = threading.Lock()
        self._startup: list[UsageEvent] | None = None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                self._db.text_factory = bytes  # a row of bad bytes is a dead letter, not a crash
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                (verdict,) = self._db.execute("PRAGMA quick_check").fetchone()
                if verdict != b"ok":
                    raise sqlite3.DatabaseError(f"damaged: {verdict.decode(errors='replace')}")
                self._startup = self._read_pending()
            except BaseException:
                self._db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            os.close(self._lock_file)  # a spool that failed to open holds no lock
            raise ConfigurationError(
                f"spool_path={str(self.path)!r} cannot be opened: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _lock_exclusively(path: Path) -> int:
        try:
            descriptor = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"spool_path={str(path)!r} cannot be opened: its lock file {path!s}.lock: "
                f"{type(exc).__name__}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigurationError(
                f"spool {str(path)!r} is in use by another process; one process per spool file"
            ) from None
        return descriptor

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, rolled back when anything in it fails (a write refused by a
        lock another program holds, a full disk): left open, every later `BEGIN` would fail
        and the spool would refuse all ingestion until the process restarts."""
        with self._mutex:
            self._db.execute("BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def add(self, events: Sequence[UsageEvent]) -> None:
        """Commit events to the outbox; returns once they are durable."""
        rows = [(event.id, event.model_dump_json()) for event in events]
        with self._transaction() as db:
            db.executemany("INSERT INTO outbox (id, event) VALUES (?, ?)", rows)

    def pending(self) -> list[UsageEvent]:
        """Events still waiting for delivery, in the order they were committed; a row that
        cannot be read moves to the dead letters with the reason, in the same transaction."""
        if self._startup is not None:  # read (and checked) when the spool was opened
            events, self._startup = self._startup, None
            return events
        return self._read_pending()

    def _read_pending(self) -> list[UsageEvent]:
        with self._mutex:
            rows = self._db.execute("SELECT seq, id, event FROM outbox ORDER BY seq").fetchall()
            events: list[UsageEvent] = []
            unreadable: list[tuple[int, str, str, str]] = []
            for seq, raw_id, raw in rows:
                event_id, text = _text(raw_id), _text(raw)
                event = _read(text)
                if isinstance(event, UsageEvent) and event.id != event_id:
                    event = f"unreadable spool row: its id column {event_id!r} is not its event's"
                if isinstance(event, str):
                    unreadable.append((seq, event_id, text, event))
                else:
                    events.append(event)
        if unreadable:
            with self._transaction() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO dead_letters (id, event, reason) VALUES (?, ?, ?)",
                    [(event_id, text, reason) for _, event_id, text, reason in unreadable],
                )
                db.executemany(
                    "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, *_ in unreadable]
                )
        return events

    def settle(self, batch: Sequence[UsageEvent], result: IngestResult) -> None:
        """Remove delivered events; move rejected ones, with their reasons, to dead letters.

        Each event removes its own row: the oldest row with its id and its very content.
        Two events sent under one id (a resend, a correction) have rows of their own, so a
        refused copy settling first cannot remove the row of a valid copy still in
        flight, which a crash would then lose. A row written by another version's
        serialisation matches by id alone."""
        rows = [(event.id, event.model_dump_json()) for event in batch]
        rejected = [
            (event_id, text, result.rejected[event_id])
            for event_id, text in rows
            if event_id in result.rejected
        ]
        with self._transaction() as db:
            for event_id, text in rows:
                exact = db.execute(
                    "DELETE FROM outbox WHERE seq = "
                    "(SELECT min(seq) FROM outbox WHERE id = ? AND event = ?)",
                    (event_id, text),
                )
                if exact.rowcount == 0:
                    db.execute(
                        "DELETE FROM outbox WHERE seq = (SELECT min(seq) FROM outbox WHERE id = ?)",
                        (event_id,),
                    )
            db.executemany(
                "INSERT OR REPLACE INTO dead_letters (id, event, reason) VALUES (?, ?, ?)", rejected
            )

    def dead_letters(self) -> list[DeadLetter]:
        """Events the provider rejected for good."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT id, event, reason FROM dead_letters ORDER BY rowid"
            ).fetchall()
        letters = []
        for raw_id, raw, raw_reason in rows:
            event_id, text, reason = _text(raw_id), _text(raw), _text(raw_reason)
            event = _read(text)
            readable = event if isinstance(event, UsageEvent) else None
            letters.append(DeadLetter(readable, reason, id=event_id, raw=text))
        return letters

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> list[UsageEvent]:
        """Move dead letters (all, or these ids) back to the outbox in one transaction, so a
        crash leaves each event in exactly one of the two tables; returns them to deliver.
        Rows that cannot be read as events stay where they are."""
        with self._transaction() as db:
            if ids is None:
                listed = db.execute("SELECT id, event FROM dead_letters ORDER BY rowid").fetchall()
            else:
                found = (
                    db.execute("SELECT id, event FROM dead_letters WHERE id = ?", (i,)) for i in ids
                )
                listed = [row for cursor in found for row in cursor]
            rows = [
                (_text(i), _text(raw))
                for i, raw in listed
                if not isinstance(_read(_text(raw)), str)
            ]
            db.executemany("INSERT INTO outbox (id, event) VALUES (?, ?)", rows)
            db.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(event_id,) for event_id, _ in rows]
            )
        return [UsageEvent.model_validate_json(event) for _, event in rows]

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        os.close(self._lock_file)
