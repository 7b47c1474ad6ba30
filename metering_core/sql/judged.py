"""A group of ingests judged by the meters: what goes in, and each caller's answer.

The rules are `rules.py`'s, applied to every caller's events with that caller's rights;
the answers are those the callers would have had one after another, in the group's
order: an id that one caller stored is a duplicate for a later caller in the group.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from metering_core import rules
from metering_core.models import IngestResult, UsageEvent
from metering_core.sql.group_commit import Ingest
from metering_core.sql.ingest import EventMeter
from metering_core.sql.schema import ROLLED_UP

__all__ = ["Judged"]


@dataclass(frozen=True)
class Judged:
    """A group's events judged by `meters` (the meters of their event names, by name)."""

    group: Sequence[Ingest]
    meters: Mapping[str, EventMeter]
    refusals: list[list[str | None]]

    @classmethod
    def of(cls, group: Sequence[Ingest], meters: Mapping[str, EventMeter]) -> Judged:
        refusals = [
            [
                rules.refusal(
                    meters.get(event.event_name), event, lowering_refused=ingest.lowering_refused
                )
                for event in ingest.events
            ]
            for ingest in group
        ]
        return cls(group, meters, refusals)

    def _each(self) -> list[tuple[UsageEvent, str | None]]:
        return [
            (event, reason)
            for ingest, reasons in zip(self.group, self.refusals, strict=True)
            for event, reason in zip(ingest.events, reasons, strict=True)
        ]

    @property
    def rows(self) -> list[tuple[UsageEvent, int]]:
        """The events to store, each with its meter's number, in the group's order."""
        return [
            (event, self.meters[event.event_name].seq)
            for event, reason in self._each()
            if reason is None
        ]

    @property
    def rolled_up(self) -> set[int]:
        """The meters whose events are added to the rollups."""
        return {meter.seq for meter in self.meters.values() if meter.aggregation in ROLLED_UP}

    @property
    def refused_ids(self) -> set[str]:
        """The ids refused: each is still a duplicate if the store knew it before."""
        return {event.id for event, reason in self._each() if reason is not None}

    def answers(self, inserted: Collection[str], known: Collection[str]) -> list[IngestResult]:
        """Each caller's answer, given the ids `inserted` and the refused ids the store
        `known` (read in the same transaction, so they may include the inserted)."""
        stored_before = set(known) - set(inserted)
        answers = []
        for ingest, reasons in zip(self.group, self.refusals, strict=True):
            answer = rules.ingest_verdicts(ingest.events, reasons, inserted, stored_before)
            if len(self.group) > 1:  # what one caller stored, a later one sent again
                stored_before |= set(answer.accepted)
            answers.append(answer)
        return answers
