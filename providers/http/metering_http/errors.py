"""HTTP answers and transport failures, as the core's exceptions (by the core's one table)."""

from __future__ import annotations

import httpx

from metering_core.errors import MeteringError, ProviderUnavailableError, error_from_wire

PROVIDER = "http"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def error_from_response(response: httpx.Response, operation: str) -> MeteringError:
    """The exception an error answer stands for. A body in the service's error shape gives
    the type and message; any other body (a proxy's page, a gateway echoing headers) is
    never copied into the message: only its status and size are."""
    try:
        body = response.json()["error"]
        kind, message, field = str(body["type"]), str(body["message"]), body.get("field")
    except (ValueError, KeyError, TypeError):
        kind, field = "", None
        message = (
            f"HTTP {response.status_code} from the metering service, not in its error shape "
            f"({len(response.content)} bytes, not shown)"
        )
    return error_from_wire(
        kind,
        _without_credential(message, response),
        provider=PROVIDER,
        operation=operation,
        status=response.status_code,
        field=field if isinstance(field, str) else None,
        retry_after=_retry_after(response),
    )


def _without_credential(message: str, response: httpx.Response) -> str:
    """The message without the key the request carried: a service (or a proxy answering
    in its shape) that echoes the request's Authorization back would put the key in every
    log line and exception that quotes the answer (probe)."""
    try:
        sent = response.request.headers.get("Authorization", "")
    except RuntimeError:  # an answer made without a request (tests)
        return message
    token = sent.partition(" ")[2]
    # the token alone only when long enough to be no word of the message ("admin")
    for credential in (sent, token if len(token) >= SHORTEST_MASKED else ""):
        if credential:
            message = message.replace(credential, "**********")
    return message


SHORTEST_MASKED = 8
"""Keys shorter than this are masked only with their scheme ("Bearer k"): alone, every
"k" of a message would go."""


def error_from_transport(
    exc: httpx.TransportError | httpx.DecodingError,
) -> ProviderUnavailableError:
    """An exchange that failed on the way, or whose answer could not be decoded: the
    service may have stored the events, so the delivery is retried (ids dedupe it)."""
    return ProviderUnavailableError(
        f"metering service unreachable: {type(exc).__name__}: {exc}", provider=PROVIDER
    )
