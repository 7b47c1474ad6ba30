"""AWS Lambda entry points.

`event_handler` is the EventBridge entry point of the event-triggered functions
(ingestion, onboarding, offboarding). One `Metering` is built from configuration (the
environment) per warm container; usage is flushed before the handler returns, because
Lambda may freeze the process right after, and a rejected event fails the invocation so
the bus retries or dead-letters it (event ids make the retry harmless).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metering_core.client import Metering
from metering_core.errors import ValidationError
from metering_core.models import Customer

__all__ = ["event_handler", "lambda_handler"]

_metering: Metering | None = None


def _container_metering() -> Metering:
    global _metering
    if _metering is None:
        _metering = Metering()
    return _metering


def event_handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """Handle one EventBridge (or CloudEvent) message; answer what was done."""
    metering = _container_metering()
    outcome = metering.handle_event(event)
    report = metering.flush()
    if report.rejected:
        raise ValidationError(
            f"rejected usage events: {report.rejected}", field="detail", value=list(report.rejected)
        )
    if isinstance(outcome, list):
        return {"ingested": outcome, "duplicates": report.duplicates}
    return {"ok": True, "customer": outcome.id if isinstance(outcome, Customer) else None}


lambda_handler = event_handler
"""The entry point's earlier name (it lived in `metering_core.events`)."""
