"""The key before the body: a request without a known key is refused before any of its
body is read.

FastAPI reads and parses a route's body before the dependencies that check the key run,
so without this anyone could make the service parse up to `max_body_bytes` of JSON per
request, key or no key. Here the first read of the body checks that a known key was
sent (401 otherwise); which scopes it holds is still each route's to check."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["WEBHOOKS", "KeyFirst"]

WEBHOOKS = "/webhooks/"
"""Paths a provider posts to, signed by it rather than by a key (each verifies it)."""


class KeyFirst:
    """Run `check(scope)` (which raises `Forbidden`) when a route first reads its body."""

    def __init__(self, app: ASGIApp, check: Callable[[Scope], object]) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(WEBHOOKS):
            await self.app(scope, receive, send)
            return
        checked = False

        async def after_the_key() -> Message:
            nonlocal checked
            if not checked:
                self.check(scope)
                checked = True
            return await receive()

        await self.app(scope, after_the_key, send)
