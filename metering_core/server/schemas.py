"""Request and answer bodies of the service that are not core models."""

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pydantic
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException

from metering_core.models import (
    MAX_EVENTS_PER_REQUEST,
    Usage,
    UsageEvent,
    UsageRow,
    exact_json,
)

_ROWS = TypeAdapter(list[UsageRow])
ROWS_PER_SLICE = 2_000


class UsageBatch(BaseModel):
    """`POST /usage`: events to deliver (at most the service's `max_batch_size`)."""

    model_config = ConfigDict(extra="forbid")
    events: list[UsageEvent] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


def _json(reference: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{reference}"}}}


def usage_batch_route() -> dict[str, Any]:
    """`POST /usage` reads its body and its `Idempotency-Key` itself (`read_usage_batch`):
    this documents them and the 422 FastAPI would document for them."""
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Names the request: events sent without an id take ids derived from "
        "it, the caller's tenant and their place, so a retried request counts once.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    return {
        "openapi_extra": {
            "requestBody": {"required": True, "content": _json("UsageBatch")},
            "parameters": [key],
        },
        "responses": {
            422: {"description": "Validation Error", "content": _json("HTTPValidationError")}
        },
    }


def read_usage_batch(body: bytes, content_type: str | None) -> UsageBatch:
    """The batch, validated in one pass from the raw JSON (unless a value might not be
    read exactly that way: `exact_json`); an error names each bad field as FastAPI's own
    body validation would (`body.events.3.timestamp`). As FastAPI does, only a JSON
    content type is read (a plain form post from a web page is not), in any encoding
    JSON allows (a UTF-8 byte order mark, UTF-16, UTF-32)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not (
        media == "application/json"
        or (media.startswith("application/") and media.endswith("+json"))
    ):
        raise HTTPException(400, f"Content-Type={content_type!r}: send application/json")
    encoding = json.detect_encoding(body)
    try:
        text = body if encoding == "utf-8" else body.decode(encoding)
        parsed = exact_json(text)
        if parsed is not None:
            return UsageBatch.model_validate(parsed)
        return UsageBatch.model_validate_json(text)
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"not {encoding}: {exc.reason}") from None
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":  # not JSON at all: say where, not what
            raise HTTPException(400, errors[0]["msg"]) from None
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


_BEARER = {"type": "http", "scheme": "bearer"}
_OPEN_ROUTES = frozenset({"/health"})
"""Routes any caller may reach without a key."""


def documented(app: FastAPI, *, bearer: bool) -> Callable[[], dict[str, Any]]:
    """`app.openapi`, with the schemas of the bodies routes read themselves, and the bearer
    key on every route but `/health` (`bearer`: none behind a gateway, whose own
    authorizer is not part of this document). Keys are checked by the one caller
    dependency, which documents nothing itself."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, tags=app.openapi_tags
            )
            batch = UsageBatch.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            models = components.setdefault("schemas", {})
            models.update(batch.pop("$defs", {}))
            models["UsageBatch"] = batch
            if bearer:
                components["securitySchemes"] = {"HTTPBearer": _BEARER}
                for path, operations in schema["paths"].items():
                    if path not in _OPEN_ROUTES:
                        for operation in operations.values():
                            operation["security"] = [{"HTTPBearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


class CancelRequest(BaseModel):
    """`DELETE /usage`: ids to cancel, and the event name where the provider needs it."""

    model_config = ConfigDict(extra="forbid")
    event_ids: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        min_length=1, max_length=MAX_EVENTS_PER_REQUEST
    )
    event_name: str | None = None


class Health(BaseModel):
    """`ok`, or `degraded` (answered 503) for a while after a failure behind the service."""

    status: Literal["ok", "degraded"]
    provider: str
    problem: str | None = None


def usage_json(usage: Usage) -> bytes:
    """`usage` as JSON, its rows serialised a slice at a time: each call holds the GIL only
    briefly, so the event loop keeps answering while a large answer is written."""
    head = usage.model_dump_json(exclude={"rows"}).encode()
    slices = [
        _ROWS.dump_json(usage.rows[offset : offset + ROWS_PER_SLICE])[1:-1]
        for offset in range(0, len(usage.rows), ROWS_PER_SLICE)
    ]
    return head[:-1] + b',"rows":[' + b",".join(part for part in slices if part) + b"]}"
