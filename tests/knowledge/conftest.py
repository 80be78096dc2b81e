"""Fixtures shared by the knowledge tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    """An empty embedded index in the test's own folder, closed afterwards (a module
    that needs another index defines its own ``index``)."""
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    yield index
    await index.close()
