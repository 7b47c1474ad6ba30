"""Query parameters a route does not declare are refused (422, naming the parameter), as
unknown body fields are: a misspelt `?customer=acme` would otherwise be ignored, and the
answer would silently cover every customer. On a route that needs a key the caller is
known first: a request without one is answered 401, whatever its query says."""

from __future__ import annotations

import typing
from typing import Any

from fastapi import Request

from metering_core.client import AsyncMetering
from metering_core.errors import NotFoundError, ValidationError
from metering_core.filters import parse_filters as filters_from_text
from metering_core.models import Meter
from metering_core.server.callers import caller, identify

__all__ = [
    "FILTER_PATTERN",
    "find_meter",
    "known_query_only",
    "parse_filters",
    "refuse_unknown_query",
]

FILTER_PATTERN = r"^[^:\x00]{1,100}:[^\x00]*$"
"""`key:value`: a dimension's key (no ':'), then its value (any text)."""


def refuse_unknown_query(
    request: Request,
    known: frozenset[str] = frozenset(),
    repeatable: frozenset[str] = frozenset(),
) -> None:
    """Refuse a parameter the route does not declare, and one given twice that takes one
    value (`?customer_id=acme&customer_id=globex` answered for the last alone: probe)."""
    if not request.scope.get("query_string"):
        return  # none at all, as on nearly every `POST /usage`: nothing to parse
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        declared = ", ".join(sorted(known)) or "none"
        raise ValidationError(
            f"unknown query parameter {unknown[0]!r} (this route takes: {declared})",
            field=unknown[0],
            value=request.query_params[unknown[0]],
        )
    for name in sorted(set(request.query_params) - repeatable):
        given = request.query_params.getlist(name)
        if len(given) > 1:
            raise ValidationError(
                f"query parameter {name!r} given {len(given)} times: it takes one value",
                field=name,
                value=given,
            )


def _takes_many(annotation: Any) -> bool:
    """Whether a parameter's type is a list (`filter=…&filter=…`), through Optional."""
    if typing.get_origin(annotation) is list:
        return True
    return any(_takes_many(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def _needs_caller(dependant: Any) -> bool:
    """Whether a route (through its dependencies) asks who is calling."""
    return dependant.call is caller or any(_needs_caller(sub) for sub in dependant.dependencies)


def _declared(dependant: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameters a route (its dependencies included) declares, and those of
    them that take several values."""
    names = {param.alias for param in dependant.query_params}
    many = {
        param.alias for param in dependant.query_params if _takes_many(param.field_info.annotation)
    }
    for sub in dependant.dependencies:
        more, repeatable = _declared(sub)
        names |= more
        many |= repeatable
    return frozenset(names), frozenset(many)


async def known_query_only(request: Request) -> None:
    """A dependency: the request's query names only parameters its route declares, each
    once unless it takes several (worked out once per route, and kept on it); on a route
    that needs a key, asked after the key (a 422 would tell a caller without one what
    the route takes)."""
    route = request.scope.get("route")
    checks: tuple[bool, frozenset[str], frozenset[str]] | None = getattr(
        route, "metering_query", None
    )
    if checks is None:
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            checks = (False, frozenset(), frozenset())
        else:
            checks = (_needs_caller(dependant), *_declared(dependant))
        if route is not None:
            route.metering_query = checks
    keyed, known, repeatable = checks
    if keyed:
        identify(request.scope)
    refuse_unknown_query(request, known, repeatable)


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
