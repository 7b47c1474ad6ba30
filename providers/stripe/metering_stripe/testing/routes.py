"""The fake Stripe's routing: request to rule, with Stripe's auth, encodings and replays.

v1 requests arrive form-encoded with Stripe's bracket notation (`payload[value]=3`), v2
as JSON; a POST's `Idempotency-Key` replays the first answer, as Stripe does, and a key
sent again with other parameters is refused (`idempotency_error`).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from metering_stripe.testing.rules import State, StripeFault, allow

__all__ = ["Router"]

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
        lambda s, p, m: s.retrieve_customer(only(p, {"expand"}) or m[1]),
    ),
    ("DELETE", re.compile(r"/v1/customers/(cus_\w+)"), lambda s, p, m: s.delete_customer(m[1])),
    ("GET", re.compile(r"/v2/core/events/(evt_\w+)"), lambda s, p, m: s.notice(m[1])),
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


class Router:
    """Checks the key (or the v2 session token), parses the body and runs the rule."""

    def __init__(self, state: State, api_key: str) -> None:
        self.state = state
        self.api_key = api_key
        self._replies: dict[str, tuple[tuple[str, Any], dict[str, Any]]] = {}
        """Each idempotency key's request (path and parameters) and first answer."""
        self._keys = collections.defaultdict[str, threading.Lock](threading.Lock)
        """A lock per idempotency key: Stripe runs one request of a key at a time (a
        second at once is answered 409, retryable; here it waits, then is replayed, as
        a retry would be)."""
        self._keys_lock = threading.Lock()

    def dispatch(
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
        if not cache_key:
            return self._route(method, path, params, None)
        with self._keys_lock:
            one_at_a_time = self._keys[cache_key]
        with one_at_a_time:
            return self._route(method, path, params, cache_key)

    def _route(
        self, method: str, path: str, params: dict[str, Any], cache_key: str | None
    ) -> dict[str, Any]:
        if cache_key and cache_key in self._replies:
            sent, reply = self._replies[cache_key]
            if sent != (path, params):
                raise StripeFault(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{cache_key}' if "
                    "you meant to execute a different request.",
                    kind="idempotency_error",
                )
            return reply
        for verb, pattern, route in ROUTES:
            match = pattern.fullmatch(path)
            if verb == method and match:
                reply = route(self.state, params, match)
                if cache_key:
                    self._replies[cache_key] = ((path, params), reply)
                return reply
        raise StripeFault(404, f"Unrecognized request URL ({method}: {path}).")
