"""The fake Stripe's HTTP side: a loopback server the real SDK reaches via `base_addresses`.

v1 requests arrive form-encoded with Stripe's bracket notation (`payload[value]=3`), v2
as JSON; answers and error bodies have Stripe's shapes, so the SDK raises its own
exception classes. Switches inject 429s, 5xx, dropped connections and latency.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from metering_stripe.testing.rules import State, StripeFault, allow

__all__ = ["FakeStripe"]

Route = Callable[[State, dict[str, Any], re.Match[str]], dict[str, Any]]

ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("POST", re.compile(r"/v1/billing/meters"), lambda s, p, m: s.create_meter(p)),
    ("GET", re.compile(r"/v1/billing/meters"), lambda s, p, m: s.list_meters(p)),
    (
        "GET",
        re.compile(r"/v1/billing/meters/(mtr_\w+)"),
        lambda s, p, m: s.meter(only(p, {"expand"}) or m[1]),
    ),
    ("POST", re.compile(r"/v1/billing/meters/(mtr_\w+)"), lambda s, p, m: s.update_meter(m[1], p)),
    (
        "POST",
        re.compile(r"/v1/billing/meters/(mtr_\w+)/deactivate"),
        lambda s, p, m: s.set_status(m[1], "inactive", p),
    ),
    (
        "POST",
        re.compile(r"/v1/billing/meters/(mtr_\w+)/reactivate"),
        lambda s, p, m: s.set_status(m[1], "active", p),
    ),
    (
        "GET",
        re.compile(r"/v1/billing/meters/(mtr_\w+)/event_summaries"),
        lambda s, p, m: s.summaries(m[1], p),
    ),
    ("POST", re.compile(r"/v1/billing/meter_events"), lambda s, p, m: s.record_event(p)),
    ("POST", re.compile(r"/v1/billing/meter_event_adjustments"), lambda s, p, m: s.adjust(p)),
    ("POST", re.compile(r"/v1/customers"), lambda s, p, m: s.create_customer(p)),
    ("GET", re.compile(r"/v1/customers"), lambda s, p, m: s.list_customers(p)),
    (
        "GET",
        re.compile(r"/v1/customers/(cus_\w+)"),
        lambda s, p, m: s.customer(only(p, {"expand"}) or m[1]),
    ),
    ("DELETE", re.compile(r"/v1/customers/(cus_\w+)"), lambda s, p, m: s.delete_customer(m[1])),
    (
        "POST",
        re.compile(r"/v2/billing/meter_event_session"),
        lambda s, p, m: s.new_session(only(p, set())),
    ),
]


def only(params: dict[str, Any], allowed: set[str]) -> str:
    """Refuse unknown parameters on routes that take none of their own; returns ''."""
    allow(params, allowed)
    return ""


def parse_form(text: str) -> dict[str, Any]:
    """Stripe's form encoding: `a[b][c]=v` nests, `a[0]=v` makes lists."""
    result: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    parsed: dict[str, Any] = _lists(result)
    return parsed


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        if node and all(k.isdigit() for k in node):
            return [_lists(node[k]) for k in sorted(node, key=int)]
        return {k: _lists(v) for k, v in node.items()}
    return node


class FakeStripe:
    """A Stripe on 127.0.0.1 with state and rules; use as a context manager.

    `fail_next(n, status, headers)` answers the next n requests with an error,
    `drop_next(n)` closes the next n connections without answering, `latency` adds
    seconds to every request, `state.expire_sessions()` expires v2 session tokens.
    """

    def __init__(self, api_key: str = "sk_test_fake", *, latency: float = 0.0) -> None:
        self.api_key = api_key
        self.latency = latency
        self.state = State()
        self.requests: list[tuple[str, str]] = []
        self._replies: dict[str, dict[str, Any]] = {}
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
                if fake.latency:
                    time.sleep(fake.latency)
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
                        fake._dispatch(method, url.path, url.query, raw, self.headers),
                    )
                except StripeFault as failure:
                    status, body = failure.status, failure.body()
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

    def _dispatch(
        self, method: str, path: str, query: str, raw: str, headers: Any
    ) -> dict[str, Any]:
        token = str(headers.get("Authorization", "")).removeprefix("Bearer ").strip()
        if path == "/v2/billing/meter_event_stream" and method == "POST":
            self.state.check_session(token)
            body = json.loads(raw or "{}")
            allow(body, {"events"})
            self.state.stream(body.get("events"))
            return {}
        if token != self.api_key:
            shown = token[:8] + "*" * max(0, len(token) - 12) + token[-4:] if token else ""
            raise StripeFault(401, f"Invalid API Key provided: {shown}")
        params = (
            json.loads(raw or "{}")
            if path.startswith("/v2/")
            else parse_form(query if method != "POST" else raw)
        )
        cache_key = headers.get("Idempotency-Key") if method == "POST" else None
        if cache_key and cache_key in self._replies:
            return self._replies[cache_key]
        for verb, pattern, route in ROUTES:
            match = pattern.fullmatch(path)
            if verb == method and match:
                reply = route(self.state, params, match)
                if cache_key:
                    self._replies[cache_key] = reply
                return reply
        raise StripeFault(404, f"Unrecognized request URL ({method}: {path}).")
