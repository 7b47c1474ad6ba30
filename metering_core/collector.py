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
        self._freezing = 0
        self._found: tuple[int, ...] = ()
        self._set: tuple[int, ...] = ()
        self._frozen_found = 0

    def enter(self, *, freeze: bool) -> None:
        with self._lock:
            if not self._entered:
                self._found = gc.get_threshold()
                if self._found[0]:  # 0: the process collects only when it says so
                    gc.set_threshold(max(YOUNG, self._found[0]), *self._found[1:])
                self._set = gc.get_threshold()
            self._entered += 1
            if freeze:
                if not self._freezing:
                    self._frozen_found = gc.get_freeze_count()
                    gc.freeze()
                self._freezing += 1

    def leave(self, *, freeze: bool) -> None:
        with self._lock:
            if freeze:
                self._freezing -= 1
                if not self._freezing and not self._frozen_found:
                    gc.unfreeze()  # what a caller had frozen stays frozen
            self._entered -= 1
            if not self._entered and gc.get_threshold() == self._set:
                gc.set_threshold(*self._found)  # unless another thread set its own since


_easing = _Easing()


@contextlib.contextmanager
def eased(*, freeze: bool = True) -> Iterator[None]:
    """Young collections every `YOUNG` allocations (or more rarely, if the process had
    them so; never, if it had turned them off); cycles are still collected. With
    `freeze`, for a whole run (the service, an export, a forwarder): what is alive now
    (modules, models, the engine) is also frozen out of every collection's walk. Not for
    one call among many: each freeze moves the young objects, garbage cycles among them,
    where no collection counts them, and a process making cycles between calls grew
    without bound (review). As found again once the last of several overlapping
    `eased()` is left (what a caller had frozen stays frozen, and a threshold another
    thread set meanwhile stays set)."""
    _easing.enter(freeze=freeze)
    try:
        yield
    finally:
        _easing.leave(freeze=freeze)
