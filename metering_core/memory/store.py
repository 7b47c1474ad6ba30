"""Storage of the memory provider: one time-sorted column set per (meter, customer)."""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Generic, TypeVar

from metering_core import rules

__all__ = ["CHUNK", "Column", "DimensionSets", "GroupOf", "Series"]

T = TypeVar("T")
CHUNK = 64


class DimensionSets:
    """Each distinct set of dimensions held once, as a tuple of its pairs, and numbered;
    an event stores the number.

    Events mostly repeat a few sets (a region, a plan): 200k events over three regions
    held 27 MB, against 64 MB with a dict each. Where every event has its own set (a
    trace id) it costs a fifth more than a dict (90 MB against 75). A dict per event is
    also visited by every full collection of the garbage collector; a tuple of strings
    is not tracked."""

    __slots__ = ("_numbers", "pairs")

    def __init__(self) -> None:
        self.pairs: list[tuple[tuple[str, str], ...]] = [()]
        self._numbers: dict[tuple[tuple[str, str], ...], int] = {(): 0}

    def number(self, dimensions: dict[str, str]) -> int:
        if not dimensions:
            return 0
        pairs = tuple(dimensions.items())  # a copy: the caller's dict may change later
        number = self._numbers.get(pairs)
        if number is None:
            number = self._numbers[pairs] = len(self.pairs)
            self.pairs.append(pairs)
        return number


class GroupOf(dict[int, tuple[tuple[str, ...], str | None] | None]):
    """For one query: a dimension set's number -> (the values of the grouped keys, "" where
    absent; the counted dimension's value), or None where the query's filters leave the
    set out; worked out once per set, not once per event."""

    def __init__(
        self,
        sets: DimensionSets,
        keys: Sequence[str],
        counted: str | None,
        filters: Mapping[str, frozenset[str]],
    ) -> None:
        super().__init__()
        self._pairs, self._keys, self._counted = sets.pairs, keys, counted
        self._filters = filters

    def __missing__(self, number: int) -> tuple[tuple[str, ...], str | None] | None:
        dimensions = dict(self._pairs[number])
        found: tuple[tuple[str, ...], str | None] | None = None
        if rules.admits(self._filters, dimensions):
            group = tuple(dimensions.get(key, "") for key in self._keys)
            counted = None if self._counted is None else dimensions.get(self._counted)
            found = (group, counted)
        self[number] = found
        return found


class Column(Generic[T]):
    """An append-only column of objects that the garbage collector does not walk one by one.

    A list of a million ids is visited item by item by every full collection, which
    pauses every thread: with a million stored events (a dimension dict each, lists of
    ids and values) a full collection took 126 ms; about 10 ms now, as with nothing
    stored (bench_memory). Here full runs of `CHUNK` items are sealed into tuples, which
    CPython stops tracking once they hold only untracked objects (strings, Decimals);
    only the last, open chunk is a list."""

    __slots__ = ("_open", "_sealed")

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._sealed: list[tuple[T, ...]] = []
        self._open: list[T] = []
        self.extend(items)

    def append(self, item: T) -> None:
        self._open.append(item)
        if len(self._open) == CHUNK:
            self._sealed.append(tuple(self._open))
            self._open = []

    def extend(self, items: Iterable[T]) -> None:
        self._open.extend(items)
        if len(self._open) >= CHUNK:
            whole = len(self._open) - len(self._open) % CHUNK
            full, self._open = self._open[:whole], self._open[whole:]
            self._sealed.extend(tuple(full[i : i + CHUNK]) for i in range(0, whole, CHUNK))

    def __len__(self) -> int:
        return len(self._sealed) * CHUNK + len(self._open)

    def __iter__(self) -> Iterator[T]:
        return itertools.chain(itertools.chain.from_iterable(self._sealed), self._open)

    def _place(self, position: int) -> tuple[int, int]:
        """(chunk, offset) of a position; positions count from 0, none from the end."""
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} of a column of {len(self)}")
        return divmod(position, CHUNK)

    def __getitem__(self, position: int) -> T:
        chunk, offset = self._place(position)
        return self._sealed[chunk][offset] if chunk < len(self._sealed) else self._open[offset]

    def __setitem__(self, position: int, item: T) -> None:
        chunk, offset = self._place(position)
        if chunk == len(self._sealed):
            self._open[offset] = item
        else:  # rare (a cancellation): the chunk is sealed again with the item replaced
            changed = list(self._sealed[chunk])
            changed[offset] = item
            self._sealed[chunk] = tuple(changed)

    def between(self, start: int, stop: int) -> Iterator[T]:
        """The items at positions start <= position < stop, copying no more than their chunks."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"positions {start} to {stop} of a column of {len(self)}")
        if start == stop:
            return iter(())
        first, last = start // CHUNK, (stop - 1) // CHUNK
        chunks = itertools.chain(
            self._sealed[first : last + 1], (self._open,) if last >= len(self._sealed) else ()
        )
        return itertools.islice(
            itertools.chain.from_iterable(chunks), start - first * CHUNK, stop - first * CHUNK
        )


class Series:
    """The events of one (event name, customer), as parallel columns sorted lazily by time."""

    __slots__ = (
        "cancelled_values",
        "customer_id",
        "dimensions",
        "event_name",
        "ids",
        "ingested",
        "is_sorted",
        "number",
        "times",
        "values",
    )

    def __init__(self, customer_id: str, event_name: str, number: int) -> None:
        self.customer_id = customer_id
        self.event_name = event_name
        self.number = number  # its place in the provider's list of every series
        self.times = array("q")
        self.values: Column[Decimal | None] = Column()  # None marks a cancelled event
        self.dimensions = array("q")  # numbers of `DimensionSets`
        self.ids: Column[str] = Column()
        self.ingested = array("q")  # when each event was stored, epoch microseconds
        self.cancelled_values: dict[str, Decimal] = {}  # a cancelled event's id -> its value
        self.is_sorted = True

    def append(
        self,
        event_id: str,
        micros: int,
        value: Decimal,
        dimensions: int,
        ingested: int,
    ) -> None:
        if self.times and micros < self.times[-1]:
            self.is_sorted = False
        self.times.append(micros)
        self.values.append(value)
        self.dimensions.append(dimensions)
        self.ids.append(event_id)
        self.ingested.append(ingested)

    def ensure_sorted(self) -> None:
        """Sort the columns by time (a time's events are told apart by id where it matters:
        listing and `latest`)."""
        if self.is_sorted:
            return
        by_time = sorted(range(len(self.times)), key=self.times.__getitem__)
        self.times = array("q", (self.times[i] for i in by_time))
        self.dimensions = array("q", (self.dimensions[i] for i in by_time))
        self.ingested = array("q", (self.ingested[i] for i in by_time))
        values, ids = list(self.values), list(self.ids)
        self.values = Column(values[i] for i in by_time)
        self.ids = Column(ids[i] for i in by_time)
        self.is_sorted = True

    def span(self, start: int, end: int) -> range:
        """Positions of the events with start <= time < end."""
        self.ensure_sorted()
        return range(bisect.bisect_left(self.times, start), bisect.bisect_left(self.times, end))

    def positions(self, event_ids: set[str]) -> dict[str, int]:
        """Where the given ids sit, found in one pass: cancellation is rare, so no id index
        is kept, but one request scans each series once, not once per id."""
        return {event_id: i for i, event_id in enumerate(self.ids) if event_id in event_ids}

    def cancel(self, position: int) -> bool:
        """Take an event out of usage; False if it was already cancelled."""
        value = self.values[position]
        if value is None:
            return False
        self.cancelled_values[self.ids[position]] = value
        self.values[position] = None
        return True

    def listed(
        self, start: int, end: int, after: tuple[int, str] | None
    ) -> Iterator[tuple[int, str, Series, int]]:
        """(time, id, series, position) of the events with start <= time < end after the
        key `after`, in (time, id) order: events of one time are sorted by id here, as the
        sql store's index orders them."""
        span = self.span(start, end)
        position = span.start
        if after is not None and after[0] >= start:
            position = max(position, bisect.bisect_left(self.times, after[0]))
        times, ids = self.times, self.ids
        while position < span.stop:
            time, stop = times[position], position + 1
            if stop < span.stop and times[stop] == time:
                stop = bisect.bisect_right(times, time, stop, span.stop)
            for event_id, at in sorted((ids[p], p) for p in range(position, stop)):
                if after is None or (time, event_id) > after:
                    yield time, event_id, self, at
            position = stop
