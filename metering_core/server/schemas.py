"""Request and answer bodies of the service that are not core models."""

from pydantic import BaseModel, ConfigDict, Field

from metering_core.models import UsageEvent


class UsageBatch(BaseModel):
    """`POST /usage`: events to deliver (at most the service's `max_batch_size`)."""

    model_config = ConfigDict(extra="forbid")
    events: list[UsageEvent] = Field(min_length=1)


class CancelRequest(BaseModel):
    """`DELETE /usage`: ids to cancel, and the event name where the provider needs it."""

    model_config = ConfigDict(extra="forbid")
    event_ids: list[str] = Field(min_length=1)
    event_name: str | None = None


class Health(BaseModel):
    status: str
    provider: str
