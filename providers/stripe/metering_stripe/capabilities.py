"""What Stripe Billing Meters can do, stated without importing the SDK."""

from __future__ import annotations

from datetime import timedelta

from metering_core.interface import Capabilities
from metering_core.models import Aggregation, Window

__all__ = ["CAPABILITIES", "FORMULAS", "MAX_AGE", "MAX_AHEAD", "PROCESSING_DELAY"]

FORMULAS = {Aggregation.SUM: "sum", Aggregation.COUNT: "count", Aggregation.LATEST: "last"}
MAX_AGE, MAX_AHEAD = timedelta(days=35), timedelta(minutes=5)
PROCESSING_DELAY = timedelta(hours=1)
"""Meter events are aggregated asynchronously and event summaries are eventually
consistent (Stripe: usually minutes); an hour is the margin a reconcile waits."""

CAPABILITIES = Capabilities(
    aggregations=frozenset(FORMULAS),
    windows=frozenset({Window.HOUR, Window.DAY, Window.MONTH}),
    max_batch_size=100,
    requires_customer=True,
    group_by=False,
    dimensions=False,
    updatable_meter_fields=frozenset({"display_name"}),
    max_event_age=MAX_AGE,
    max_future_skew=MAX_AHEAD,
    dedupe_window=timedelta(hours=24),
    cancel_window=timedelta(hours=24),
    exact_sums=False,  # aggregated_value is a float
    processing_delay=PROCESSING_DELAY,
)
