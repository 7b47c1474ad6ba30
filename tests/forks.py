"""Running a test's step in a forked child, as gunicorn --preload or multiprocessing do."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def said_in_a_child(
    work: Callable[[], str], *, fork: Callable[[], int] = os.fork, limit: int = 20
) -> str:
    """What `work()` returns in a forked child, or the repr of its error, as the parent
    reads it. A child that hangs is ended after `limit` seconds, and says nothing."""
    read, write = os.pipe()
    child = fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        signal.alarm(limit)
        try:
            said = work()
        except Exception as exc:
            said = repr(exc)
        os.write(write, said.encode()[:300])
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    try:
        return os.read(read, 300).decode()
    finally:
        os.close(read)
