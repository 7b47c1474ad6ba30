"""Opaque page cursors for providers that list in a sequence order (memory, sql): the
position after which the next page starts, and the check of the limit. Meters are listed
by one sequence number; stored events by (timestamp, id), a key that a database index
walks from any page as cheaply as from the first. Events are never keyed by the store's
sequence: it counts every tenant's events, and a tenant reading the numbers between two
of its own would learn how much the others sent. Ids compare by code point (bytes of
UTF-8), the same in Python, SQLite and PostgreSQL's "C" collation."""

from __future__ import annotations

import base64
import binascii

from metering_core.errors import ValidationError

__all__ = [
    "check_limit",
    "decode_cursor",
    "decode_event_cursor",
    "encode_cursor",
    "encode_event_cursor",
]


def encode_cursor(sequence: int) -> str:
    return base64.urlsafe_b64encode(f"m{sequence}".encode()).decode()


def decode_cursor(cursor: str | None) -> int:
    """The sequence a cursor names (-1 for the first page); refused if not one we gave."""
    if cursor is None:
        return -1
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        if text.startswith("m") and 0 <= int(text[1:]) < 2**63:
            return int(text[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ValidationError(
        f"cursor={cursor!r} is not a cursor this provider gave", field="cursor", value=cursor
    )


def encode_event_cursor(micros: int, event_id: str) -> str:
    return base64.urlsafe_b64encode(f"t{micros}.{event_id}".encode()).decode()


def decode_event_cursor(cursor: str | None) -> tuple[int, str] | None:
    """The (timestamp, event id) after which a page of events starts (None: the first);
    refused if not one we gave."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        micros, _, event_id = text[1:].partition(".")
        if text.startswith("t") and abs(int(micros)) < 2**63 and _identifier(event_id):
            return int(micros), event_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ValidationError(
        f"cursor={cursor!r} is not a cursor this provider gave", field="cursor", value=cursor
    )


# "t": a cursor of (time, id). Those of (time, seq) began "e"; one given back after an
# upgrade is refused, never read as an id (it would repeat or skip that time's events).


def _identifier(text: str) -> bool:
    return 1 <= len(text) <= 100 and "\x00" not in text


def check_limit(limit: int) -> None:
    if not 1 <= limit <= 100:
        raise ValidationError(f"limit={limit!r} must be from 1 to 100", field="limit", value=limit)
