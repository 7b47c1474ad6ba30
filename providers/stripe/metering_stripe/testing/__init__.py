"""An offline Stripe for tests: a loopback server that enforces the Billing Meters rules."""

from metering_stripe.testing.fake_server import Chaos, FakeStripe

__all__ = ["Chaos", "FakeStripe"]
