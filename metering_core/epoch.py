"""Instants as integer microseconds since 1970 (UTC), how the stores keep and compare
time: exact, with no float rounding, and ordered as the instants are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["epoch_micros", "from_epoch_micros"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch, exact (floored before 1970)."""
    return (moment - _EPOCH) // _MICROSECOND


def from_epoch_micros(micros: int) -> datetime:
    """The UTC instant `micros` microseconds after the epoch."""
    return _EPOCH + timedelta(0, 0, micros)  # positional: a third faster than by keyword
