"""Choosing and opening the approval store a deployment's settings ask for."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from tools.approvals.store import ApprovalStore
from tools.settings import ApprovalSettings

if TYPE_CHECKING:
    import redis.asyncio


async def open_approval_store(
    settings: ApprovalSettings,
    *,
    data_dir: Path,
    redis_client: redis.asyncio.Redis | None,
    stack: AsyncExitStack,
) -> ApprovalStore:
    """The store ``settings.backend`` names, opened, its closing pushed on ``stack``.

    ``auto`` means Redis when the deployment has one (``redis_client`` given, from
    ``LAMINA_REDIS__URL``), else SQLite at ``settings.path`` or
    ``<data_dir>/approvals.db``. The Redis client stays the caller's to close.
    """
    backend = settings.backend
    if backend == "auto":
        backend = "sqlite" if redis_client is None else "redis"
    if backend == "redis":
        if redis_client is None:
            raise ValueError(
                "LAMINA_TOOLS__APPROVALS__BACKEND is 'redis' but no Redis is configured:"
                " set LAMINA_REDIS__URL"
            )
        from tools.approvals.redis_store import RedisApprovalStore

        return RedisApprovalStore(redis_client, settings.redis_prefix)

    from tools.approvals.sqlite_store import SqliteApprovalStore

    store = SqliteApprovalStore(settings.path or data_dir / "approvals.db")
    await store.open()
    stack.push_async_callback(store.close)
    return store
