"""SQLite's checkpoints, moved off the write path.

In WAL mode a commit appends its pages to the log, and by default the commit that takes
the log past 1,000 pages then copies the log into the database file and syncs it: that
caller waits for the copy, and so does every request queued behind it. Under load it
was the service's tail (p99 3.7x its p50 at one event a request from 16 clients; 1.5x
with checkpoints off the path). Here a thread of the store's own, on a connection of its
own, checkpoints passively at a short interval: it copies what no reader still needs
and waits for nobody, while writers go on appending. A writer still checkpoints once the
log passes `WRITER_CHECKPOINT_PAGES`, which is then cheap (the thread has copied nearly
all of it) and lets the log start over: a passive checkpoint alone cannot, while writes
never pause (a writer starts the log over only if it begins while every page is copied,
and a pass, syncs included, outlasts the gap between two commits). That writer's
checkpoint still syncs the log and the file, 7-18 ms in the commit of one group, and it
was the service's tail at 25 events a request from 16 clients (four rounds of 4 s on one
store, as `bench_service` loads it): p99 1.4-2.4x its p50 at 10,000 pages, worse as the
store grew, and 1.6-1.7x at 40,000. So under sustained writes the log file cycles up to
about 160 MB (SQLite's default: 4 MB). A log's file is not cut when the log starts over:
once the store is at rest (a log all copied, with nothing added since the last interval)
the thread cuts it to nothing. If the thread cannot run, writers checkpoint as SQLite's
default does, forty times less often and forty times as long.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

__all__ = ["WRITER_CHECKPOINT_PAGES", "Checkpoints"]

logger = logging.getLogger("metering_core.sql")

WRITER_CHECKPOINT_PAGES = 40_000
"""Log pages (160 MB of 4 KiB pages) past which a committing writer checkpoints: the
bound on the log, and the store's own checkpoints if the thread has stopped."""

EVERY_SECONDS = 0.1
"""How often the thread checkpoints (an idle store's checkpoint finds nothing to do)."""

RECOVERED_AFTER = 10
"""Checkpoints in a row that must work before a failure is said to be over: one that
fails every other time is one outage, not a warning each interval."""


class Checkpoints:
    """Passive checkpoints of the SQLite database at `path`, in a daemon thread, from
    `start()` until `stop()`."""

    def __init__(self, path: Path, *, every: float = EVERY_SECONDS) -> None:
        self._path = path
        # read-write, never created: a file moved away is not replaced by an empty one;
        # resolved now, not by the thread after the process may have changed directory
        self._address = f"{path.resolve().as_uri()}?mode=rw"
        self._every = every
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="metering-sqlite-checkpoints", daemon=True
        )

    def start(self) -> Checkpoints:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checkpointing and close the thread's connection, once the checkpoint
        under way (if any) has finished: before the store's own close, whose last
        connection checkpoints the rest and removes the log."""
        self.stop_soon()
        if self._thread.is_alive():
            self._thread.join()

    def stop_soon(self) -> None:
        """Have the thread end after its current checkpoint, without waiting for it (a
        store collected unclosed: its thread and connection must not outlive it)."""
        self._stopping.set()

    def _run(self) -> None:
        failing: str | None = None  # the outage reported, until checkpoints work again
        working = 0  # checkpoints in a row that worked, since
        connection: sqlite3.Connection | None = None
        before: tuple[int, int, int] | None = None  # the last interval's (busy, log, copied)
        try:
            while not self._stopping.wait(self._every):
                try:
                    if connection is None:  # waiting on no lock: a stop is never held up
                        connection = sqlite3.connect(
                            self._address, uri=True, timeout=0, isolation_level=None
                        )
                    now = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if now == before and 0 < now[1] == now[2]:  # at rest: cut the file
                        now = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    before = now
                    working += 1
                    if failing is not None and working >= RECOVERED_AFTER:
                        logger.warning("SQLite checkpoints of %s work again", self._path)
                        failing = None
                except sqlite3.Error as exc:
                    if any(passing in str(exc) for passing in _CONTENDED):
                        continue  # another connection's lock: the next interval tries again
                    # the file moved, or made read-only: tried again at the next interval,
                    # and said once per outage, however it flaps
                    working = 0
                    if failing is None:
                        logger.warning("SQLite checkpoint of %s failed: %s", self._path, exc)
                        failing = str(exc)
                    if connection is not None:
                        connection.close()
                        connection = None
        finally:
            if connection is not None:
                connection.close()


_CONTENDED = ("locked", "locking protocol")
"""SQLite's errors for a lock another connection holds, which pass on their own."""
