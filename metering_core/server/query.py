"""Query parameters a route does not declare are refused (422, naming the parameter), as
unknown body fields are: a misspelt `?customer=acme` would otherwise be ignored, and the
answer would silently cover every customer."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from metering_core.errors import ValidationError

__all__ = ["known_query_only", "refuse_unknown_query"]


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
