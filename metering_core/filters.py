"""Dimension filters written as text, `key<separator>value` per value (the CLI's
`--filter region=eu`, the service's `filter=region:eu`), read the same way everywhere."""

from __future__ import annotations

from collections.abc import Iterable

from metering_core.errors import ValidationError

__all__ = ["parse_filters"]


def parse_filters(given: Iterable[str] | None, separator: str, name: str) -> dict[str, list[str]]:
    """`["region:eu", "region:us", "plan:pro"]` as `{"region": ["eu", "us"], "plan":
    ["pro"]}`: the key ends at the first separator; a value given twice is kept once. An
    item without a key or a separator is refused, naming `name` (the option or parameter)."""
    filters: dict[str, list[str]] = {}
    for item in given or ():
        key, found, value = item.partition(separator)
        if not found or not key:
            raise ValidationError(
                f"{name}={item!r} must be key{separator}value "
                f"(a dimension, {separator!r}, one of its values)",
                field="filter",
                value=item,
            )
        values = filters.setdefault(key, [])
        if value not in values:
            values.append(value)
    return filters
