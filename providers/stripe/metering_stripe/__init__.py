"""metering-stripe: the Stripe Billing Meters provider for metering-core.

Registering costs nothing: the Stripe SDK is imported only when the provider is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_stripe.capabilities import CAPABILITIES
from metering_stripe.settings import StripeSettings

if TYPE_CHECKING:
    from metering_stripe.provider import StripeProvider

__all__ = ["StripeProvider", "StripeSettings"]


def _build(settings: StripeSettings) -> StripeProvider:
    from metering_stripe.provider import StripeProvider

    return StripeProvider(settings)


def __getattr__(name: str) -> Any:
    if name == "StripeProvider":
        from metering_stripe.provider import StripeProvider

        return StripeProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("stripe", _build, StripeSettings, capabilities=CAPABILITIES)
