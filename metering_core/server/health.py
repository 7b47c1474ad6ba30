"""Whether the service can reach what stands behind it: degraded for a while after a
request failed there (its store or provider down, read-only, misconfigured), so a probe or
an alert sees it, not only the callers that got the 503."""

from __future__ import annotations

import time

__all__ = ["DEGRADED_FOR", "Health"]

DEGRADED_FOR = 30.0
"""Seconds `/health` stays degraded after the last failure behind the service."""


class Health:
    """The last failure behind the service, if recent."""

    def __init__(self) -> None:
        self._failed_at = -float("inf")
        self._kind = ""

    def failed(self, kind: str) -> None:
        self._failed_at, self._kind = time.monotonic(), kind

    def problem(self) -> str | None:
        """What failed, when it was within `DEGRADED_FOR` seconds; None when healthy."""
        ago = time.monotonic() - self._failed_at
        if ago > DEGRADED_FOR:
            return None
        return f"a request failed behind the service ({self._kind}) {ago:.0f} s ago"
