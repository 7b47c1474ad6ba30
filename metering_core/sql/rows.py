"""The store's rows as the library's models, and the transactions that read them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.epoch import from_epoch_micros
from metering_core.models import Customer, Meter

__all__ = ["Transaction", "customer_from_row", "meter_from_row", "trusted"]

M = TypeVar("M", bound=BaseModel)

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


def trusted(model: type[M], fields: dict[str, Any]) -> M:
    """A model of the store's own row (validated when it was stored), every field given
    and none to validate: what `model_construct` makes, without its walk over each field's
    aliases and defaults (a quarter of an export's time). Tests hold it equal to the
    validated model."""
    made = model.__new__(model)
    object.__setattr__(made, "__dict__", fields)
    _set_fields_set(made, set(fields))
    _set_extra(made, None)
    _set_private(made, None)
    return made


# BaseModel's slots, set through their descriptors: no lookup by name per model made
_set_fields_set = BaseModel.__pydantic_fields_set__.__set__  # type: ignore[attr-defined]
_set_extra = BaseModel.__pydantic_extra__.__set__  # type: ignore[union-attr]
_set_private = BaseModel.__pydantic_private__.__set__  # type: ignore[union-attr]
