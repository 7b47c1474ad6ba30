"""Test helpers for provider authors: the conformance suite every provider plugin runs."""

from metering_core.testing.conformance import ProviderConformance

__all__ = ["ProviderConformance"]
