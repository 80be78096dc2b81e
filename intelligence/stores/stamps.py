"""The one text form in which the layer's store adapters keep an instant."""

from __future__ import annotations

from datetime import UTC, datetime


def stamp(moment: datetime) -> str:
    """``moment`` as stored: UTC with microseconds, so that a store (SQLite, Cosmos DB)
    compares two of them as strings in time order."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no instant; pass a timezone-aware one")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def now_stamp() -> str:
    """The current instant, as :func:`stamp` writes it."""
    return stamp(datetime.now(UTC))
