"""The REST service: `create_app(metering, keys=...)` (a FastAPI app) and `serve()`.

The app (and FastAPI) load on first use, so importing the service's settings, such as
`ApiKey`, costs a library user nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metering_core.errors import ERROR_TYPES

if TYPE_CHECKING:
    from metering_core.server.app import create_app, serve

__all__ = ["ERROR_TYPES", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from metering_core.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
