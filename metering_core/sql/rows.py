"""The store's rows as the library's models, and the transactions that read them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.epoch import from_epoch_micros
from metering_core.models import Customer, Meter

__all__ = ["Transaction", "customer_from_row", "meter_from_row"]

Transaction = Callable[..., AbstractAsyncContextManager[AsyncConnection]]
"""The provider's transaction factory (`writes=False` for reads): what the mirrors'
modules are given, rather than the provider."""


def meter_from_row(row: Any) -> Meter:
    return Meter(
        id=row.id,
        event_name=row.event_name,
        display_name=row.display_name,
        aggregation=row.aggregation,
        dimensions=row.dimensions,
        description=row.description,
        unique_dimension=row.unique_dimension,
        status=row.status,
        created_at=from_epoch_micros(row.created_at),
        updated_at=from_epoch_micros(row.updated_at),
    )


def customer_from_row(row: Any) -> Customer:
    return Customer(id=row.id, name=row.name, email=row.email, metadata=row.metadata)
