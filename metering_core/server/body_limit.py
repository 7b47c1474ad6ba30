"""A ceiling on request bodies: one caller cannot make the service hold an unbounded body.

Starlette's own `RequestBodyLimitMiddleware` answers a body whose declared length is over
its limit with a plain-text 413 in place of whatever the app answered; here every
refusal is the service's error shape, which the HTTP provider reads as a refused batch
and sends again in halves."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering_core.server.key_first import WEBHOOKS

__all__ = ["MAX_BODY_BYTES", "MAX_NOTICE_BYTES", "BodyLimit"]

MAX_BODY_BYTES = 16 * 1024 * 1024
"""The largest request body the service reads by default: a full batch of events with
large dimensions fits many times over."""

MAX_NOTICE_BYTES = 64 * 1024
"""The largest webhook body: no key is checked before it is read (the provider's
signature is), and a notice is about a kilobyte."""


class BodyLimit:
    """Refuse (413) a body over `max_bytes`: at once when its Content-Length says so, and
    as soon as the bytes read pass it when it comes in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope["path"].startswith(WEBHOOKS):
            limit = min(limit, MAX_NOTICE_BYTES)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_long = declared.isdigit() and int(declared) > limit
        read = 0

        async def limited() -> Message:
            nonlocal read
            if too_long:
                raise HTTPException(413)
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)
