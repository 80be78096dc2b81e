"""The Redis approval store: the shared contract on a real Redis, plus its housekeeping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
import redis.asyncio

from tests.support.redis_server import RedisServer
from tests.tools.approvals.conftest import StoreBackend
from tests.tools.approvals.store_contract import ApprovalStoreContract, approval
from tools.approvals.redis_store import RedisApprovalStore
from tools.approvals.store import ApprovalStoreUnavailable
from tools.contracts import ApprovalStatus


class TestRedisApprovalStore(ApprovalStoreContract):
    @pytest.fixture
    def backend(self, redis_backend: StoreBackend) -> StoreBackend:
        return redis_backend


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(redis_server.url)
    yield connection
    await connection.aclose()


async def test_keys_expire_after_the_approval_and_its_retention(
    client: redis.asyncio.Redis,
) -> None:
    store = RedisApprovalStore(client, "ttl:", retention=timedelta(days=2))
    stored = approval(ttl=timedelta(hours=1))
    await store.create(stored)

    kept_ms = (timedelta(hours=1) + timedelta(days=2)).total_seconds() * 1000
    record_ttl = await client.pttl(f"ttl:approval:{stored.id}")
    index_ttl = await client.pttl("ttl:pending:contoso")
    assert 0 < record_ttl <= kept_ms
    assert 0 < index_ttl <= kept_ms


async def test_ids_of_forgotten_approvals_leave_the_pending_index(
    client: redis.asyncio.Redis,
) -> None:
    store = RedisApprovalStore(client, "forgotten:")
    kept, forgotten = approval(), approval()
    await store.create(kept)
    await store.create(forgotten)
    await client.delete(f"forgotten:approval:{forgotten.id}")  # as its TTL would

    assert await store.list_pending("contoso") == [kept]
    members = await client.zrange("forgotten:pending:contoso", 0, -1)
    assert members == [kept.id.encode()]


async def test_a_client_decoding_responses_works_the_same(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store = RedisApprovalStore(client, "decoded:")
        stored = approval()
        await store.create(stored)
        assert await store.get(stored.id) == stored
        assert await store.list_pending("contoso") == [stored]
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_unavailable() -> None:
    with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url, socket_connect_timeout=1.0)
        store = RedisApprovalStore(client, "down:")
        server.stop()
        try:
            operations: list[Callable[[], Awaitable[object]]] = [
                lambda: store.create(approval()),
                lambda: store.get("apr_x"),
                lambda: store.transition(
                    "apr_x", {ApprovalStatus.APPROVED}, ApprovalStatus.EXECUTED
                ),
                lambda: store.set_outcome("apr_x", {"ok": True, "output": None}),
                lambda: store.list_pending("contoso"),
            ]
            for operation in operations:
                with pytest.raises(ApprovalStoreUnavailable):
                    await operation()
        finally:
            await client.aclose()


def test_an_empty_prefix_is_refused(client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisApprovalStore(client, "")
