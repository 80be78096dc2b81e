"""Fixtures shared by the intelligence layer's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intelligence.stores.sqlite import SqliteConversationStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
    """A real SQLite conversation store in a fresh file."""
    s = SqliteConversationStore(tmp_path / "c.db")
    await s.open()
    yield s
    await s.close()
