"""metering-http: the provider that speaks the metering REST contract (`metering serve`).

Registering costs nothing: httpx is imported only when the provider is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_http.settings import HttpSettings

if TYPE_CHECKING:
    from metering_http.provider import HttpProvider

__all__ = ["HttpProvider", "HttpSettings"]


def _build(settings: HttpSettings) -> HttpProvider:
    from metering_http.provider import HttpProvider

    return HttpProvider(settings)


def __getattr__(name: str) -> Any:
    if name == "HttpProvider":
        from metering_http.provider import HttpProvider

        return HttpProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """Capabilities are the server's: read from `GET /capabilities` when connected."""
    register("http", _build, HttpSettings)
