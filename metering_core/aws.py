"""AWS Lambda entry points, for an sbt-aws control plane (or any API Gateway and bus).

- `api_handler(event, context)`: the REST service's app behind API Gateway, through
  Mangum (HTTP API payload 2.0 and REST API 1.0). Authorization is the gateway's: its JWT
  authorizer checked the route's scope before the request arrived, and a tenant claim
  (`METERING_AWS_TENANT_CLAIM`, default `custom:tenantId`) binds the request to that
  tenant exactly like a tenant-bound key. A request with no authorizer context is
  refused, unless `METERING_AWS_ALLOW_UNAUTHENTICATED=1`.
- `event_handler(event, context)`: the EventBridge entry point of the event-triggered
  functions (ingestion, onboarding, offboarding). Usage is flushed before it returns,
  because Lambda may freeze the process right after, and a rejected event fails the
  invocation so the bus retries or dead-letters it (event ids make the retry harmless).

Both build their facade once per warm container, from the environment. Secrets come from
Secrets Manager: `METERING_SECRETS='{"METERING_STRIPE_API_KEY": "<secret arn>"}'` sets
each variable from its secret at cold start (the function's role must be allowed to read
them; the CDK construct grants it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from metering_core.client import AsyncMetering, Metering
from metering_core.delivery import GAVE_UP
from metering_core.errors import ConfigurationError, ProviderUnavailableError, ValidationError
from metering_core.loop import shared_loop
from metering_core.models import Customer

if TYPE_CHECKING:
    from mangum import Mangum

__all__ = ["api_handler", "event_handler"]

_metering: Metering | None = None
_api: Mangum | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def load_secrets() -> None:
    """Set each variable named in `METERING_SECRETS` from its Secrets Manager secret (a
    plain string, or a JSON object holding the value under the variable's name)."""
    raw = os.environ.get("METERING_SECRETS")
    if not raw:
        return
    try:
        wanted = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigurationError("METERING_SECRETS is not a JSON object of names") from None
    if not isinstance(wanted, dict):
        raise ConfigurationError("METERING_SECRETS must map variable names to secret ids")
    import boto3  # present in every AWS Lambda Python runtime

    client = boto3.client("secretsmanager")
    for name, secret_id in wanted.items():
        text = client.get_secret_value(SecretId=secret_id)["SecretString"]
        os.environ[str(name)] = _secret_value(str(name), str(secret_id), text)


def _secret_value(name: str, secret_id: str, text: str) -> str:
    """The value a secret holds for variable `name`: its text, or a JSON object's string
    under `name` (a JSON string literal, unquoted). Anything else is refused at cold start,
    naming the secret and never its value: set to '' or 'None', the first delivery failed
    instead, naming nothing (probe)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        held = value.get(name)
        if isinstance(held, str) and held:
            return held
        raise ConfigurationError(
            f"secret {secret_id!r} (for {name}) is a JSON object without a string under "
            f"{name!r}; its keys: {sorted(map(str, value))}"
        )
    return text  # a number, say: its text as stored


def _refuse_container_disk(provider_name: str, provider: object) -> None:
    """Under Lambda, a SQLite store is a file on the container's own disk, and the memory
    provider the container's memory: both go with the container, and the usage in them.
    Refused at cold start, naming the setting (memory is allowed with
    `METERING_AWS_ALLOW_EPHEMERAL=1`, for trying the handlers locally)."""
    if provider_name == "memory" and not _truthy("METERING_AWS_ALLOW_EPHEMERAL"):
        raise ConfigurationError(
            "the memory provider would keep usage in this Lambda container's own memory, "
            "lost when the container goes (and not shared by the others): set "
            "METERING_PROVIDER to sql with METERING_SQL_URL on PostgreSQL, or another provider"
        )
    if provider_name != "sql":
        return
    from metering_core.sql.provider import SqlProvider

    if isinstance(provider, SqlProvider) and provider.store.backend == "sqlite":
        raise ConfigurationError(
            f"the sql provider on SQLite ({provider.store.shown}) would keep usage on this "
            "Lambda container's own disk, lost when the container goes: set METERING_SQL_URL "
            "to a PostgreSQL database, or METERING_PROVIDER to another provider"
        )


# A Lambda container forwards to no mirror (`mirror_forwarder=False` below): frozen
# between invocations, a pass would keep its lease while another forwarder (`metering
# mirror run`, on a schedule or in ECS) is the one that can deliver.


def _container_metering() -> Metering:
    global _metering
    if _metering is None:
        load_secrets()
        metering = Metering(mirror_forwarder=False)  # see above
        try:
            _refuse_container_disk(metering.provider_name, metering.provider)
        except ConfigurationError:
            metering.close()
            raise
        _metering = metering
    return _metering


def event_handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """Handle one EventBridge (or CloudEvent) message; answer what was done."""
    metering = _container_metering()
    outcome = metering.handle_event(event)
    report = metering.flush()
    undelivered = {i: why for i, why in report.rejected.items() if why.startswith(GAVE_UP)}
    if undelivered:  # the provider failing, not the message: an outage to alarm on as one
        raise ProviderUnavailableError(
            f"usage events not delivered, to retry: {undelivered}",
            provider=metering.provider_name,
        )
    if report.rejected:
        raise ValidationError(
            f"rejected usage events: {report.rejected}", field="detail", value=list(report.rejected)
        )
    if isinstance(outcome, list):
        return {"ingested": outcome, "duplicates": report.duplicates}
    return {"ok": True, "customer": outcome.id if isinstance(outcome, Customer) else None}


def _container_api() -> Mangum:
    global _api
    if _api is None:
        from mangum import Mangum

        from metering_core.server.app import create_app
        from metering_core.server.auth import GatewayClaims

        load_secrets()
        gateway = GatewayClaims(
            tenant_claim=os.environ.get("METERING_AWS_TENANT_CLAIM", "custom:tenantId"),
            allow_unauthenticated=_truthy("METERING_AWS_ALLOW_UNAUTHENTICATED"),
        )
        metering = AsyncMetering(mirror_forwarder=False)  # see _container_metering
        try:
            _refuse_container_disk(metering.provider_name, metering.provider)
        except ConfigurationError:
            shared_loop().run(metering.close())
            raise
        app = create_app(metering, gateway=gateway)
        _api = Mangum(
            app, lifespan="off", api_gateway_base_path=os.environ.get("METERING_AWS_BASE_PATH", "/")
        )
    return _api


def api_handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """Serve one API Gateway request with the REST service's app. `POST /usage` delivers
    before it answers, so nothing is left queued when the container freezes."""
    response: dict[str, Any] = _container_api()(dict(event), context)  # type: ignore[arg-type]
    return response  # (Mangum reads nothing of the context object)
