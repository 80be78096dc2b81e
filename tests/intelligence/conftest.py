"""Fixtures shared by the intelligence layer's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intelligence.stores.sqlite import SqliteConversationStore
from tests.support.lifecycle import opened


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
    """A real SQLite conversation store in a fresh file."""
    async with opened(SqliteConversationStore(tmp_path / "c.db")) as s:
        yield s
