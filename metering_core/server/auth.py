"""API keys: who is calling, with which scopes, bound to which tenant; and the tenant's
own space of event ids."""

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import Scope as AsgiScope

from metering_core.keys import ApiKey, Scope
from metering_core.models import Aggregation, CancelResult, IngestResult, UsageEvent
from metering_core.rules import LOWERED_BY_EVENTS
from metering_core.server.errors import Forbidden

TENANT_ID_PREFIX = "tenant-"
_TENANT_ID = re.compile(r"tenant-[0-9a-f]{48}")
"""How the provider holds a tenant-bound key's event ids: no other key may send one."""


def _digest(key: str) -> bytes:
    """Keys are compared by SHA-256, so every comparison has the same length and cost."""
    return hashlib.sha256(key.encode()).digest()


def _as_sent(stored: str, reason: str, sent: Mapping[str, str]) -> str:
    """A provider's reason, naming the id as the caller sent it."""
    return reason.replace(stored, sent.get(stored, stored))


_OPERATORS_ONLY: dict[str, str] = {
    "meters:write": "change meters, which every tenant's usage is counted by",
    "metrics:read": "read the service's metrics, which count every tenant's",
}
"""Scopes a tenant-bound key is refused whatever it holds, and what they would do."""


class Principal:
    """Who is calling: the scopes of their key, the tenant it is bound to, if any, and a
    name for the caller that shows no secret (`caller`: its key's digest, or its token's
    subject), which keeps callers' idempotency keys apart."""

    def __init__(self, key: ApiKey, caller: str = "anonymous") -> None:
        self.scopes = key.scopes
        self.tenant = key.tenant
        self.caller = caller

    def need(self, scope: Scope) -> None:
        """Refuse (403) a key without `scope`; and a tenant-bound key, whatever its scopes,
        changing meters or reading the service's metrics: a meter is every tenant's (one
        tenant deleting it took every other's usage with it) and the metrics count every
        tenant's events and dead letters (probe)."""
        if scope not in self.scopes:
            raise Forbidden(f"this key lacks the scope {scope!r}")
        if self.tenant is not None and scope in _OPERATORS_ONLY:
            raise Forbidden(
                f"this key is bound to tenant {self.tenant!r} and cannot "
                f"{_OPERATORS_ONLY[scope]}: a key bound to no tenant can"
            )

    def may_delete_customer(self) -> None:
        """Refuse (403) a tenant-bound key deleting a customer, its own too: on a billing
        provider that drops what is not yet invoiced (Stripe), a tenant would erase its
        own bill, as a cancel would (review)."""
        if self.tenant is not None:
            raise Forbidden(
                f"this key is bound to tenant {self.tenant!r} and cannot delete customers: "
                "a billing provider drops what is not yet invoiced (a key bound to no "
                "tenant can)"
            )

    def own_tenant(self, customer_id: str | None, what: str) -> None:
        """Refuse (403) a tenant-bound key acting on another tenant."""
        if self.tenant is not None and customer_id != self.tenant:
            raise Forbidden(
                f"this key is bound to tenant {self.tenant!r} and cannot {what} {customer_id!r}"
            )

    def stored_id(self, event_id: str) -> str:
        """The id the provider holds for an id this caller sent. A tenant-bound key's ids
        live in its tenant's own space: the same id from two tenants is two events, and
        no tenant can learn, suppress or cancel another's. Keys with no tenant act for
        every tenant and use ids as sent."""
        if self.tenant is None:
            return event_id
        spaced = f"{len(self.tenant)}:{self.tenant}:{event_id}".encode()
        return TENANT_ID_PREFIX + hashlib.sha256(spaced).hexdigest()[:48]

    def outgoing(
        self, events: Sequence[UsageEvent], kinds: Mapping[str, Aggregation]
    ) -> tuple[list[UsageEvent], dict[str, str], dict[str, str]]:
        """Events as the provider will hold them; a map back from stored ids to the ids
        sent; and the events this caller may not write, by the id sent, with the reason
        (`kinds`: each event name's aggregation). Each event is judged alone, so the rest
        of a batch is counted and its client's pipeline keeps only the refused ones."""
        if self.tenant is None:
            if "usage:replicate" in self.scopes:  # stored ids, as another store holds them
                return list(events), {}, {}
            reserved = {
                event.id: f"id {event.id!r} has the form of a tenant-bound key's stored ids, "
                "which are reserved to them: it could shadow a tenant's event (a key with "
                "the scope 'usage:replicate' may send them: a ledger forwarding its events, "
                "an export loaded into another store)"
                for event in events
                if event.id.startswith(TENANT_ID_PREFIX) and _TENANT_ID.fullmatch(event.id)
            }
            if not reserved:
                return list(events), {}, {}
            return [event for event in events if event.id not in reserved], {}, reserved
        stored: list[UsageEvent] = []
        sent: dict[str, str] = {}
        refused: dict[str, str] = {}
        for event in events:
            reason = self._refusal(event, kinds)
            if reason is not None:
                refused[event.id] = reason
                continue
            stored_id = self.stored_id(event.id)
            sent[stored_id] = event.id
            stored.append(event.model_copy(update={"id": stored_id}))
        if refused:  # an id is one event: any copy refused refuses them all (one verdict)
            stored = [event for event in stored if sent[event.id] not in refused]
        return stored, sent, refused

    def _refusal(self, event: UsageEvent, kinds: Mapping[str, Aggregation]) -> str | None:
        """Why this tenant-bound key may not write `event`: an id in the stored form (as
        its listings show them), another tenant's usage, or usage that could lower its
        own (a negative value; any event of a meter whose usage
        events can lower, `LOWERED_BY_EVENTS`)."""
        bound = f"this key is bound to tenant {self.tenant!r}"
        if event.id.startswith(TENANT_ID_PREFIX) and _TENANT_ID.fullmatch(event.id):
            # an id as listings show the stored event: resent, it would count again
            return (
                f"id {event.id!r} has the form of the ids events are stored by, which are "
                "reserved: send the event's own id (a listed event is already counted)"
            )
        if event.customer_id != self.tenant:
            return f"{bound} and cannot write usage for {event.customer_id!r}"
        if event.value < 0:
            return f"{bound} and cannot lower its usage: value={event.value}"
        kind = kinds.get(event.event_name)
        if kind in LOWERED_BY_EVENTS:
            return (
                f"{bound} and cannot write to the {kind} meter for "
                f"event_name={event.event_name!r}: its events could lower the usage billed; "
                f"send them with a key bound to no tenant"
            )
        return None

    @staticmethod
    def ingest_answer(result: IngestResult, sent: Mapping[str, str]) -> IngestResult:
        """The provider's answer in the ids the caller sent."""
        if not sent:
            return result
        return IngestResult(
            accepted=[sent.get(i, i) for i in result.accepted],
            duplicates=[sent.get(i, i) for i in result.duplicates],
            rejected={sent.get(i, i): _as_sent(i, why, sent) for i, why in result.rejected.items()},
        )

    def refuse_cancel(self, event_ids: Sequence[str]) -> CancelResult:
        """A tenant-bound caller's cancellation: every id refused, nothing cancelled.
        Cancelling lowers usage, and a tenant must not lower its own bill."""
        reason = (
            f"this key is bound to tenant {self.tenant!r} and cannot cancel usage: "
            "cancelling is the operator's correction (a key bound to no tenant)"
        )
        return CancelResult(rejected=dict.fromkeys(event_ids, reason))


class Keys:
    """The configured keys; with none, every caller has every scope (anonymous mode)."""

    def __init__(self, keys: Mapping[Any, ApiKey | Mapping[str, Any]]) -> None:
        self._known: list[tuple[bytes, ApiKey]] = []
        for secret, spec in keys.items():
            text = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
            key = spec if isinstance(spec, ApiKey) else ApiKey.model_validate(spec)
            self._known.append((_digest(text), key))

    def __bool__(self) -> bool:
        return bool(self._known)

    def identify(self, scope: AsgiScope) -> Principal:
        """The caller a request's bearer key names (401 if none, or an unknown one)."""
        if not self._known:
            return Principal(ApiKey(scopes=frozenset(get_args(Scope))))
        kind, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
        if kind.lower() != "bearer" or not token:
            raise Forbidden("missing API key: send Authorization: Bearer <key>", 401)
        offered = _digest(token)
        match: ApiKey | None = None
        for secret, spec in self._known:  # compare against every key: timing says nothing
            if hmac.compare_digest(secret, offered):
                match = spec
        if match is None:
            raise Forbidden("unknown API key", 401)
        return Principal(match, caller=f"key:{offered.hex()}")


class GatewayClaims:
    """Behind API Gateway (AWS Lambda), the gateway has authorized the route: its JWT
    authorizer checked the route's scope before the request arrived. The caller then has
    every scope on the routes it reaches, and a tenant claim, when present, binds it to
    that tenant exactly like a tenant-bound key. A request with no authorizer context is
    refused (401) unless `allow_unauthenticated` (a trusted private integration)."""

    def __init__(
        self, *, tenant_claim: str = "custom:tenantId", allow_unauthenticated: bool = False
    ) -> None:
        self.tenant_claim = tenant_claim
        self.allow_unauthenticated = allow_unauthenticated

    def __bool__(self) -> bool:
        return True

    def identify(self, scope: AsgiScope) -> Principal:
        """The caller, by the authorizer context Mangum hands over."""
        event = scope.get("aws.event") or {}
        context = event.get("requestContext", {}) if isinstance(event, dict) else {}
        authorizer = context.get("authorizer") or {}
        claims = (authorizer.get("jwt") or {}).get("claims") or authorizer.get("claims")
        if not isinstance(claims, dict):
            if not self.allow_unauthenticated:
                raise Forbidden("no authorizer context: this function serves API Gateway", 401)
            claims = {}
        scopes = frozenset(get_args(Scope))
        caller = f"token:{claims.get('sub') or claims.get('client_id') or ''}"
        if self.tenant_claim not in claims:
            return Principal(ApiKey(scopes=scopes), caller=caller)
        tenant = claims[self.tenant_claim]
        try:
            # present but not one tenant: refused, never read as no tenant (which acts for
            # every tenant): a null, an empty string, a number, a list, a NUL, 101 chars
            bound = scopes - {"usage:replicate"}  # a tenant's events are its own
            key = ApiKey(scopes=bound, tenant=tenant if isinstance(tenant, str) else "")
        except ValueError:
            raise Forbidden(
                f"the token's {self.tenant_claim!r} claim is not a tenant id: {tenant!r}"
            ) from None
        return Principal(key, caller=caller)


Gate = Keys | GatewayClaims
