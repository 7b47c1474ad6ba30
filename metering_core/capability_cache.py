"""What a provider can do, asked once and kept: the one place the facade, the pipeline and
the REST service learn a provider's capabilities and batch size."""

from __future__ import annotations

import asyncio
import logging
import time

from metering_core.errors import MeteringError
from metering_core.interface import Capabilities, IMetering

__all__ = ["ASK_AGAIN_AFTER", "DEFAULT_BATCH_SIZE", "CapabilityCache"]

logger = logging.getLogger("metering")

DEFAULT_BATCH_SIZE = 100
"""Events per batch while a provider cannot state its limit (its service is down)."""
ASK_AGAIN_AFTER = 5.0
"""Seconds between asking, for the batch size, a provider that could not answer."""


class CapabilityCache:
    """A provider's capabilities: asked when first needed (the HTTP provider asks its
    service), then kept for the life of the facade. A failed ask is not kept: the next
    caller asks again."""

    def __init__(self, provider: IMetering) -> None:
        self._provider = provider
        self._known: Capabilities | None = None
        self._ask_after = 0.0

    @property
    def known(self) -> Capabilities | None:
        """The capabilities, if asked for already or known without I/O (a `BaseProvider`'s
        `known_capabilities()`); None otherwise. Never blocks."""
        if self._known is None:
            known = getattr(self._provider, "known_capabilities", None)
            self._known = known() if callable(known) else None
        return self._known

    async def get(self) -> Capabilities:
        """The capabilities, asking the provider the first time (its errors propagate)."""
        if self._known is None:
            self._known = await self._provider.load_capabilities()
        return self._known

    async def batch_size(self, timeout: float) -> int:
        """The provider's batch limit for delivery, never failing: while the provider
        cannot say (unreachable, or slower than `timeout`), a modest default, asked again
        at most every `ASK_AGAIN_AFTER` seconds. Ingestion never waits on the provider."""
        if self._known is None and time.monotonic() >= self._ask_after:
            try:
                await asyncio.wait_for(self.get(), timeout)
            except Exception as exc:  # unreachable, or a provider's bug: never fatal here
                if not isinstance(exc, MeteringError | TimeoutError):
                    logger.warning(
                        "provider %r failed to state its capabilities: %r", self._provider.name, exc
                    )
                self._ask_after = time.monotonic() + ASK_AGAIN_AFTER
        return self._known.max_batch_size if self._known is not None else DEFAULT_BATCH_SIZE
