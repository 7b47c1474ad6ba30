"""Which Stripe customer each tenant is, as one process knows it."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["TenantCustomers"]


class TenantCustomers:
    """Tenant -> `cus_…`, set by this process's own makings and deletions and by its
    listings of Stripe's customers. A listing reads pages over time, so it never undoes
    what was learnt while it ran: every change and the start of every listing is
    numbered, and a listing applies only to tenants whose last change is older than its
    start (a tenant deleted here, or found by a later listing, would otherwise get back
    the customer the listing's older page named)."""

    def __init__(self) -> None:
        self._of: dict[str, str] = {}
        self._changes = 0
        self._changed: dict[str, int] = {}
        """Each tenant changed, and the number of its last change (this process's own,
        or the start of the listing that changed it)."""

    def __contains__(self, tenant: object) -> bool:
        return tenant in self._of

    def get(self, tenant: str) -> str | None:
        return self._of.get(tenant)

    def set(self, tenant: str, reference: str) -> None:
        self._of[tenant] = reference
        self._stamp(tenant)

    def forget(self, tenant: str) -> None:
        self._of.pop(tenant, None)
        self._stamp(tenant)

    def _stamp(self, tenant: str) -> None:
        self._changes += 1
        self._changed[tenant] = self._changes

    def mark(self) -> int:
        """A listing's start: what changes after it is newer than what it reads."""
        self._changes += 1
        return self._changes

    def listed(self, found: Mapping[str, str], since: int, *, everyone: bool) -> None:
        """Apply a listing that began at `since`: each tenant found is mapped to the
        customer found (the newest tagged with it); after a listing of `everyone`, a
        tenant not found has no live customer (deleted, by another process) and is
        forgotten. Tenants changed since the listing began (by this process, or by a
        listing that began later) keep that change."""
        for tenant, reference in found.items():
            if self._changed.get(tenant, 0) < since:
                self._of[tenant] = reference
                self._changed[tenant] = since
        if everyone:
            gone = [t for t in self._of if t not in found and self._changed.get(t, 0) < since]
            for tenant in gone:
                del self._of[tenant]
                self._changed[tenant] = since
