"""The SQLite approval store: the shared contract, plus what only a file can show."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from tests.tools.approvals.conftest import StoreBackend
from tests.tools.approvals.store_contract import T0, ApprovalStoreContract, approval
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.approvals.store import ApprovalStoreUnavailable


class TestSqliteApprovalStore(ApprovalStoreContract):
    @pytest.fixture
    def backend(self, sqlite_backend: StoreBackend) -> StoreBackend:
        return sqlite_backend


async def test_approvals_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "approvals.db"
    first = SqliteApprovalStore(path)
    await first.open()
    stored = approval()
    await first.create(stored)
    await first.close()

    second = SqliteApprovalStore(path)
    await second.open()
    try:
        assert await second.get(stored.id) == stored
        assert await second.list_pending("contoso") == [stored]
    finally:
        await second.close()


async def test_approvals_past_their_retention_are_forgotten(tmp_path: Path) -> None:
    store = SqliteApprovalStore(tmp_path / "approvals.db", retention=timedelta(days=1))
    await store.open()
    try:
        ancient = approval(created_at=T0 - timedelta(days=3), ttl=timedelta(hours=1))
        recent = approval(created_at=T0 - timedelta(hours=20), ttl=timedelta(hours=1))
        await store.create(ancient)
        await store.create(recent)

        await store.create(approval())

        assert await store.get(ancient.id) is None
        assert await store.get(recent.id) == recent
    finally:
        await store.close()


async def test_a_store_that_is_not_open_says_so(tmp_path: Path) -> None:
    store = SqliteApprovalStore(tmp_path / "approvals.db")
    with pytest.raises(RuntimeError, match="not open"):
        await store.get("apr_x")


async def test_a_file_locked_by_another_writer_is_unavailable_not_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "approvals.db"
    store = SqliteApprovalStore(path, busy_timeout_s=0.05)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock, like a stuck process
        with pytest.raises(ApprovalStoreUnavailable) as caught:
            await store.create(approval())
        assert caught.value.message == "approvals cannot be reached right now; try again shortly"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()
