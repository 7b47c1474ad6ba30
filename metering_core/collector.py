"""The cyclic garbage collector eased for a process that makes objects by the million
(an export, a forwarder, the service): their objects are freed by reference counting,
yet each 700 allocations start a young collection, and every few thousand of those a
full one that walks the whole startup heap (an export of 1M events: 52 of them, 3 of its
12 seconds)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["eased"]

YOUNG = 10_000
"""Allocations between young collections while eased (CPython's default is 700)."""


@contextlib.contextmanager
def eased() -> Iterator[None]:
    """What is alive now (modules, models, the engine) frozen, out of every collection's
    walk, and young collections every `YOUNG` allocations; cycles are still collected.
    As found again after (what a caller had frozen stays frozen)."""
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(YOUNG, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if not frozen:
            gc.unfreeze()
