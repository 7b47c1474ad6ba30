"""Request and answer bodies of the service that are not core models."""

import json
from collections.abc import Callable
from typing import Any, Literal

import pydantic
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException

from metering_core.models import (
    MAX_EVENTS_PER_REQUEST,
    Identifier,
    Slug,
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
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
        }
    },
}
_ERRORS = {
    "400": "The provider does not support this (`unsupported_operation`)",
    "401": "No key, or an unknown one (`unauthorized`)",
    "403": "The key may not do this (`forbidden`)",
    "404": "No such route, meter or customer (`not_found`)",
    "405": "The route does not take this method (`Allow` lists those it takes)",
    "409": "It exists already, with other fields (`conflict`)",
    "413": "The body is over the service's limit (`validation_error`, field `body`)",
    "422": "Bad input, naming the field (`validation_error`)",
    "429": "The provider behind the service asks to slow down (`rate_limited`)",
    "500": "A bug, logged with its traceback (`internal_error`)",
    "503": "A failure behind the service, to retry after `Retry-After` seconds",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}
_OPEN_ROUTES = frozenset({"/health", "/webhooks/{source}"})
"""Routes any caller may reach without a key (a webhook is signed by its provider)."""


def documented(app: FastAPI, *, bearer: bool) -> Callable[[], dict[str, Any]]:
    """`app.openapi`, with the schemas of the bodies routes read themselves, and the bearer
    key on every route but `/health` and the webhooks (`bearer`: none behind a gateway, whose own
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
            _document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _document_errors(schema: dict[str, Any]) -> None:
    """Every status the service answers, each in the one error shape (FastAPI documents
    only 422, in its own shape, which the service never answers)."""
    schema["components"]["schemas"]["Error"] = _ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            statuses = ["404", "405", "413", "422", "500"]
            if path not in _OPEN_ROUTES:
                statuses += ["400", "401", "403", "409", "429", "503"]
            elif path.startswith("/webhooks/"):
                statuses += ["400", "503"]
            for status in statuses:
                response: dict[str, Any] = {"description": _ERRORS[status], "content": body}
                if status in ("429", "503"):
                    response["headers"] = _RETRY_AFTER
                if status == "405":
                    response["headers"] = {"Allow": {"schema": {"type": "string"}}}
                responses[status] = response


class CancelRequest(BaseModel):
    """`DELETE /usage`: ids to cancel, and the event name where the provider needs it."""

    model_config = ConfigDict(extra="forbid")
    event_ids: list[Identifier] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)
    event_name: Slug | None = None


class Health(BaseModel):
    """`ok`, or `degraded` (answered 503) for a while after a failure behind the service."""

    status: Literal["ok", "degraded"]
    provider: str
    problem: str | None = None


class NoticeAnswer(BaseModel):
    """A notice received: how many of its sampled events became mirror dead letters (0
    for a notice received before, or of another kind)."""

    recorded: int


def usage_json(usage: Usage) -> bytes:
    """`usage` as JSON, its rows serialised a slice at a time: each call holds the GIL only
    briefly, so the event loop keeps answering while a large answer is written."""
    head = usage.model_dump_json(exclude={"rows"}).encode()
    slices = [
        _ROWS.dump_json(usage.rows[offset : offset + ROWS_PER_SLICE])[1:-1]
        for offset in range(0, len(usage.rows), ROWS_PER_SLICE)
    ]
    return head[:-1] + b',"rows":[' + b",".join(part for part in slices if part) + b"]}"
