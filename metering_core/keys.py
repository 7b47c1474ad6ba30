"""Access keys: what a caller may do (its scopes) and the one tenant it may act for.

The REST service checks them per request and the Lambda API handler builds them from a
token's claims; the model lives here, below both, so a library user can state keys
(`Metering` settings, tests) without importing the service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from metering_core.models import Identifier

__all__ = ["ApiKey", "Scope"]

Scope = Literal[
    "meters:read",
    "meters:write",
    "usage:read",
    "usage:write",
    "usage:replicate",
    "customers:write",
    "metrics:read",
]
"""`usage:replicate`: a key bound to no tenant may also write events under the ids
tenant-bound keys' events are stored by (a ledger forwarding its events to this service,
an export loaded into it); without it such an id is refused, so no one plants an event
where a tenant's would go."""


class ApiKey(BaseModel):
    """One REST-service key: what it may do, and the one tenant it is bound to, if any."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scopes: frozenset[Scope]
    tenant: Identifier | None = None
    """A customer id, as events name it (an empty one was taken, and every read then
    refused naming a `customer_id` the caller never sent: probe)."""

    @model_validator(mode="after")
    def _replicates_for_every_tenant(self) -> ApiKey:
        if self.tenant is not None and "usage:replicate" in self.scopes:
            raise ValueError(
                "usage:replicate is for a key bound to no tenant (a ledger forwarding "
                "every tenant's events): bound to a tenant, its events are that tenant's"
            )
        return self
