"""The state and rules of the fake Stripe: meters, meter events, adjustments, summaries,
customers, meter event sessions. Raises `StripeFault` where Stripe answers with an error."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DAY = 86_400
MAX_AGE = 35 * DAY
MAX_AHEAD = 5 * 60
CANCEL_WINDOW = DAY
SESSION_SECONDS = 15 * 60
FORMULAS = {"sum", "count", "last"}


class StripeFault(Exception):
    """An error answer: status, Stripe error type, message, the offending param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = (
            status,
            kind,
            message,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.param:
            error["param"] = self.param
        if self.code:
            error["code"] = self.code
        return {"error": error}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def allow(params: dict[str, Any], allowed: set[str]) -> None:
    """Stripe refuses unknown parameters, so a wrong request cannot pass silently."""
    for name in params:
        if name not in allowed:
            raise StripeFault(
                400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )


def need(params: dict[str, Any], name: str) -> Any:
    if name not in params or params[name] in ("", None):
        raise StripeFault(
            400, f"Missing required param: {name}.", param=name, code="parameter_missing"
        )
    return params[name]


def integer(params: dict[str, Any], name: str, default: int | None = None) -> int:
    value = params.get(name, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise StripeFault(400, f"Invalid integer: {value}", param=name) from None


@dataclass
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: float
    timestamp: int
    received: float
    cancelled: bool = False


@dataclass
class State:
    """Everything the fake Stripe holds. Accounting is immediate (Stripe's is eventual)."""

    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted_customers: set[str] = field(default_factory=set)
    events: dict[str, MeterEvent] = field(default_factory=dict)
    by_customer: dict[tuple[str, str], dict[str, MeterEvent]] = field(default_factory=dict)
    """The events by event name and customer, as a summary asks for them."""
    sessions: dict[str, float] = field(default_factory=dict)
    stream_errors: list[dict[str, Any]] = field(default_factory=list)
    notices: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def forget(self, identifier: str) -> None:
        """The event of this identifier no longer counts (refused, or replaced)."""
        with self.lock:
            event = self.events.pop(identifier, None)
            if event is not None:
                self.by_customer.get((event.event_name, event.customer), {}).pop(identifier, None)

    # thin events (v2): what a webhook notification points to

    def notice(self, event_id: str) -> dict[str, Any]:
        with self.lock:
            if event_id not in self.notices:
                raise StripeFault(404, f"No such event: '{event_id}'", code="resource_missing")
            return self.notices[event_id]

    # meters

    def create_meter(self, p: dict[str, Any]) -> dict[str, Any]:
        allow(
            p,
            {
                "display_name",
                "event_name",
                "default_aggregation",
                "customer_mapping",
                "value_settings",
                "event_time_window",
                "expand",
            },
        )
        display_name, event_name = str(need(p, "display_name")), str(need(p, "event_name"))
        if len(display_name) > 250:
            raise StripeFault(
                400, "display_name must be at most 250 characters", param="display_name"
            )
        if len(event_name) > 100:
            raise StripeFault(400, "event_name must be at most 100 characters", param="event_name")
        aggregation = need(p, "default_aggregation")
        if not isinstance(aggregation, dict) or aggregation.get("formula") not in FORMULAS:
            raise StripeFault(
                400,
                "Invalid default_aggregation[formula]: must be one of sum, count, or last",
                param="default_aggregation[formula]",
            )
        mapping = p.get(
            "customer_mapping", {"type": "by_id", "event_payload_key": "stripe_customer_id"}
        )
        if mapping.get("type") != "by_id" or not mapping.get("event_payload_key"):
            raise StripeFault(400, "Invalid customer_mapping", param="customer_mapping")
        window = p.get("event_time_window")
        if window not in (None, "hour", "day"):
            raise StripeFault(
                400,
                "Invalid event_time_window: must be one of hour or day",
                param="event_time_window",
            )
        with self.lock:
            if any(m["event_name"] == event_name for m in self.meters.values()):
                raise StripeFault(
                    400,
                    f"A meter with event_name `{event_name}` already exists.",
                    param="event_name",
                    code="resource_already_exists",
                )
            now = int(time.time())
            meter = {
                "id": new_id("mtr"),
                "object": "billing.meter",
                "created": now,
                "updated": now,
                "display_name": display_name,
                "event_name": event_name,
                "event_time_window": window,
                "livemode": False,
                "status": "active",
                "status_transitions": {"deactivated_at": None},
                "default_aggregation": {"formula": aggregation["formula"]},
                "customer_mapping": {
                    "type": "by_id",
                    "event_payload_key": mapping["event_payload_key"],
                },
                "value_settings": {
                    "event_payload_key": p.get("value_settings", {}).get(
                        "event_payload_key", "value"
                    )
                },
            }
            self.meters[str(meter["id"])] = meter
            return meter

    def meter(self, meter_id: str) -> dict[str, Any]:
        meter = self.meters.get(meter_id)
        if meter is None:
            raise StripeFault(
                404, f"No such billing meter: '{meter_id}'", param="id", code="resource_missing"
            )
        return meter

    def update_meter(self, meter_id: str, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"display_name", "expand"})
        with self.lock:
            meter = self.meter(meter_id)
            if "display_name" in p:
                meter["display_name"] = str(p["display_name"])
                meter["updated"] = int(time.time())
            return meter

    def set_status(self, meter_id: str, status: str, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"expand"})
        with self.lock:
            meter = self.meter(meter_id)
            meter["status"] = status
            meter["status_transitions"] = {
                "deactivated_at": int(time.time()) if status == "inactive" else None
            }
            meter["updated"] = int(time.time())
            return meter

    def list_meters(self, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"limit", "starting_after", "ending_before", "status", "expand"})
        items = sorted(self.meters.values(), key=lambda m: (m["created"], m["id"]), reverse=True)
        if "status" in p:
            items = [m for m in items if m["status"] == p["status"]]
        return page(items, p, "/v1/billing/meters")

    # meter events

    def record_event(self, p: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
        allow(p, {"event_name", "payload", "identifier", "timestamp"})
        now = time.time() if now is None else now
        event_name = str(need(p, "event_name"))
        payload = need(p, "payload")
        identifier = str(p.get("identifier") or new_id("evt"))
        if len(identifier) > 100:
            raise StripeFault(400, "identifier must be at most 100 characters", param="identifier")
        stamp = p.get("timestamp", int(now))
        timestamp = (
            int(stamp)
            if not isinstance(stamp, str) or stamp.isdigit()
            else int(_iso_to_unix(stamp))
        )
        if timestamp < now - MAX_AGE:
            raise StripeFault(400, "Timestamp must be within the past 35 days.", param="timestamp")
        if timestamp > now + MAX_AHEAD:
            raise StripeFault(
                400, "Timestamp must not be more than 5 minutes in the future.", param="timestamp"
            )
        with self.lock:
            meter = next(
                (
                    m
                    for m in self.meters.values()
                    if m["event_name"] == event_name and m["status"] == "active"
                ),
                None,
            )
            if meter is None:
                raise StripeFault(
                    400,
                    f"No active meter was found matching event_name `{event_name}`.",
                    param="event_name",
                )
            customer_key = meter["customer_mapping"]["event_payload_key"]
            value_key = meter["value_settings"]["event_payload_key"]
            if not isinstance(payload, dict) or customer_key not in payload:
                raise StripeFault(
                    400, f"Missing payload[{customer_key}].", param=f"payload[{customer_key}]"
                )
            if not all(isinstance(v, str) for v in payload.values()):
                raise StripeFault(400, "Payload values must be strings.", param="payload")
            if payload[customer_key] not in self.customers:
                raise StripeFault(
                    400,
                    f"No such customer: '{payload[customer_key]}'",
                    param=f"payload[{customer_key}]",
                )
            try:
                value = float(payload.get(value_key, "1"))
            except ValueError:
                raise StripeFault(
                    400, f"payload[{value_key}] must be a number.", param=f"payload[{value_key}]"
                ) from None
            previous = self.events.get(identifier)
            if previous is not None and previous.received > now - DAY:
                raise StripeFault(
                    400,
                    f"An event with identifier `{identifier}` already exists.",
                    param="identifier",
                    code="resource_already_exists",
                )
            if previous is not None:
                # Unique over a day, no longer: a repeat after is another event, and the
                # earlier one still counts (replaced, a double count went unseen: probe).
                counted = self.by_customer.get((previous.event_name, previous.customer), {})
                if counted.pop(identifier, None) is not None:
                    counted[f"{identifier}@{previous.received}"] = previous
                self.events.pop(identifier)
            event = MeterEvent(identifier, event_name, payload[customer_key], value, timestamp, now)
            self.events[identifier] = event
            self.by_customer.setdefault((event_name, event.customer), {})[identifier] = event
        return {
            "object": "billing.meter_event",
            "event_name": event_name,
            "identifier": identifier,
            "payload": payload,
            "timestamp": timestamp,
            "created": int(now),
            "livemode": False,
        }

    def stream(self, events: Any) -> None:
        """v2 stream: validated after the answer; failures land in `stream_errors`."""
        if not isinstance(events, list) or not events:
            raise StripeFault(400, "events must be a non-empty list", param="events")
        if len(events) > 100:
            raise StripeFault(400, "At most 100 events per request.", param="events")
        for event in events:
            if not isinstance(event, dict):
                raise StripeFault(400, "each event must be an object", param="events")
            allow(event, {"event_name", "payload", "identifier", "timestamp"})
        for event in events:
            try:
                self.record_event(event)
            except StripeFault as fault:
                self.stream_errors.append(
                    {"identifier": event.get("identifier"), "message": fault.message}
                )

    def adjust(self, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"event_name", "type", "cancel"})
        event_name = str(need(p, "event_name"))
        if need(p, "type") != "cancel":
            raise StripeFault(400, "Invalid type: must be cancel", param="type")
        identifier = (
            str(need(p, "cancel").get("identifier", ""))
            if isinstance(p.get("cancel"), dict)
            else ""
        )
        if not identifier:
            raise StripeFault(
                400, "Missing required param: cancel[identifier].", param="cancel[identifier]"
            )
        with self.lock:
            event = self.events.get(identifier)
            if event is None or event.event_name != event_name:
                raise StripeFault(
                    400,
                    f"No meter event with identifier `{identifier}` for event_name `{event_name}`.",
                    param="cancel[identifier]",
                )
            if event.received < time.time() - CANCEL_WINDOW:
                raise StripeFault(
                    400,
                    "Only events received in the last 24 hours can be cancelled.",
                    param="cancel[identifier]",
                )
            event.cancelled = True
        return {
            "id": new_id("mtrad"),
            "object": "billing.meter_event_adjustment",
            "event_name": event_name,
            "status": "pending",
            "type": "cancel",
            "cancel": {"identifier": identifier},
            "livemode": False,
        }

    def summaries(self, meter_id: str, p: dict[str, Any]) -> dict[str, Any]:
        allow(
            p,
            {
                "customer",
                "start_time",
                "end_time",
                "value_grouping_window",
                "limit",
                "starting_after",
                "ending_before",
                "expand",
            },
        )
        meter = self.meter(meter_id)
        customer = str(need(p, "customer"))
        start, end = integer(p, "start_time"), integer(p, "end_time")
        need(p, "start_time")
        if start % 60 or end % 60:
            raise StripeFault(
                400,
                "start_time and end_time must be aligned to minute boundaries.",
                param="start_time" if start % 60 else "end_time",
            )
        if end <= start:
            raise StripeFault(400, "end_time must be after start_time.", param="end_time")
        window = p.get("value_grouping_window")
        step = {None: end - start, "hour": 3600, "day": DAY}.get(window)
        if step is None:
            raise StripeFault(
                400,
                "Invalid value_grouping_window: must be one of day or hour",
                param="value_grouping_window",
            )
        if window is not None and (start % step or end % step):
            raise StripeFault(
                400,
                f"start_time and end_time must be aligned to {window} boundaries (UTC).",
                param="start_time",
            )
        with self.lock:
            chosen = [
                e
                for e in self.by_customer.get((meter["event_name"], customer), {}).values()
                if not e.cancelled and start <= e.timestamp < end
            ]
        items = []
        for window_start in range(start, end, step):
            inside = sorted(
                (e for e in chosen if window_start <= e.timestamp < window_start + step),
                key=lambda e: (e.timestamp, e.received),
            )
            if not inside:
                continue
            formula = meter["default_aggregation"]["formula"]
            value = {
                "sum": sum(e.value for e in inside),
                "count": float(len(inside)),
                "last": inside[-1].value,
            }[formula]
            items.append(
                {
                    "id": f"mtrusg_{meter_id}_{window_start}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": value,
                    "start_time": window_start,
                    "end_time": window_start + step,
                    "meter": meter_id,
                    "livemode": False,
                }
            )
        return page(items, p, f"/v1/billing/meters/{meter_id}/event_summaries")

    # customers

    def create_customer(self, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"name", "email", "metadata", "description", "expand"})
        metadata = p.get("metadata", {})
        if len(metadata) > 50 or any(len(k) > 40 or len(str(v)) > 500 for k, v in metadata.items()):
            raise StripeFault(
                400,
                "metadata: at most 50 keys, keys up to 40 and values up to 500 characters",
                param="metadata",
            )
        customer = {
            "id": new_id("cus"),
            "object": "customer",
            "created": int(time.time()),
            "name": p.get("name"),
            "email": p.get("email"),
            "description": p.get("description"),
            "metadata": dict(metadata),
            "livemode": False,
        }
        with self.lock:
            self.customers[str(customer["id"])] = customer
        return customer

    def customer(self, customer_id: str) -> dict[str, Any]:
        customer = self.customers.get(customer_id)
        if customer is None:
            raise StripeFault(
                404, f"No such customer: '{customer_id}'", param="id", code="resource_missing"
            )
        return customer

    def retrieve_customer(self, customer_id: str) -> dict[str, Any]:
        """A customer; a deleted one as Stripe answers it: its id and `deleted: true`."""
        if customer_id in self.deleted_customers:
            return {"id": customer_id, "object": "customer", "deleted": True}
        return self.customer(customer_id)

    def delete_customer(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            self.customer(customer_id)
            del self.customers[customer_id]
            self.deleted_customers.add(customer_id)
        return {"id": customer_id, "object": "customer", "deleted": True}

    def list_customers(self, p: dict[str, Any]) -> dict[str, Any]:
        allow(p, {"limit", "starting_after", "ending_before", "email", "expand", "created"})
        items = sorted(self.customers.values(), key=lambda c: (c["created"], c["id"]), reverse=True)
        return page([c for c in items if _created_within(c["created"], p)], p, "/v1/customers")

    # v2 sessions

    def new_session(self, _: str = "") -> dict[str, Any]:
        token = new_id("mes_tok")
        expires = time.time() + SESSION_SECONDS
        with self.lock:
            self.sessions[token] = expires
        return {
            "id": new_id("mes"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _unix_to_iso(time.time()),
            "expires_at": _unix_to_iso(expires),
            "livemode": False,
        }

    def check_session(self, token: str) -> None:
        expires = self.sessions.get(token)
        if expires is None or expires <= time.time():
            raise StripeFault(
                401,
                "The meter event session has expired; create a new one.",
                kind="temporary_session_expired",
            )

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions = {token: 0.0 for token in self.sessions}


def page(items: list[dict[str, Any]], p: dict[str, Any], url: str) -> dict[str, Any]:
    limit = integer(p, "limit", 10)
    if not 1 <= limit <= 100:
        raise StripeFault(400, "limit must be between 1 and 100", param="limit")
    ids = [item["id"] for item in items]
    if "starting_after" in p:
        if p["starting_after"] not in ids:
            raise StripeFault(
                400, f"Invalid starting_after: {p['starting_after']}", param="starting_after"
            )
        items = items[ids.index(p["starting_after"]) + 1 :]
    elif "ending_before" in p:
        if p["ending_before"] not in ids:
            raise StripeFault(
                400, f"Invalid ending_before: {p['ending_before']}", param="ending_before"
            )
        items = items[: ids.index(p["ending_before"])][-limit:]
    return {"object": "list", "url": url, "has_more": len(items) > limit, "data": items[:limit]}


def _created_within(created: int, p: dict[str, Any]) -> bool:
    """Stripe's `created` list filter: a timestamp, or any of gt, gte, lt, lte."""
    bound = p.get("created")
    if bound is None:
        return True
    if not isinstance(bound, dict):
        bound = {"eq": bound}
    allow(bound, {"eq", "gt", "gte", "lt", "lte"})
    tests = {
        "eq": lambda at: created == at,
        "gt": lambda at: created > at,
        "gte": lambda at: created >= at,
        "lt": lambda at: created < at,
        "lte": lambda at: created <= at,
    }
    try:
        return all(tests[op](int(value)) for op, value in bound.items())
    except ValueError:
        raise StripeFault(400, "Invalid integer: created", param="created") from None


def _unix_to_iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(moment))


def _iso_to_unix(text: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise StripeFault(400, f"Invalid timestamp: {text}", param="timestamp") from None
