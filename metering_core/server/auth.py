"""API keys: who is calling, with which scopes, bound to which tenant."""

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Annotated, Any, get_args

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metering_core.config import ApiKey, Scope
from metering_core.server.errors import Forbidden

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
"""The bearer token of a request, if it sent one."""


def _digest(key: str) -> bytes:
    """Keys are compared by SHA-256, so every comparison has the same length and cost."""
    return hashlib.sha256(key.encode()).digest()


class Principal:
    """Who is calling: the scopes of their key and the tenant it is bound to, if any."""

    def __init__(self, key: ApiKey) -> None:
        self.scopes = key.scopes
        self.tenant = key.tenant

    def own_tenant(self, customer_id: str | None, what: str) -> None:
        """Refuse (403) a tenant-bound key acting on another tenant."""
        if self.tenant is not None and customer_id != self.tenant:
            raise Forbidden(
                f"this key is bound to tenant {self.tenant!r} and cannot {what} {customer_id!r}"
            )


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

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if not self._known:
            return Principal(ApiKey(scopes=frozenset(get_args(Scope))))
        if credentials is None:
            raise Forbidden("missing API key: send Authorization: Bearer <key>", 401)
        offered = _digest(credentials.credentials)
        match: ApiKey | None = None
        for secret, spec in self._known:  # compare against every key: timing says nothing
            if hmac.compare_digest(secret, offered):
                match = spec
        if match is None:
            raise Forbidden("unknown API key", 401)
        return Principal(match)

    def require(self, scope: Scope) -> Callable[..., Principal]:
        """A dependency: the caller, who must hold `scope`."""

        def dependency(credentials: Credentials) -> Principal:
            principal = self.authenticate(credentials)
            if scope not in principal.scopes:
                raise Forbidden(f"this key lacks the scope {scope!r}")
            return principal

        return dependency
