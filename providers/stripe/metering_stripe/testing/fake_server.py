"""The fake Stripe's lifecycle: a loopback server the real SDK reaches via `base_addresses`.

Answers and error bodies have Stripe's shapes, so the SDK raises its own exception
classes. Switches inject 429s, 5xx, dropped connections and latency; `chaos` decides per
request, for soak tests.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import stripe

from metering_stripe.testing.routes import Router
from metering_stripe.testing.rules import State, StripeFault

__all__ = ["Chaos", "FakeStripe"]

Chaos = Callable[[str, str], str | None]
"""Told each request's method and path, before it is served: None serves it, "fail"
answers 500 without acting on it, "lose" acts on it and then closes the connection
unanswered (the work done, its answer lost)."""


class FakeStripe:
    """A Stripe on 127.0.0.1 with state and rules; use as a context manager.

    `fail_next(n, status, headers)` answers the next n requests with an error,
    `drop_next(n)` closes the next n connections without answering, `latency` adds
    seconds to every request, `chaos` (settable) decides per request, and
    `state.expire_sessions()` expires v2 session tokens.
    """

    def __init__(self, api_key: str = "sk_test_fake", *, latency: float = 0.0) -> None:
        self.api_key = api_key
        self.latency = latency
        self.chaos: Chaos | None = None
        self.state = State()
        self.requests: list[tuple[str, str]] = []
        self.queries: list[tuple[str, str, str]] = []
        """Each request's method, path and query string."""
        self._router = Router(self.state, api_key)
        self._faults: list[tuple[int, dict[str, str]] | None] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        serve = self._server.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_next(
        self, count: int, status: int = 500, headers: dict[str, str] | None = None
    ) -> None:
        with self._lock:
            self._faults.extend([(status, headers or {})] * count)

    def drop_next(self, count: int) -> None:
        with self._lock:
            self._faults.extend([None] * count)

    def report_refusals(
        self,
        meter_id: str,
        refused: dict[str, str],
        secret: str,
        *,
        code: str = "meter_event_customer_not_found",
        kind: str = "v1.billing.meter.error_report_triggered",
        signed_at: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """Refuse these events after the fact, as Stripe's asynchronous validation does
        (they no longer count), and report it as Stripe does to an event destination: the
        thin event's body and its `Stripe-Signature` (signed with `secret` at `signed_at`);
        the full event, with the sampled identifiers and messages, is served at
        `/v2/core/events/{id}`."""
        event_id = f"evt_{secrets.token_hex(12)}"
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        related = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"}
        samples = [
            {"error_message": message, "request": {"identifier": identifier}}
            for identifier, message in refused.items()
        ]
        reason = {
            "error_count": len(refused),
            "error_types": [{"code": code, "error_count": len(refused), "sample_errors": samples}],
        }
        thin = {
            "id": event_id,
            "object": "v2.core.event",
            "type": kind,
            "created": now,
            "livemode": False,
            "related_object": related,
        }
        data = {
            "developer_message_summary": f"{len(refused)} meter event(s) were refused",
            "reason": reason,
            "validation_start": now,
            "validation_end": now,
        }
        with self.state.lock:
            self.state.notices[event_id] = {**thin, "data": data}
            for identifier in refused:  # refused: not counted, and free to be sent again
                self.state.forget(identifier)
        body = json.dumps(thin)
        signature = stripe.WebhookSignature.generate_signature_header(body, secret, signed_at)
        return body.encode(), {"Stripe-Signature": signature}

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> tuple[bool, tuple[int, dict[str, str]] | None]:
        with self._lock:
            if not self._faults:
                return False, None
            return True, self._faults.pop(0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                url = urlsplit(self.path)
                fake.requests.append((method, url.path))
                fake.queries.append((method, url.path, url.query))
                if fake.latency:
                    time.sleep(fake.latency)
                verdict = fake.chaos(method, url.path) if fake.chaos else None
                if verdict == "fail":
                    error = {"error": {"type": "api_error", "message": "injected chaos"}}
                    self._answer(500, error, {})
                    return
                faulted, fault = fake._next_fault()
                if faulted and fault is None:
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    status, headers = fault
                    kind = "rate_limit_error" if status == 429 else "api_error"
                    self._answer(
                        status, {"error": {"type": kind, "message": f"injected {status}"}}, headers
                    )
                    return
                try:
                    status, body = (
                        200,
                        fake._router.dispatch(method, url.path, url.query, raw, self.headers),
                    )
                except StripeFault as failure:
                    status, body = failure.status, failure.body()
                if verdict == "lose":
                    self.close_connection = True
                    self.connection.close()
                    return
                self._answer(status, body, {})

            def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", "req_fake")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
