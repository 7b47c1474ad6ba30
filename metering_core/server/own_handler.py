"""A route whose endpoint answers the request itself: documented like any other, run
without FastAPI's per-request machinery."""

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response, routing
from fastapi.routing import APIRoute

__all__ = ["OwnHandler"]


class OwnHandler(APIRoute):
    """For the hot path (`POST /usage`): the endpoint takes the `Request` and returns the
    `Response`, reading and checking what it needs itself, so FastAPI solves no
    dependencies and renders no response model for it (measured: a tenth of a one-event
    request's time). The route's declared models and OpenAPI extras still document it;
    errors it raises reach the app's handlers as any route's do. A dependency given to
    it, its router or the app would never run: refused when the route is built (for an
    included route, FastAPI builds it when the app's routes are first read)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # FastAPI builds an included route's handler with the dependencies it inherits
        # (its routers' and the app's) in this context; the route's own are on it.
        # (the context is this route's only if it names this route as its original)
        including = getattr(routing, "_effective_route_context_var", None)
        effective = including.get() if including is not None else None
        if getattr(effective, "original_route", None) is not self:
            effective = None
        dependencies = self.dependencies if effective is None else effective.dependencies
        if dependencies:
            raise TypeError(
                f"route {self.path!r} answers requests itself and would skip its "
                f"{len(dependencies)} dependencies: check them in the endpoint"
            )
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint
