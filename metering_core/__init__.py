"""metering-core: one Python API for usage metering, routed to the configured provider."""

from metering_core.client import AsyncMetering, Metering
from metering_core.config import MeteringSettings, ProviderSettings
from metering_core.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderNotFoundError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
    UnsupportedOperationError,
    ValidationError,
)
from metering_core.hookspecs import hookimpl
from metering_core.interface import BaseProvider, Capabilities, IMetering, Operation
from metering_core.keys import ApiKey
from metering_core.models import (
    Aggregation,
    CancelResult,
    Customer,
    CustomerCreate,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    Page,
    Usage,
    UsageEvent,
    UsageQuery,
    UsageRow,
    Window,
)
from metering_core.plugins import ProviderSpec, providers, register_plugin
from metering_core.spool import DeadLetter

__all__ = [
    "Aggregation",
    "ApiKey",
    "AsyncMetering",
    "AuthenticationError",
    "BaseProvider",
    "CancelResult",
    "Capabilities",
    "ConfigurationError",
    "ConflictError",
    "Customer",
    "CustomerCreate",
    "DeadLetter",
    "IMetering",
    "IngestResult",
    "Meter",
    "MeterCreate",
    "MeterUpdate",
    "Metering",
    "MeteringError",
    "MeteringSettings",
    "NotFoundError",
    "Operation",
    "Page",
    "ProviderError",
    "ProviderNotFoundError",
    "ProviderSettings",
    "ProviderSpec",
    "ProviderUnavailableError",
    "QueueFullError",
    "RateLimitedError",
    "UnsupportedOperationError",
    "Usage",
    "UsageEvent",
    "UsageQuery",
    "UsageRow",
    "ValidationError",
    "Window",
    "hookimpl",
    "providers",
    "register_plugin",
]
