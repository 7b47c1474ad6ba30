"""Query parameters a route does not declare are refused (422, naming the parameter), as
unknown body fields are: a misspelt `?customer=acme` would otherwise be ignored, and the
answer would silently cover every customer."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from metering_core.client import AsyncMetering
from metering_core.errors import NotFoundError, ValidationError
from metering_core.filters import parse_filters as filters_from_text
from metering_core.models import Meter

__all__ = [
    "FILTER_PATTERN",
    "find_meter",
    "known_query_only",
    "parse_filters",
    "refuse_unknown_query",
]

FILTER_PATTERN = r"^[^:\x00]{1,100}:[^\x00]*$"
"""`key:value`: a dimension's key (no ':'), then its value (any text)."""


def refuse_unknown_query(request: Request, known: frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        declared = ", ".join(sorted(known)) or "none"
        raise ValidationError(
            f"unknown query parameter {unknown[0]!r} (this route takes: {declared})",
            field=unknown[0],
            value=request.query_params[unknown[0]],
        )


def _declared(dependant: Any) -> frozenset[str]:
    """The query parameters a route (its dependencies included) declares."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared(sub)
    return frozenset(names)


async def known_query_only(request: Request) -> None:
    """A dependency: the request's query names only parameters its route declares
    (worked out once per route, and kept on it)."""
    route = request.scope.get("route")
    known: frozenset[str] | None = getattr(route, "metering_query", None)
    if known is None:
        dependant = getattr(route, "dependant", None)
        known = _declared(dependant) if dependant is not None else frozenset()
        if route is not None:
            route.metering_query = known
    refuse_unknown_query(request, known)


def parse_filters(given: list[str] | None) -> dict[str, list[str]]:
    """`filter=region:eu&filter=plan:pro` as `{"region": ["eu"], "plan": ["pro"]}`."""
    return filters_from_text(given, ":", "filter")


async def find_meter(
    metering: AsyncMetering, meter_id: str | None, event_name: str | None
) -> Meter:
    """The meter a listing names by id or by event name (exactly one of them)."""
    if (meter_id is None) == (event_name is None):
        raise ValidationError(
            f"name the meter by meter_id or by event_name, one of them "
            f"(meter_id={meter_id!r}, event_name={event_name!r})",
            field="meter_id",
            value=meter_id,
        )
    if meter_id is not None:
        return await metering.fetch_meter(meter_id)
    async for meter in metering.iter_meters():
        if meter.event_name == event_name:
            return meter
    raise NotFoundError(f"no meter for event_name={event_name!r}")
