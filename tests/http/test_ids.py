"""Free-text ids (a tenant id may hold '/', '?', '#' or spaces) reach the right route."""

from __future__ import annotations

import pytest
import respx
from metering_http import HttpProvider, HttpSettings

from metering_core import CustomerCreate, NotFoundError

ODD = "org/acme?x=1#eu west"


@respx.mock
async def test_ids_travel_as_one_escaped_path_segment() -> None:
    route = respx.delete("http://metering.test/customers/org%2Facme%3Fx%3D1%23eu%20west")
    route.respond(204)
    provider = HttpProvider(HttpSettings(base_url="http://metering.test"))
    await provider.delete_customer(ODD)
    await provider.aclose()
    assert route.call_count == 1


async def test_a_customer_with_a_slash_in_its_id_can_be_deleted(service_url: str) -> None:
    provider = HttpProvider(HttpSettings(base_url=service_url, api_key="admin-key"))
    try:
        await provider.create_customer(CustomerCreate(id=ODD))
        await provider.delete_customer(ODD)
        with pytest.raises(NotFoundError):
            await provider.delete_customer(ODD)
    finally:
        await provider.aclose()
