"""A fake Stripe on 127.0.0.1 that the real SDK reaches through `base_addresses`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from metering_stripe import StripeProvider, StripeSettings
from metering_stripe.testing import FakeStripe

API_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"


@pytest.fixture(scope="module")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe(api_key=API_KEY) as fake:
        yield fake


def settings_for(fake: FakeStripe, **options: object) -> StripeSettings:
    return StripeSettings(api_key=API_KEY, base_url=fake.url, timeout=5, **options)  # type: ignore[arg-type]


@pytest.fixture
async def stripe_provider(fake_stripe: FakeStripe) -> AsyncIterator[StripeProvider]:
    provider = StripeProvider(settings_for(fake_stripe))
    yield provider
    await provider.aclose()
