"""The store's rows as the library's models, and the transactions that read them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.epoch import from_epoch_micros
from metering_core.models import Customer, Meter

__all__ = ["Transaction", "Trusted", "customer_from_row", "meter_from_row"]

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


class Trusted(Generic[M]):
    """Models of the store's own rows (validated when they were stored), every field
    given and none to validate: what `model_construct` makes, without its walk over each
    field's aliases and defaults (a quarter of an export's time). For one frozen model:
    its instances share one set of the fields given, which a frozen model never changes
    (pydantic's copies copy it); a set each was a seventh of making one. Tests hold each
    equal to the validated model."""

    def __init__(self, model: type[M]) -> None:
        if not model.model_config.get("frozen"):
            raise TypeError(f"{model.__name__} is not frozen: its fields set could change")
        self._model = model
        self._fields_set = set(model.model_fields)

    def __call__(self, fields: dict[str, Any]) -> M:
        made = self._model.__new__(self._model)
        object.__setattr__(made, "__dict__", fields)
        _set_fields_set(made, self._fields_set)
        _set_extra(made, None)
        _set_private(made, None)
        return made


# BaseModel's slots, set through their descriptors: no lookup by name per model made
_set_fields_set = BaseModel.__pydantic_fields_set__.__set__  # type: ignore[attr-defined]
_set_extra = BaseModel.__pydantic_extra__.__set__  # type: ignore[union-attr]
_set_private = BaseModel.__pydantic_private__.__set__  # type: ignore[union-attr]
