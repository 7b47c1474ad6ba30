"""The cyclic garbage collector eased for a process that makes objects by the million
(an export, a forwarder, the service): their objects are freed by reference counting,
yet each 700 allocations start a young collection, and every few thousand of those a
full one that walks the whole startup heap (an export of 1M events: 52 of them, 3 of its
12 seconds)."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["eased"]

YOUNG = 10_000
"""Allocations between young collections while eased (CPython's default is 700)."""


class _Easing:
    """The collector's settings while any `eased()` is entered, held once for all: two
    apps of one process may start and stop in any order, and the collector is given back
    as it was found only when the last one leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entered = 0
        self._found: tuple[tuple[int, ...], int] = ((), 0)

    def enter(self) -> None:
        with self._lock:
            if not self._entered:
                threshold = gc.get_threshold()
                self._found = threshold, gc.get_freeze_count()
                gc.freeze()
                if threshold[0]:  # 0: the process collects only when it says so
                    gc.set_threshold(max(YOUNG, threshold[0]), *threshold[1:])
            self._entered += 1

    def leave(self) -> None:
        with self._lock:
            self._entered -= 1
            if not self._entered:
                threshold, frozen = self._found
                gc.set_threshold(*threshold)
                if not frozen:  # what a caller had frozen stays frozen
                    gc.unfreeze()


_easing = _Easing()


@contextlib.contextmanager
def eased() -> Iterator[None]:
    """What is alive now (modules, models, the engine) frozen, out of every collection's
    walk, and young collections every `YOUNG` allocations (or more rarely, if the process
    had them so; never, if it had turned them off); cycles are still collected. As found
    again once the last of several overlapping `eased()` is left (what a caller had
    frozen stays frozen)."""
    _easing.enter()
    try:
        yield
    finally:
        _easing.leave()
