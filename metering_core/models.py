"""The values that cross the API: meters, usage events, queries, results, customers.

Every model validates on construction and raises `metering_core.ValidationError`, which
names the field and the value, so bad input is refused before anything changes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, localcontext
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, Self, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
import pydantic_core
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from metering_core.errors import MAX_MESSAGE, ValidationError, clip

__all__ = [
    "MAX_EVENTS_PER_REQUEST",
    "MAX_ROWS",
    "MAX_WINDOWS",
    "Aggregation",
    "CancelResult",
    "CellStatus",
    "Customer",
    "CustomerCreate",
    "EventQuery",
    "IngestResult",
    "LinkOutcome",
    "Meter",
    "MeterCreate",
    "MeterUpdate",
    "MirrorLink",
    "MirrorStatus",
    "Page",
    "ReconcileCell",
    "ReconcileReport",
    "RefusalNotice",
    "StoredEvent",
    "Usage",
    "UsageEvent",
    "UsageQuery",
    "UsageRow",
    "Window",
]

SLUG_PATTERN = r"^[a-z0-9_.\-]{1,100}$"
TEXT_PATTERN = r"^[^\x00]*$"
"""Text every store can hold: no NUL (PostgreSQL refuses it, SQLite cuts the text at it).
Matching any pattern also refuses a lone surrogate, which cannot be stored or sent as
UTF-8. Both run in pydantic's core, not per value in Python: events are validated by the
hundred thousand."""

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
"""Timestamps this library accepts: [EARLIEST, LATEST). Far enough for any bill, and near
enough that a window or a time zone shift can never overflow `datetime`."""


_BOUNDS = f"must be from {EARLIEST.isoformat()} to before {LATEST.isoformat()}"
_END_BOUNDS = f"must be from {EARLIEST.isoformat()} to {LATEST.isoformat()} (an end is exclusive)"


def _utc(value: datetime) -> datetime:
    """The same instant in UTC, within [EARLIEST, LATEST). The bounds are checked here,
    not by pydantic's `ge`/`lt`, which ran as two more calls into Python per time. Most
    times are UTC already under another name (pydantic's own for "Z"), and are rebuilt
    with `UTC` field by field: `replace` cost five times as much, and comparing times
    of two different zones calls each zone. Validating a time had been two fifths of
    validating an event."""
    if value.tzinfo is not UTC:
        if value.utcoffset():
            return _from_offset(value)
        value = datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            UTC,
        )
    if not EARLIEST <= value < LATEST:
        raise ValueError(_BOUNDS)
    return value


def _from_offset(value: datetime) -> datetime:
    """`_utc` of a time with an offset. Comparing aware times cannot overflow, so the
    bounds come first and the conversion cannot overflow either; the converted time is
    checked again, as the offset was cut to whole seconds."""
    if not EARLIEST <= value < LATEST:
        raise ValueError(_BOUNDS)
    moment = value.astimezone(UTC)
    if not EARLIEST <= moment < LATEST:
        raise ValueError(_BOUNDS)
    return moment


def _utc_end(value: datetime) -> datetime:
    """`_utc` for the exclusive end of a span: LATEST too, or no query could reach an
    event stamped in the last microsecond accepted (stored, yet never billed or
    exported)."""
    if value == LATEST:
        return LATEST
    try:
        return _utc(value)
    except ValueError:
        raise ValueError(_END_BOUNDS) from None


def _iana_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as "America"
        raise ValueError("must be an IANA time zone name such as 'UTC' or 'Europe/Paris'") from None
    return value


Slug = Annotated[str, Field(pattern=SLUG_PATTERN)]
Text = Annotated[str, Field(pattern=TEXT_PATTERN)]
Identifier = Annotated[str, Field(min_length=1, max_length=100, pattern=TEXT_PATTERN)]


_NUMBER_TEXT = re.compile(r"[-+]?[0-9]+(?:\.[0-9]*)?")
"""Text pydantic reads as seconds or milliseconds since 1970, not as a date."""


def _not_a_number(value: Any) -> Any:
    """A time is an ISO 8601 string (or a datetime), never a bare number: 1700000000 could
    be seconds or milliseconds, and the schema says date-time. Nor is it a number as
    text, which is how a query string or a CSV cell sends it, and which pydantic reads
    as one: "2026" would be 33 minutes past midnight on 1 January 1970."""
    if (isinstance(value, int | float) and not isinstance(value, bool)) or (
        isinstance(value, str) and _NUMBER_TEXT.fullmatch(value)
    ):
        raise ValueError(f"must be an ISO 8601 date-time with an offset, not a number ({value!r})")
    return value


UtcDatetime = Annotated[
    AwareDatetime,
    BeforeValidator(_not_a_number),
    AfterValidator(_utc),
    # the bounds `_utc` checks, stated in the schema as pydantic's ge/lt had stated them
    Field(
        json_schema_extra={
            "ge": EARLIEST.isoformat().replace("+00:00", "Z"),
            "lt": LATEST.isoformat().replace("+00:00", "Z"),
        }
    ),
]
UtcEnd = Annotated[
    AwareDatetime,
    BeforeValidator(_not_a_number),
    AfterValidator(_utc_end),
    Field(
        json_schema_extra={
            "ge": EARLIEST.isoformat().replace("+00:00", "Z"),
            "le": LATEST.isoformat().replace("+00:00", "Z"),
        }
    ),
]
"""The exclusive end of a span of time: up to LATEST itself."""
TimeZoneName = Annotated[str, AfterValidator(_iana_zone)]
EXACT = Context(prec=100)
"""Enough digits for any sum of values of at most 38 digits: no sum is ever rounded."""

FiniteDecimal = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=38, decimal_places=18)]
"""Exact, finite and bounded: 1e999999 is finite but no bill holds it, and a provider
would have to spell it out digit by digit."""


_PATTERN_MESSAGES = {
    SLUG_PATTERN: "must be a slug of 1 to 100 lowercase letters, digits, '_', '.' or '-'",
    TEXT_PATTERN: "holds a NUL character ('\\x00')",
}


def _message(error: Mapping[str, Any]) -> str:
    """pydantic's words, or ours where its own would show a regular expression."""
    if error["type"] == "string_pattern_mismatch":
        return _PATTERN_MESSAGES.get(error.get("ctx", {}).get("pattern"), str(error["msg"]))
    if error["type"] == "string_unicode":
        return "holds text that is not valid Unicode (a lone surrogate)"
    return str(error["msg"]).removeprefix("Value error, ")


def describe_error(error: Mapping[str, Any]) -> tuple[str, str]:
    field = ".".join(str(part) for part in error["loc"]) or "value"
    if error["type"] == "missing":
        return field, f"{field} is required"
    message = _message(error)
    return field, f"{field}={clip(repr(error.get('input')), 200)}: {message}"


def described_errors(errors: list[Any]) -> str:
    """As many errors' descriptions as one message holds (`MAX_MESSAGE`), and how many more
    there were: describing each of a million errors took seconds, only to be cut."""
    texts: list[str] = []
    room = MAX_MESSAGE - 80  # for the caller's prefix and the count of the rest
    for error in errors:
        text = describe_error(error)[1]  # its value already cut to 200 characters
        if texts and len(text) + 2 > room:
            break
        texts.append(text)
        room -= len(text) + 2
    more = len(errors) - len(texts)
    return "; ".join(texts) + (f"; and {more} more" if more else "")


def field_error(field: str, value: Any, message: str) -> pydantic_core.ValidationError:
    """An error a model-wide check raises about one field: it names that field and its
    value, as a field's own check would (not the whole model's input)."""
    error = pydantic_core.PydanticCustomError("invalid", "{message}", {"message": message})
    return pydantic_core.ValidationError.from_exception_data(
        "check", [pydantic_core.InitErrorDetails(type=error, loc=(field,), input=value)]
    )


def validation_error(exc: pydantic.ValidationError, what: str) -> ValidationError:
    """Turn pydantic's error into ours: the first bad field and value lead the message."""
    errors = exc.errors(include_url=False)
    field = describe_error(errors[0])[0] if errors else None
    value = errors[0].get("input") if errors else None
    detail = described_errors(errors)
    return ValidationError(
        f"invalid {what}: {detail}", field=field, value=value, errors=[dict(e) for e in errors]
    )


_INEXACT_VALUE = r'"value"\s*:\s*-?(?:[0-9][0-9.eE+-]{15}|[0-9.]+[eE])'
_INEXACT_VALUE_TEXT = re.compile(_INEXACT_VALUE)
_INEXACT_VALUE_BYTES = re.compile(_INEXACT_VALUE.encode())


def exact_json(data: str | bytes | bytearray) -> Any | None:
    """JSON with its fractional numbers read as `Decimal`, when a float might not carry a
    `"value"` in it exactly; else None. pydantic's one-pass parse reads a JSON number
    through a float (pydantic-core#1688), which keeps 15 significant digits and no more
    (12345678901234567890.5 would be billed as 12345678901234567000) and turns 1e-400
    into 0. So a value of 16 characters or more, or with an exponent, takes this path;
    so does any text with a \\u escape, which could spell the key "value" unseen.
    Not JSON, or JSON that cannot be read exactly (nested past the recursion limit, an
    exponent past Decimal's range), is None too: the one-pass parse reports it."""
    if isinstance(data, str):
        needed = "\\u" in data or _INEXACT_VALUE_TEXT.search(data) is not None
    else:
        needed = b"\\u" in data or _INEXACT_VALUE_BYTES.search(data) is not None
    if not needed:
        return None
    try:
        return json.loads(data, parse_float=Decimal)
    except (ValueError, RecursionError, ArithmeticError):
        return None


class _Model(pydantic.BaseModel):
    """Base that reports bad input as `metering_core.ValidationError`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise validation_error(exc, type(self).__name__) from None

    # Tell pydantic this is still its own __init__: validation (model_validate, nested
    # models) then runs without re-entering it, so errors are wrapped exactly once.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, **kwargs)
        except pydantic.ValidationError as exc:
            raise validation_error(exc, cls.__name__) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        """Parse and validate in one pass (no Python objects for the JSON in between),
        unless a number is too long for that pass to read exactly (`exact_json`)."""
        try:
            parsed = exact_json(json_data)
            if parsed is not None:
                return super().model_validate(parsed, **kwargs)
            return super().model_validate_json(json_data, **kwargs)
        except pydantic.ValidationError as exc:
            raise validation_error(exc, cls.__name__) from None


class Aggregation(StrEnum):
    """How a meter folds the values of its events into one number per window."""

    SUM = "sum"
    COUNT = "count"
    MIN = "min"
    MAX = "max"
    AVG = "avg"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"


class Window(StrEnum):
    """The width of one usage row; `None` in a query means the whole range."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class MeterCreate(_Model):
    """What a caller states to create a meter.

    `unique_dimension` names the dimension whose distinct values a `unique_count`
    meter counts (e.g. `user_id` for monthly active users); other aggregations have none.
    """

    event_name: Slug
    display_name: (
        Annotated[str, Field(min_length=1, max_length=250, pattern=TEXT_PATTERN)] | None
    ) = None
    aggregation: Aggregation = Aggregation.SUM
    dimensions: list[Annotated[str, Field(min_length=1, max_length=100, pattern=TEXT_PATTERN)]] = []
    description: Annotated[str, Field(max_length=1000, pattern=TEXT_PATTERN)] | None = None
    unique_dimension: (
        Annotated[str, Field(min_length=1, max_length=100, pattern=TEXT_PATTERN)] | None
    ) = None

    @model_validator(mode="after")
    def _check_unique_dimension(self) -> Self:
        if self.aggregation is Aggregation.UNIQUE_COUNT and self.unique_dimension is None:
            raise ValueError("unique_count meters need unique_dimension: the dimension to count")
        if self.aggregation is not Aggregation.UNIQUE_COUNT and self.unique_dimension is not None:
            raise ValueError(f"unique_dimension applies to unique_count, not {self.aggregation}")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions has repeats: {self.dimensions!r}")
        return self


class Meter(MeterCreate):
    """A meter as the provider holds it."""

    id: Identifier
    display_name: str
    status: Literal["active", "inactive"] = "active"
    created_at: UtcDatetime
    updated_at: UtcDatetime


class MeterUpdate(_Model):
    """The fields of a meter that may change after creation; at least one must be given."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    display_name: (
        Annotated[str, Field(min_length=1, max_length=250, pattern=TEXT_PATTERN)]
        | SkipJsonSchema[None]
    ) = None
    description: Annotated[str, Field(max_length=1000, pattern=TEXT_PATTERN)] | None = None
    dimensions: (
        list[Annotated[str, Field(min_length=1, max_length=100, pattern=TEXT_PATTERN)]]
        | SkipJsonSchema[None]
    ) = None
    """Not null: a meter always has a list of dimensions (the schema says so too)."""

    @field_validator("dimensions")
    @classmethod
    def _dimensions_given(cls, dimensions: list[str] | None) -> list[str] | None:
        """Runs only for a value sent: a meter always has a list of dimensions ([] for
        none); a null stored on the memory provider broke every later read of the meters."""
        if dimensions is None:
            raise ValueError("cannot be null: send [] for no dimensions")
        return dimensions

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("a meter update needs at least one field to change")
        if "display_name" in self.model_fields_set and self.display_name is None:
            raise ValueError("display_name cannot be cleared (display_name=None)")
        if self.dimensions is not None and len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions has repeats: {self.dimensions!r}")
        return self


def new_event_id() -> str:
    """A UUID version 7 (RFC 9562): milliseconds since 1970, then 12 bits of the
    millisecond's fraction, then 62 random bits. Ids sort by the time they were made in,
    so a store's unique index on them grows at its end instead of at a random page per
    event (random ids cost the SQLite store about half its ingest rate, measured); and
    the ids one process makes only ever increase (RFC 9562's method 3, with a counter
    where the clock does not move on), so that of two events of one `latest` meter sent
    with one timestamp, the one made last counts (`rules.Bucket.add_latest`)."""
    global _last_stamp
    nanos = time.time_ns()
    stamp = (nanos // 1_000_000) << 12 | (nanos % 1_000_000) * 4096 // 1_000_000
    with _stamping:
        stamp = _last_stamp = max(stamp, _last_stamp + 1)
    bits = (stamp >> 12 & (2**48 - 1)) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64 | 0b10 << 62
    text = f"{bits | secrets.randbits(62):032x}"  # uuid.UUID's own text, without its checks
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_stamping = threading.Lock()
_last_stamp = 0
"""The last id's milliseconds and fraction (`new_event_id`): the next is greater, though
the clock stood still or went back."""


def _unlock_in_child() -> None:
    """A child forked while another thread made an id would find the lock held for ever."""
    global _stamping
    _stamping = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_unlock_in_child)


def _now() -> datetime:
    return datetime.now(UTC)


class UsageEvent(_Model):
    """One unit of usage. `id` is the idempotency key: the same id is never counted twice."""

    id: Identifier = Field(default_factory=new_event_id)
    event_name: Slug
    customer_id: Identifier
    value: FiniteDecimal = Decimal(1)
    timestamp: UtcDatetime = Field(default_factory=_now)
    dimensions: dict[Text, Text] = Field(default_factory=dict, fail_fast=True)
    # fail_fast: one error for a bad dimensions object, not one per bad entry (a body
    # of half a million bad entries cost 800 MB of errors). A factory, not `= {}`:
    # pydantic deep-copies a mutable default for every event, half of validating one.


MAX_EVENTS_PER_REQUEST = 10_000
"""The most usage events one request or event-bus message may hold, whatever the
provider's batch size: a body of a million bad items would otherwise cost one validation
error each (gigabytes of memory, minutes of the event loop) before any limit is checked."""

MAX_WINDOWS = 10_000
"""Windows one usage query may span (a year of hours is 8,760): checked before any work."""

MAX_ROWS = 100_000
"""Rows one usage answer may hold (windows x groups); a provider refuses a query past it."""

_WINDOW_WIDTH = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "month": timedelta(days=28),
}


def _check_span(start: datetime, end: datetime) -> None:
    if end <= start:
        raise field_error("end", end.isoformat(), f"must be after start ({start.isoformat()})")


MAX_FILTER_VALUES = 100
"""Values one filter key may list (and customers `customer_ids` may): a query stays one
statement a database plans in microseconds."""
MAX_CUSTOMER_IDS = MAX_FILTER_VALUES

FilterValues = Annotated[tuple[Text, ...], Field(min_length=1, max_length=MAX_FILTER_VALUES)]
Filters = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=100, pattern=TEXT_PATTERN)], FilterValues],
    Field(max_length=20),
]
"""Dimension filters: a key (a dimension of the meter) -> the values it may have."""


class UsageQuery(_Model):
    """What `fetch_usage` asks for: `start` inclusive, `end` exclusive; at most
    `MAX_WINDOWS` windows."""

    meter_id: Identifier
    customer_id: Identifier | None = None
    start: UtcDatetime
    end: UtcEnd
    window: Window | None = None
    group_by: tuple[str, ...] = ()
    tz: TimeZoneName = "UTC"
    filters: Filters = {}
    """Only events whose dimension `key` has one of the listed values, for every key given
    (values OR-ed within a key, keys AND-ed): `{"region": ["eu", "us"]}`."""
    customer_ids: Annotated[tuple[Identifier, ...], Field(max_length=MAX_CUSTOMER_IDS)] = ()
    """Only these customers' events (with `customer_id` too: only customers in both)."""

    @field_validator("window")
    @classmethod
    def _bounded(cls, window: Window | None, info: ValidationInfo) -> Window | None:
        start, end = info.data.get("start"), info.data.get("end")
        if window is None or start is None or end is None:
            return window
        windows = (end - start) // _WINDOW_WIDTH[window.value] + 2  # a bound, never less
        if windows > MAX_WINDOWS:
            raise ValueError(
                f"{start.isoformat()} to {end.isoformat()} spans up to {windows} {window.value} "
                f"windows; at most {MAX_WINDOWS} per query: narrow the range or widen the window"
            )
        return window

    @model_validator(mode="after")
    def _check_range(self) -> Self:
        _check_span(self.start, self.end)
        if len(set(self.group_by)) != len(self.group_by):
            raise field_error("group_by", list(self.group_by), "has repeats")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)


class UsageRow(_Model):
    """The aggregated value of one window (and one group, when grouped)."""

    start: UtcDatetime
    end: UtcEnd
    customer_id: str | None = None
    dimensions: dict[str, str] = {}
    value: Decimal


def too_many_rows(query: UsageQuery) -> ValidationError:
    """The refusal of a query whose answer would pass `MAX_ROWS`."""
    return ValidationError(
        f"the usage of meter {query.meter_id!r} from {query.start.isoformat()} to "
        f"{query.end.isoformat()} by window={query.window} and group_by={list(query.group_by)!r} "
        f"has more than {MAX_ROWS} rows (MAX_ROWS): narrow the range, the windows or the groups",
        field="group_by",
        value=list(query.group_by),
    )


class Usage(_Model):
    """The answer to a usage query, rows ordered by window start then group."""

    meter_id: str
    aggregation: Aggregation
    start: UtcDatetime
    end: UtcEnd
    window: Window | None = None
    rows: list[UsageRow]

    @property
    def total(self) -> Decimal:
        """Sum of the row values, exact; meaningful for sum and count meters."""
        with localcontext(EXACT):
            return sum((row.value for row in self.rows), Decimal(0))


T = TypeVar("T")


class Page(_Model, Generic[T]):
    """One page of a listing; pass `next_cursor` back to get the next page."""

    items: list[T]
    next_cursor: str | None = None


MAX_EVENTS_PER_PAGE = 1000
"""Stored events one page of `list_usage_events` may hold."""

MAX_CURSOR_LENGTH = 1000
"""A page cursor's length: memory's and sql's name an event by its id (up to 100
characters, under 600 once encoded); another provider's are its own."""


class EventQuery(_Model):
    """What `list_usage_events` asks for: one meter's stored events (named by `meter_id`
    or `event_name`) with timestamps in [start, end), oldest first (events of one time by
    id, in code-point order), a page at a time."""

    meter_id: Identifier | None = None
    event_name: Slug | None = None
    customer_id: Identifier | None = None
    start: UtcDatetime
    end: UtcEnd
    filters: Filters = {}
    """As in `UsageQuery`: a dimension -> the values it may have."""
    customer_ids: Annotated[tuple[Identifier, ...], Field(max_length=MAX_CUSTOMER_IDS)] = ()
    """As in `UsageQuery`: only these customers' events (with `customer_id` too: only
    customers in both), so the events behind every number `fetch_usage` gives are listed."""
    include_cancelled: bool = False
    limit: Annotated[int, Field(ge=1, le=MAX_EVENTS_PER_PAGE)] = 100
    cursor: Annotated[str, Field(min_length=1, max_length=MAX_CURSOR_LENGTH)] | None = None

    @model_validator(mode="after")
    def _one_meter(self) -> Self:
        if (self.meter_id is None) == (self.event_name is None):
            raise field_error(
                "meter_id",
                self.meter_id,
                f"name the meter by meter_id or by event_name, one of them "
                f"(event_name={self.event_name!r})",
            )
        _check_span(self.start, self.end)
        return self


class StoredEvent(_Model):
    """A usage event as the provider holds it: what was sent, whether it was cancelled, and
    when it was stored (`None` for events stored before the store kept that)."""

    id: str
    event_name: str
    customer_id: str
    timestamp: UtcDatetime
    value: Decimal
    dimensions: dict[str, str] = {}
    cancelled: bool = False
    ingested_at: UtcDatetime | None = None


class IngestResult(_Model):
    """What became of each delivered event: accepted, a duplicate (success), or rejected."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    # factories, not `= []`: pydantic deep-copies a mutable default for each answer, and
    # the service makes three answers a request
    accepted: list[str] = Field(default_factory=list)
    duplicates: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def merge(self, other: IngestResult) -> IngestResult:
        return IngestResult(
            accepted=[*self.accepted, *other.accepted],
            duplicates=[*self.duplicates, *other.duplicates],
            rejected={**self.rejected, **other.rejected},
        )


class CancelResult(_Model):
    """Per id: cancelled, never seen, or refused with a reason."""

    cancelled: list[str] = []
    not_found: list[str] = []
    rejected: dict[str, str] = {}


class MirrorStatus(_Model):
    """What a mirror of the ledger is still owed."""

    mirror: str
    provider: str
    depth: int
    """Events, cancellations and meter or customer changes not yet delivered to it, nor
    refused by it."""
    oldest_seconds: float | None
    """Age of the oldest of them; None when none waits."""
    dead_letters: int
    """Rows the mirror refused for good (each keeps the mirror's reason)."""
    delivered: int = 0
    """Rows this process's forwarder delivered since it started (a counter: the other
    fields are the store's, shared by every process)."""
    refused: int = 0
    """Rows the mirror refused to this process's forwarder since it started."""
    reported: int = 0
    """Events the mirror reported refusing after it had accepted them (Stripe's error
    reports), in the notices this process received since it started."""
    withheld: int = 0
    """Usage rows this process's forwarder settled without sending, since it started:
    the event was cancelled before it was sent, or its meter deleted and another made
    with its event name (the mirror's meter of that name is the new one's)."""


class RefusalNotice(_Model):
    """A provider's word, after it answered, that it refused events it had accepted
    (Stripe validates meter events later, and reports errors by webhook)."""

    id: str
    """The notice's own id: a notice delivered again (a replay) has the same."""
    kind: str
    error_count: int
    """Events refused in the notice's window, sampled or not."""
    refused: dict[str, str] = {}
    """The sampled event ids, each with the provider's reason."""


class LinkOutcome(StrEnum):
    """What following the ledger did to a meter or a customer on a mirror."""

    linked = "linked"
    """The mirror had it already (a meter: one of the same event name and aggregation)."""
    created = "created"
    updated = "updated"
    deleted = "deleted"
    unchanged = "unchanged"
    refused = "refused"
    """The mirror cannot hold it as the ledger has it (the reason says why)."""


class MirrorLink(_Model):
    """A ledger meter or customer, and its counterpart on a mirror."""

    mirror: str
    kind: Literal["meter", "customer"]
    id: str
    """The ledger's id (a meter's `mtr_…`, a customer's tenant id)."""
    mirror_id: str | None
    """The mirror's id for it; None when it is not (or no longer) there."""
    outcome: LinkOutcome
    reason: str | None = None


class CellStatus(StrEnum):
    """How a mirror's number for one meter, customer and window stands to the ledger's."""

    equal = "equal"
    short = "short"
    """The mirror holds less than the ledger: it would invoice too little."""
    over = "over"
    """The mirror holds more than the ledger: it would invoice too much."""
    pending = "pending"
    """They differ, and the ledger still owes the mirror events of this cell (or a repair
    was sent to it within the last hour, which the mirror may not show yet)."""
    refused = "refused"
    """They differ, and the mirror refused events of this cell (its dead letters): fix the
    cause, then `metering mirror retry`; never repaired (the retry would count twice)."""
    not_comparable = "not_comparable"
    """The mirror cannot answer this query (its windows, aggregations or meters)."""


class ReconcileCell(_Model):
    """One meter, customer and window, as the ledger and a mirror count it."""

    meter_id: str
    event_name: str
    customer_id: str
    start: UtcDatetime
    end: UtcEnd
    ledger: Decimal | None
    mirror: Decimal | None
    status: CellStatus
    repaired: bool = False
    """A repair sent the mirror this cell's difference (it shows on the next reconcile)."""


class ReconcileReport(_Model):
    """Whether a mirror holds what the ledger holds: `ok` when no cell is short, over or
    refused (pending and not comparable cells are listed, and are not drift)."""

    mirror: str
    ok: bool
    cells: list[ReconcileCell]


class CustomerCreate(_Model):
    """A tenant to register with the provider; `id` is the SaaS tenant id."""

    id: Identifier
    name: Annotated[str, Field(max_length=256, pattern=TEXT_PATTERN)] | None = None
    email: Annotated[str, Field(max_length=512, pattern=TEXT_PATTERN)] | None = None
    metadata: dict[Text, Text] = {}


class Customer(CustomerCreate):
    """A registered tenant; `provider_ref` is the provider's own id (Stripe's `cus_…`)."""

    provider_ref: str | None = None
