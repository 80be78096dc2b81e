"""The ``since`` of usage and audit queries: spans, ISO dates, and clear refusals."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from inferencing.gateway.metering import parse_since

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", datetime(2026, 11, 14, 12, 0, tzinfo=UTC)),
        ("24h", datetime(2026, 11, 20, 12, 0, tzinfo=UTC)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
    ],
)
def test_spans_and_dates(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7y", "2026-13-01"])
def test_what_cannot_be_read_is_a_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_since(text, NOW)
