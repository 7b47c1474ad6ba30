"""A route that answers requests itself (`POST /usage`'s) never skips a dependency in
silence: one given to the route is refused as it is added, one its router or the app
inherits fails the app's routes as they are built, never letting a request past it."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response, routing
from fastapi.testclient import TestClient

from metering_core.server.own_handler import OwnHandler

checked: list[str] = []


async def endpoint(request: Request) -> Response:
    return Response("answered")


def guard() -> None:
    checked.append("guard")


def own_route() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/work", endpoint, methods=["POST"], route_class_override=OwnHandler)
    return router


def test_a_dependency_of_the_route_itself_is_refused_as_it_is_added() -> None:
    router = APIRouter()
    with pytest.raises(TypeError, match=r"'/work'.* skip its 1 dependencies"):
        router.add_api_route(
            "/work",
            endpoint,
            methods=["POST"],
            route_class_override=OwnHandler,
            dependencies=[Depends(guard)],
        )


@pytest.mark.parametrize("where", ["router", "app"])
def test_an_inherited_dependency_fails_the_build_rather_than_being_skipped(where: str) -> None:
    """Counted once (the route's context holds its own and the inherited), and failing
    where FastAPI builds included routes: when their list is first read (`create_app`
    reads it), else at the first request."""
    if where == "app":
        app = FastAPI(dependencies=[Depends(guard)])
        app.include_router(own_route())
    else:
        app = FastAPI()
        app.include_router(own_route(), dependencies=[Depends(guard)])
    with pytest.raises(TypeError, match=r"'/work'.* skip its 1 dependencies"):
        list(routing.iter_route_contexts(app.routes))
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/work")
    assert answer.status_code == 500
    assert answer.text != "answered"


def test_with_no_dependency_the_endpoint_answers() -> None:
    app = FastAPI()
    app.include_router(own_route())
    with TestClient(app) as client:
        assert client.post("/work").text == "answered"
