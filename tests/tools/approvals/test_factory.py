"""Choosing the approval store from the settings, as the composition root does."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import redis.asyncio

from tests.support.redis_server import RedisServer
from tests.tools.approvals.store_contract import approval
from tools.approvals.factory import open_approval_store
from tools.approvals.redis_store import RedisApprovalStore
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.settings import ApprovalSettings


async def test_auto_without_redis_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        store = await open_approval_store(
            ApprovalSettings(), data_dir=tmp_path, redis_client=None, stack=stack
        )
        assert isinstance(store, SqliteApprovalStore)
        assert store.path == tmp_path / "approvals.db"
        await store.create(approval())  # opened

    with pytest.raises(RuntimeError, match="not open"):
        await store.get("apr_x")  # and closed with the stack


async def test_sqlite_at_the_configured_path(tmp_path: Path) -> None:
    settings = ApprovalSettings(backend="sqlite", path=tmp_path / "elsewhere" / "a.db")
    async with AsyncExitStack() as stack:
        store = await open_approval_store(
            settings, data_dir=tmp_path, redis_client=None, stack=stack
        )
        assert isinstance(store, SqliteApprovalStore)
        assert store.path == tmp_path / "elsewhere" / "a.db"


async def test_auto_with_redis_is_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with AsyncExitStack() as stack:
            settings = ApprovalSettings(redis_prefix="factory:")
            store = await open_approval_store(
                settings, data_dir=tmp_path, redis_client=client, stack=stack
            )
            assert isinstance(store, RedisApprovalStore)
            stored = approval()
            await store.create(stored)
        assert await client.exists(f"factory:approval:{stored.id}") == 1
    finally:
        await client.aclose()


async def test_redis_asked_for_but_not_configured_fails_at_start_up(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        with pytest.raises(ValueError, match="LAMINA_REDIS__URL"):
            await open_approval_store(
                ApprovalSettings(backend="redis"), data_dir=tmp_path, redis_client=None, stack=stack
            )
