"""The collector eased while the service, an export or a forwarder runs, and given back
as it was found: to a process embedding any of them, whatever order they stop in."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from metering_core.collector import YOUNG, eased


@pytest.fixture(autouse=True)
def collector_as_found() -> Iterator[None]:
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    yield
    gc.set_threshold(*threshold)
    if not frozen:
        gc.unfreeze()


def test_easing_keeps_what_its_caller_froze() -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    with eased():
        assert gc.get_threshold()[0] == YOUNG
    assert gc.get_freeze_count() >= frozen > 0


def test_overlapping_easings_give_the_collector_back_when_the_last_leaves() -> None:
    """Two apps of one process, started A then B and stopped A then B: B runs eased
    to its end, and only then is the collector as it was."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    first, second = eased(), eased()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == (YOUNG, 10, 10)
    assert gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(("found", "eased_to"), [(0, 0), (50_000, 50_000), (700, YOUNG)])
def test_easing_never_collects_more_often_than_the_process_had(found: int, eased_to: int) -> None:
    """A process that collects only when it says so (0) is left so; one that had young
    collections rarer than `YOUNG` keeps them as rare."""
    gc.set_threshold(found, 10, 10)
    with eased():
        assert gc.get_threshold()[0] == eased_to
    assert gc.get_threshold() == (found, 10, 10)
