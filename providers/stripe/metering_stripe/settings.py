"""Options of the Stripe provider (METERING_STRIPE_<OPTION>, or [stripe] in the config file)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from metering_core.config import ProviderSettings


class StripeSettings(ProviderSettings):
    """`api_key` is required; `base_url`/`meter_events_url` point the SDK at a local server."""

    api_key: SecretStr
    base_url: str | None = None
    meter_events_url: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    max_network_retries: int = Field(default=0, ge=0)
    """The pipeline retries with backoff already; SDK retries on top would multiply them."""
    use_event_stream: bool = True
    """Batch through the v2 meter event stream (100 events a request); else v1, one by one."""
    webhook_secret: SecretStr | None = None
    """The signing secret (`whsec_…`) of the event destination that sends Stripe's meter
    error reports to `POST /webhooks/stripe`, for a Stripe mirror of the ledger."""
