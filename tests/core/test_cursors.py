"""Pages and their cursors at their edges: the first and last sequence a cursor can name,
and the page sizes on either side of the limits."""

from __future__ import annotations

import base64

import pytest

from metering_core import Metering, ValidationError
from metering_core.cursors import check_limit, decode_cursor, encode_cursor


def cursor_text(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("sequence", [0, 1, 126, 2**63 - 1])
def test_every_sequence_a_store_can_hold_round_trips(sequence: int) -> None:
    assert decode_cursor(encode_cursor(sequence)) == sequence


def test_no_cursor_is_the_first_page() -> None:
    assert decode_cursor(None) == -1


@pytest.mark.parametrize("text", [f"m{2**63}", "m-1", "m", "x5", "m1.5"])
def test_a_cursor_naming_no_sequence_a_store_holds_is_refused(text: str) -> None:
    with pytest.raises(ValidationError) as refused:
        decode_cursor(cursor_text(text))
    assert (refused.value.field, refused.value.value) == ("cursor", cursor_text(text))


@pytest.mark.parametrize("cursor", ["not base64!", "\u00e9", "gA=="])
def test_a_cursor_that_is_not_ours_is_refused(cursor: str) -> None:
    with pytest.raises(ValidationError, match="is not a cursor this provider gave"):
        decode_cursor(cursor)


@pytest.mark.parametrize("limit", [1, 2, 99, 100])
def test_limits_from_1_to_100_are_taken(limit: int) -> None:
    check_limit(limit)


@pytest.mark.parametrize("limit", [-1, 0, 101, 1000])
def test_limits_outside_1_to_100_are_refused_naming_the_field(limit: int) -> None:
    with pytest.raises(ValidationError, match=f"limit={limit} must be from 1 to 100") as refused:
        check_limit(limit)
    assert (refused.value.field, refused.value.value) == ("limit", limit)


@pytest.mark.parametrize("provider", ["memory", "sql"])
def test_pages_of_one_walk_every_meter_once_from_the_first(provider: str, tmp_path: object) -> None:
    """Pages of one: the first meter's cursor names sequence 0 on memory."""
    options = {"url": f"sqlite:///{tmp_path}/store.db"} if provider == "sql" else {}
    with Metering(provider, **options) as m:
        made = [m.create_meter(event_name=f"m{i}").id for i in range(3)]
        seen, cursor = [], None
        while True:
            page = m.fetch_all_meters(limit=1, cursor=cursor)
            seen += [meter.id for meter in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == made
        assert [meter.id for meter in m.fetch_all_meters(limit=100).items] == made
