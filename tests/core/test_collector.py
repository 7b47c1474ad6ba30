"""The collector eased while the service, an export or a forwarder runs, and given back
as it was found: to a process embedding any of them, whatever order they stop in."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest

from metering_core import Metering, ValidationError
from metering_core.client import EASED_FROM
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


def _young_collections_while(work: Callable[[], object]) -> list[int]:
    """Each collection of the youngest generation that starts while `work` runs, as the
    number of objects frozen at that moment."""
    frozen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            frozen.append(gc.get_freeze_count())

    gc.callbacks.append(count)
    try:
        work()
    finally:
        gc.callbacks.remove(count)
    return frozen


def _rows(count: int, *, bad_last: bool = False) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"event_name": "api_calls", "customer_id": f"t{i % 10}", "value": i} for i in range(count)
    ]
    if bad_last:
        rows[-1]["value"] = "lots"
    return rows


def test_a_large_batch_is_validated_with_young_collections_eased_and_given_back() -> None:
    """Its models are freed by reference counting; a young collection every 700 of them
    made (CPython's default) cost a large part of a bulk ingest (bench_memory). Nothing
    is frozen: freezing at each call moved the young objects, garbage cycles among them,
    where no collection counts them, and a process making cycles between calls grew
    without bound (found in review: 878 MiB after 3,000 calls). A batch under
    `EASED_FROM` events, and a refused batch, leave the collector as found."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    with Metering(provider="memory") as metering:
        metering.create_meter(event_name="api_calls")
        rows = _rows(EASED_FROM * 5)
        eased_batch = _young_collections_while(lambda: metering.ingest_usage_events(rows))
        small = _rows(EASED_FROM - 1)
        as_found = _young_collections_while(
            lambda: [metering.ingest_usage_events(small) for _ in range(5)]
        )
        assert 0 < len(eased_batch) * 3 < len(as_found)
        assert set(eased_batch) == {0}, "objects were frozen while the batch was validated"
        assert (gc.get_threshold(), gc.get_freeze_count()) == ((700, 10, 10), 0)
        with pytest.raises(ValidationError, match=r"events\[4999\]"):
            metering.ingest_usage_events(_rows(EASED_FROM * 5, bad_last=True))
        assert (gc.get_threshold(), gc.get_freeze_count()) == ((700, 10, 10), 0)
        assert len(metering.flush().accepted) == EASED_FROM * 5 + (EASED_FROM - 1) * 5


def test_a_threshold_set_while_eased_is_kept_when_the_easing_ends() -> None:
    """Another thread of the process set its own (found in review: the easing's end put
    the threshold it had found back over it)."""
    gc.set_threshold(700, 10, 10)
    with eased(freeze=False):
        gc.set_threshold(50_000, 20, 20)
    assert gc.get_threshold() == (50_000, 20, 20)
