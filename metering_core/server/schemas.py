"""Request and answer bodies of the service that are not core models."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from metering_core.models import Usage, UsageEvent, UsageRow

_ROWS = TypeAdapter(list[UsageRow])
ROWS_PER_SLICE = 2_000


class UsageBatch(BaseModel):
    """`POST /usage`: events to deliver (at most the service's `max_batch_size`)."""

    model_config = ConfigDict(extra="forbid")
    events: list[UsageEvent] = Field(min_length=1)


class CancelRequest(BaseModel):
    """`DELETE /usage`: ids to cancel, and the event name where the provider needs it."""

    model_config = ConfigDict(extra="forbid")
    event_ids: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1)
    event_name: str | None = None


class Health(BaseModel):
    status: str
    provider: str


def usage_json(usage: Usage) -> bytes:
    """`usage` as JSON, its rows serialised a slice at a time: each call holds the GIL only
    briefly, so the event loop keeps answering while a large answer is written."""
    head = usage.model_dump_json(exclude={"rows"}).encode()
    slices = [
        _ROWS.dump_json(usage.rows[offset : offset + ROWS_PER_SLICE])[1:-1]
        for offset in range(0, len(usage.rows), ROWS_PER_SLICE)
    ]
    return head[:-1] + b',"rows":[' + b",".join(part for part in slices if part) + b"]}"
