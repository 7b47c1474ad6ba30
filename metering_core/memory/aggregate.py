"""Folding the events of one window and group into one value, per aggregation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

from metering_core.models import EXACT, Aggregation

__all__ = ["Bucket", "fold"]


@dataclass
class Bucket:
    """The events of one (window, group): values in time order, and what some folds need."""

    values: list[Decimal] = field(default_factory=list)
    latest: tuple[int, int, Decimal] | None = None
    distinct: set[str] = field(default_factory=set)

    def add_latest(self, micros: int, order: int, value: Decimal) -> None:
        """Keep the value with the greatest time; a tie goes to the one ingested last."""
        if self.latest is None or (micros, order) > self.latest[:2]:
            self.latest = (micros, order, value)


def _sum(bucket: Bucket) -> Decimal:
    with localcontext(EXACT):
        return sum(bucket.values, Decimal(0))


def _avg(bucket: Bucket) -> Decimal:
    return _sum(bucket) / len(bucket.values)


def _latest(bucket: Bucket) -> Decimal:
    assert bucket.latest is not None
    return bucket.latest[2]


FOLDS: dict[Aggregation, Callable[[Bucket], Decimal]] = {
    Aggregation.SUM: _sum,
    Aggregation.COUNT: lambda bucket: Decimal(len(bucket.values)),
    Aggregation.MIN: lambda bucket: min(bucket.values),
    Aggregation.MAX: lambda bucket: max(bucket.values),
    Aggregation.AVG: _avg,
    Aggregation.LATEST: _latest,
    Aggregation.UNIQUE_COUNT: lambda bucket: Decimal(len(bucket.distinct)),
}


def fold(aggregation: Aggregation, bucket: Bucket) -> Decimal:
    return FOLDS[aggregation](bucket)
