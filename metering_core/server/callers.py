"""Who is calling: looked up once per request, whichever asks first (the key-first check
when a route reads its body, or the route's dependency), and kept in the request's scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Scope as AsgiScope

from metering_core.keys import Scope
from metering_core.server.auth import Principal
from metering_core.server.service import Service

__all__ = ["Caller", "caller", "identify", "needs"]

_CALLER = "metering.caller"
"""Where a request's scope keeps its caller, once looked up."""


def identify(scope: AsgiScope) -> Principal:
    """The caller of a request (401 without a known key), looked up at most once."""
    principal: Principal | None = scope.get(_CALLER)
    if principal is None:
        shared: Service = scope["app"].state.service
        principal = scope[_CALLER] = shared.gate.identify(scope)
    return principal


async def caller(request: Request) -> Principal:
    """The one dependency that yields the caller (async: FastAPI would run a plain function
    in a worker thread, a hop that costs more than the check)."""
    return identify(request.scope)


Caller = Annotated[Principal, Depends(caller)]


def needs(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency: the caller, who must hold `scope` (403 otherwise)."""

    async def holding(principal: Caller) -> Principal:
        principal.need(scope)
        return principal

    return holding
