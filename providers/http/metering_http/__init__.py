"""metering-http: the provider that speaks the metering REST contract (`metering serve`)."""

from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_http.provider import HttpProvider, HttpSettings

__all__ = ["HttpProvider", "HttpSettings"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """Capabilities are the server's: read from `GET /capabilities` when connected."""
    register("http", HttpProvider, HttpSettings)
