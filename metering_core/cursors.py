"""Opaque page cursors for providers that list in a sequence order (memory, sql): the
position after which the next page starts, and the check of the limit. Meters are listed
by one sequence number; stored events by (timestamp, sequence), a key that a database
index walks from any page as cheaply as from the first."""

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


def encode_event_cursor(micros: int, sequence: int) -> str:
    return base64.urlsafe_b64encode(f"e{micros}.{sequence}".encode()).decode()


def decode_event_cursor(cursor: str | None) -> tuple[int, int] | None:
    """The (timestamp, sequence) after which a page of events starts (None: the first);
    refused if not one we gave."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        micros, _, sequence = text[1:].partition(".")
        if text.startswith("e") and abs(int(micros)) < 2**63 and 0 <= int(sequence) < 2**63:
            return int(micros), int(sequence)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ValidationError(
        f"cursor={cursor!r} is not a cursor this provider gave", field="cursor", value=cursor
    )


def check_limit(limit: int) -> None:
    if not 1 <= limit <= 100:
        raise ValidationError(f"limit={limit!r} must be from 1 to 100", field="limit", value=limit)
