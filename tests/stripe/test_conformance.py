"""The Stripe provider, through the real SDK against the fake Stripe, passes the shared suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from metering_stripe import StripeProvider
from metering_stripe.testing import FakeStripe

from metering_core.testing import ProviderConformance

from .conftest import settings_for


class TestStripeConformance(ProviderConformance):
    @pytest.fixture(params=[True, False], ids=["v2-stream", "v1-events"])
    async def provider(
        self, fake_stripe: FakeStripe, request: pytest.FixtureRequest
    ) -> AsyncIterator[StripeProvider]:
        provider = StripeProvider(settings_for(fake_stripe, use_event_stream=request.param))
        yield provider
        await provider.aclose()

    async def test_a_latest_tie_goes_to_the_greatest_id_whatever_order_it_arrives_in(
        self, provider: StripeProvider
    ) -> None:
        pytest.skip("Stripe's `last` breaks ties by Stripe's own rule, over whole seconds")
