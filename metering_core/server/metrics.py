"""The service's Prometheus page: requests by route and status, their latency, events
ingested by outcome, and the facade's pipeline counts, in one registry per app."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from metering_core.metrics import PipelineStats
from metering_core.models import IngestResult, MirrorStatus

__all__ = ["CONTENT_TYPE", "RequestMetrics", "ServiceMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class _PipelineCollector(Collector):
    """The facade's pipeline totals, read when the page is scraped."""

    def __init__(self, stats: Callable[[], PipelineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        labels = ["provider"]
        for name, value, text in (
            ("metering_pipeline_events_queued", stats.queued, "Events queued for delivery"),
            ("metering_pipeline_retries", stats.retried, "Events sent again after a failure"),
            ("metering_pipeline_dead_letters", stats.dead_lettered, "Events kept as dead letters"),
        ):
            family = CounterMetricFamily(name, text, labels=labels)
            family.add_metric([stats.provider], value)
            yield family
        settled = CounterMetricFamily(
            "metering_pipeline_events_settled",
            "Events settled by outcome",
            labels=[*labels, "outcome"],
        )
        for outcome, value in (
            ("accepted", stats.accepted),
            ("duplicate", stats.duplicates),
            ("rejected", stats.rejected),
        ):
            settled.add_metric([stats.provider, outcome], value)
        yield settled
        depth = GaugeMetricFamily(
            "metering_pipeline_queue_depth", "Events queued and not yet settled", labels=labels
        )
        depth.add_metric([stats.provider], stats.queue_depth)
        yield depth


class _MirrorCollector(Collector):
    """Each mirror's outbox depth, oldest undelivered age and dead letters (the store's),
    and the rows this process delivered to it and had refused (counters)."""

    def __init__(self) -> None:
        self.statuses: list[MirrorStatus] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if not self.statuses:
            return
        families = (
            ("metering_mirror_outbox_depth", "Rows the ledger still owes the mirror", "depth"),
            (
                "metering_mirror_oldest_seconds",
                "Age of the oldest row the ledger still owes the mirror (0: none)",
                "oldest_seconds",
            ),
            ("metering_mirror_dead_letters", "Rows the mirror refused for good", "dead_letters"),
        )
        for name, documentation, field in families:
            family = GaugeMetricFamily(name, documentation, labels=["mirror", "provider"])
            for status in self.statuses:
                value = getattr(status, field)
                family.add_metric([status.mirror, status.provider], value or 0)
            yield family
        counters = (
            ("metering_mirror_delivered", "Rows this process delivered to the mirror", "delivered"),
            ("metering_mirror_refused", "Rows the mirror refused to this process", "refused"),
            (
                "metering_mirror_withheld",
                "Usage rows this process settled unsent (cancelled, or their meter made again)",
                "withheld",
            ),
            (
                "metering_mirror_reported_refusals",
                "Events the mirror reported refusing after accepting them (its notices)",
                "reported",
            ),
        )
        for name, documentation, field in counters:
            counted = CounterMetricFamily(name, documentation, labels=["mirror", "provider"])
            for status in self.statuses:
                counted.add_metric([status.mirror, status.provider], getattr(status, field))
            yield counted


class ServiceMetrics:
    """Instruments of one app; `RequestMetrics` feeds the request ones."""

    def __init__(self, stats: Callable[[], PipelineStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "metering_http_requests",
            "Requests answered, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "metering_http_request_duration_seconds",
            "Time to answer a request, by route",
            ["method", "route"],
            registry=self.registry,
        )
        self.ingested = Counter(
            "metering_events_ingested",
            "Events received by the service, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        # each outcome shown from the start, at 0: an alert on the rate of rejections has
        # a series to read before the first one
        self._ingested = {
            outcome: self.ingested.labels(outcome)
            for outcome in ("accepted", "duplicate", "rejected")
        }
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        self.registry.register(_PipelineCollector(stats))
        self._mirrors = _MirrorCollector()
        self.registry.register(self._mirrors)

    def mirrors(self, statuses: list[MirrorStatus]) -> None:
        """The mirrors' outbox as of now (read from the store just before a scrape)."""
        self._mirrors.statuses = statuses

    def count_ingested(self, result: IngestResult) -> None:
        for outcome, number in (
            ("accepted", len(result.accepted)),
            ("duplicate", len(result.duplicates)),
            ("rejected", len(result.rejected)),
        ):
            if number:
                self._ingested[outcome].inc(number)

    def answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count a request and time it. Each label set's child is looked up once and kept
        (the sets are bounded: methods, route templates, statuses): `labels()` checks and
        locks each call, a hundredth of a one-event request's time."""
        requests = self._requests.get((method, route, status))
        if requests is None:
            requests = self._requests[method, route, status] = self.requests.labels(
                method, route, str(status)
            )
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[method, route] = self.latency.labels(method, route)
        requests.inc()
        latency.observe(seconds)

    def page(self) -> bytes:
        return generate_latest(self.registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware measuring every request into `metrics` (a plain wrapper: no task or
    body copy per request). The route template, not the raw path, labels each request, and
    an unusual method is "other", so no caller can grow the label set."""

    def __init__(self, app: App, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            if method not in _METHODS:  # any token is a method to HTTP: a label each would grow
                method = "other"
            self.metrics.answered(method, route, status[0], time.perf_counter() - began)
