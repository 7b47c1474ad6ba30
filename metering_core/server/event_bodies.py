"""`POST /events` bodies in every CloudEvents HTTP mode, and EventBridge's JSON.

- structured: the message is the body (`application/cloudevents+json`, or plain JSON: an
  EventBridge envelope or a CloudEvent);
- binary (the CloudEvents SDKs' default): the attributes are `ce-*` headers and the body
  is the event's data;
- batched (`application/cloudevents-batch+json`): the body is a list of structured ones.

Everything here is parsing: a body that is not one of these is a 400 naming the body.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from metering_core.errors import ValidationError

__all__ = ["BATCH", "event_messages"]

BATCH = "application/cloudevents-batch+json"
_PREFIX = "ce-"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPException(400, f"not JSON: {exc}") from None
    except RecursionError:  # nested past what the parser can hold: refused, not failed
        raise HTTPException(400, "not JSON this service reads: nested too deeply") from None
    except ValueError as exc:  # an integer past Python's 4,300 digits: refused, not failed
        raise HTTPException(400, f"not JSON this service reads: {exc}") from None


def _attribute(name: str, value: str) -> str:
    """A binary-mode attribute: percent-encoded UTF-8 in ASCII, as the HTTP binding sends
    it. Anything else is refused by name: read leniently, bad escapes all became U+FFFD,
    so distinct ids collided and an event was dropped as a duplicate, and raw UTF-8 was
    read as Latin-1, so one event sent in two modes counted twice (probe)."""
    try:
        if not value.isascii():
            raise UnicodeError("not ASCII")
        return unquote(value, errors="strict")
    except UnicodeError:
        raise ValidationError(
            f"header {name} must be percent-encoded UTF-8 (the CloudEvents HTTP binding)",
            field=name,
            value=value[:100],
        ) from None


def event_messages(headers: Headers, body: bytes) -> tuple[list[Any], bool]:
    """The messages a request carries, and whether it was a batch (answered as a list)."""
    media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if f"{_PREFIX}specversion" in headers:
        # values are percent-encoded (the HTTP binding's rule): the same event sent in
        # binary and in structured mode must name the same source and id, or it counts twice
        message: dict[str, Any] = {
            name[len(_PREFIX) :]: _attribute(name, value)
            for name, value in headers.items()
            if name.startswith(_PREFIX)
        }
        message["data"] = _json(body) if body else None
        return [message], False
    parsed = _json(body)
    if media == BATCH:
        if not isinstance(parsed, list) or not parsed:
            raise HTTPException(400, f"a {BATCH} body is a non-empty list of CloudEvents")
        return parsed, True
    return [parsed], False
