"""metering-stripe: the Stripe Billing Meters provider for metering-core."""

from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_stripe.provider import CAPABILITIES, StripeProvider
from metering_stripe.settings import StripeSettings

__all__ = ["StripeProvider", "StripeSettings"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("stripe", StripeProvider, StripeSettings, capabilities=CAPABILITIES)
