"""The provider contract: `IMetering` (what a provider is), `BaseProvider` (defaults for
plugin authors) and `Capabilities` (what a provider can do, stated up front)."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from metering_core.errors import UnsupportedOperationError
from metering_core.models import (
    Aggregation,
    CancelResult,
    Customer,
    CustomerCreate,
    EventQuery,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    MirrorLink,
    MirrorStatus,
    Page,
    ReconcileReport,
    RefusalNotice,
    StoredEvent,
    Usage,
    UsageEvent,
    UsageQuery,
    Window,
)

if TYPE_CHECKING:
    from metering_core.config import MeteringSettings

__all__ = [
    "CALENDAR_WINDOWS",
    "SHARED_OPERATIONS",
    "BaseProvider",
    "Capabilities",
    "DeliversOnItsOwn",
    "IMetering",
    "Ledger",
    "Operation",
    "ReportsRefusals",
]


class Operation(StrEnum):
    """The ten operations of the IMetering interface, and the listing of stored events."""

    CREATE_METER = "create_meter"
    FETCH_METER = "fetch_meter"
    FETCH_ALL_METERS = "fetch_all_meters"
    UPDATE_METER = "update_meter"
    DELETE_METER = "delete_meter"
    INGEST_USAGE_EVENTS = "ingest_usage_events"
    FETCH_USAGE = "fetch_usage"
    CANCEL_USAGE_EVENTS = "cancel_usage_events"
    CREATE_CUSTOMER = "create_customer"
    DELETE_CUSTOMER = "delete_customer"
    LIST_USAGE_EVENTS = "list_usage_events"


SHARED_OPERATIONS = frozenset(Operation) - {Operation.LIST_USAGE_EVENTS}
"""What a provider states by default: the ten operations of IMetering. Listing stored
events is stated by the providers that keep them."""
CALENDAR_WINDOWS = frozenset({Window.HOUR, Window.DAY, Window.MONTH})
"""The windows a provider states by default; minute windows are stated where kept."""


class Capabilities(BaseModel):
    """What a provider can do. The facade checks these before it calls, so an unsupported
    request fails fast with a message that says what the provider lacks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operations: frozenset[Operation] = SHARED_OPERATIONS
    aggregations: frozenset[Aggregation] = frozenset(Aggregation)
    windows: frozenset[Window] = CALENDAR_WINDOWS
    max_batch_size: int = Field(default=1000, ge=1)
    requires_customer: bool = False
    """`fetch_usage` needs `customer_id`."""
    group_by: bool = True
    filters: bool = False
    """`fetch_usage` and `list_usage_events` take `filters` and `customer_ids`: a provider
    that would ignore them must not state it (an unfiltered answer would be billed)."""
    dimensions: bool = True
    """Meters may declare dimensions and events' dimensions are kept."""
    updatable_meter_fields: frozenset[str] = frozenset(
        {"display_name", "description", "dimensions"}
    )
    max_event_age: timedelta | None = None
    """The oldest event timestamp accepted, as an age; `None` means no limit."""
    max_future_skew: timedelta | None = None
    """How far ahead of now an event timestamp may be; `None` means no limit."""
    dedupe_window: timedelta | None = None
    """How long the provider remembers an event id, to answer duplicate when it comes
    again; `None` means always. Past it, an id sent again counts again (Stripe: 24 h)."""
    cancel_window: timedelta | None = None
    """How long after delivery an event can still be cancelled; `None` means always."""
    refuses_lowering: bool = False
    """`ingest_usage_events(..., lowering_refused=True)` works: the provider refuses, as
    it stores them, events of meters whose usage an event can lower (for callers that may
    only raise usage: a tenant's own key)."""
    exact_sums: bool = True
    """Its sums are exact decimals. False for a provider that sums in binary floating
    point (Stripe): a sum of many fractional values differs from the exact one in about
    its fifteenth significant digit, more as events add up, and reconcile compares its
    sums to the ledger's within a billionth (`reconcile.FLOAT_SUM_AGREEMENT`)."""
    processing_delay: timedelta | None = None
    """How long after accepting an event its usage may not show it yet (Stripe aggregates
    asynchronously); `None`: at once. A ledger's reconcile holds a cell `pending` while
    events of its window were delivered within it, and repairs it only after: a repair
    sent meanwhile would be billed beside the events still being processed."""

    def supports(self, operation: Operation | str) -> bool:
        return Operation(operation) in self.operations


@runtime_checkable
class IMetering(Protocol):
    """The provider contract, stated once: what every provider implements. All operations
    are async and ingestion is batched; nothing here blocks. The facade checks the
    provider's capabilities before it calls,
    so a provider receives only requests its capabilities allow, and contains only the
    translation to its backend. Subclass `BaseProvider` for the defaults."""

    @property
    def name(self) -> str:
        """The provider's registered name, used in every message about it."""
        ...

    async def load_capabilities(self) -> Capabilities:
        """What the provider can do, asking its backend if it must. The facade asks once and
        keeps the answer (`CapabilityCache`); a provider need not cache it again."""
        ...

    @abc.abstractmethod
    async def create_meter(self, meter: MeterCreate) -> Meter:
        """Create a meter; `ConflictError` if its event name has one already."""

    @abc.abstractmethod
    async def fetch_meter(self, meter_id: str) -> Meter:
        """One meter; `NotFoundError` if there is none with that id."""

    @abc.abstractmethod
    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        """One page of meters, in a stable order; `next_cursor` is None on the last."""

    async def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        """Change the fields set in `update` (optional operation)."""
        ...

    async def delete_meter(self, meter_id: str) -> None:
        """Delete a meter; its events stop counting (optional operation)."""
        ...

    async def ingest_usage_events(
        self, events: Sequence[UsageEvent], *, lowering_refused: bool = False
    ) -> IngestResult:
        """Deliver events; the result accounts for every event exactly once: accepted,
        duplicate (an id seen before: success) or rejected with the reason. With
        `lowering_refused` (only where `capabilities.refuses_lowering`), events of meters
        whose usage an event can lower are rejected, judged as they are stored."""
        ...

    @abc.abstractmethod
    async def fetch_usage(self, query: UsageQuery) -> Usage:
        """Aggregated usage of one meter over [start, end), by window and group."""

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        """Cancel delivered events; a verdict per id (optional operation)."""
        ...

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        """One page of a meter's stored events, oldest first; `next_cursor` is None on
        the last (optional operation)."""
        ...

    async def create_customer(self, customer: CustomerCreate) -> Customer:
        """Register a tenant (optional operation); the same fields again return it."""
        ...

    async def delete_customer(self, customer_id: str) -> None:
        """Remove a tenant (optional operation)."""
        ...

    async def aclose(self) -> None:
        """Release connections; called once by the facade's `close()`."""
        ...


class BaseProvider(IMetering):
    """Defaults for plugin authors, on the contract above: optional operations raise
    `UnsupportedOperationError`, `ingest_usage_events` chunks to the capabilities'
    `max_batch_size` and calls `ingest_batch`, `aclose` does nothing."""

    name: ClassVar[str]  # a class constant satisfies the contract's property
    default_capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, at import, a provider still stating capabilities the way the contract
        no longer reads (a `capabilities` property): ignored, it would receive batches
        larger than it takes and operations it declared unsupported."""
        super().__init_subclass__(**kwargs)
        if "capabilities" in vars(cls):
            raise TypeError(
                f"{cls.__qualname__} defines `capabilities`, which the provider contract no "
                "longer reads: set `default_capabilities`, or override `known_capabilities()` "
                "(known without I/O) or `async load_capabilities()` (asked of a backend)"
            )

    def known_capabilities(self) -> Capabilities | None:
        """What the provider can do when it knows without I/O (from its settings); None
        when only its backend can say (`load_capabilities` asks it). Never blocks. By
        default `default_capabilities`, unless `load_capabilities` is overridden (then
        only it can say)."""
        if type(self).load_capabilities is not BaseProvider.load_capabilities:
            return None
        return self.default_capabilities

    async def load_capabilities(self) -> Capabilities:
        """`known_capabilities()`; override when they come from the backend (the HTTP
        provider's)."""
        return self.known_capabilities() or self.default_capabilities

    def unsupported(
        self, operation: Operation, detail: str | None = None
    ) -> UnsupportedOperationError:
        return UnsupportedOperationError(self.name, operation.value, detail)

    async def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        raise self.unsupported(Operation.UPDATE_METER)

    async def delete_meter(self, meter_id: str) -> None:
        raise self.unsupported(Operation.DELETE_METER)

    async def ingest_usage_events(
        self, events: Sequence[UsageEvent], *, lowering_refused: bool = False
    ) -> IngestResult:
        capabilities = await self.load_capabilities()
        if lowering_refused and not capabilities.refuses_lowering:
            raise self.unsupported(
                Operation.INGEST_USAGE_EVENTS, "it cannot refuse events that lower usage"
            )
        size = capabilities.max_batch_size
        result = IngestResult()
        for offset in range(0, len(events), size):
            chunk = events[offset : offset + size]
            answer = await (
                self.ingest_batch_raising_only(chunk)
                if lowering_refused
                else self.ingest_batch(chunk)
            )
            result = answer if offset == 0 else result.merge(answer)
        return result

    @abc.abstractmethod
    async def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        """Deliver at most `max_batch_size` events; report every id in the result."""

    async def ingest_batch_raising_only(self, events: Sequence[UsageEvent]) -> IngestResult:
        """`ingest_batch`, refusing, as it stores them, events of meters whose usage an
        event can lower; implement it (and state `refuses_lowering`) where the store can."""
        raise self.unsupported(
            Operation.INGEST_USAGE_EVENTS, "it cannot refuse events that lower usage"
        )

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        raise self.unsupported(Operation.CANCEL_USAGE_EVENTS)

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        raise self.unsupported(Operation.LIST_USAGE_EVENTS)

    async def create_customer(self, customer: CustomerCreate) -> Customer:
        raise self.unsupported(Operation.CREATE_CUSTOMER)

    async def delete_customer(self, customer_id: str) -> None:
        raise self.unsupported(Operation.DELETE_CUSTOMER)

    async def aclose(self) -> None:
        return None


@runtime_checkable
class Ledger(Protocol):
    """A provider that keeps the ledger and feeds mirrors from it (the sql provider)."""

    @property
    def mirrored(self) -> bool:
        """Whether any mirror is configured."""

    async def mirror_status(self) -> list[MirrorStatus]: ...

    async def flush_mirrors(self, timeout: float | None = None) -> list[MirrorStatus]: ...

    async def forward_mirrors(self) -> None:
        """Forward what the mirrors are owed until cancelled."""

    async def reconcile(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime,
        window: Window = Window.DAY,
        meter_ids: Sequence[str] | None = None,
        repair: bool = False,
    ) -> ReconcileReport: ...

    async def link_mirror(self, mirror: str) -> list[MirrorLink]: ...

    async def backfill_mirror(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime | None = None,
        mirror_added: datetime | None = None,
    ) -> int: ...

    async def retry_mirror_dead_letters(self, mirror: str) -> int: ...

    async def receive_notice(self, source: str, body: bytes, headers: Mapping[str, str]) -> int:
        """Record a notice a mirror of provider `source` sent (a webhook): the sampled
        events it refused become its dead letters; the number recorded (0 for a replay,
        or a notice of another kind). `ValidationError` when no mirror of that provider
        can verify it, `NotFoundError` when the ledger has none, or none with a secret
        to verify it by."""


@runtime_checkable
class DeliversOnItsOwn(Protocol):
    """A provider that delivers on its own (a ledger's forwarder), under the library's
    settings it is given. Apart from `Ledger`, so that a ledger written without it is
    still one."""

    def deliver_with(self, settings: MeteringSettings) -> None:
        """Deliver under `settings` (attempts, backoff, timeout): the facade's, as its
        pipeline's, wherever they were set."""


@runtime_checkable
class ReportsRefusals(Protocol):
    """A provider that tells later, by webhook, of events it refused after accepting."""

    async def read_refusal_notice(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        recorded: Callable[[str], Awaitable[bool]] | None = None,
    ) -> RefusalNotice | None:
        """Verify and read a notice (`headers` with lower-case names); None when it is
        authentic but not about refused events, or when `recorded(its id)` says it was
        read before (a replay: nothing fetched, nothing changed). `ValidationError` when
        not authentic; one naming `field="body"` when authentic (this provider's) but not
        a notice it reads."""
