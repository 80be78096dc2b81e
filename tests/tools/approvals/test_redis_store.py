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
from tools.approvals.store import ApprovalChanges, ApprovalStoreUnavailable
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


async def test_a_persons_index_names_no_one_and_expires_with_their_last_approval(
    client: redis.asyncio.Redis,
) -> None:
    store = RedisApprovalStore(client, "person:", retention=timedelta(days=2))
    first = approval(user="adele", ttl=timedelta(hours=1))
    longer = approval(user="megan", ttl=timedelta(hours=5))
    await store.create(first)
    await store.create(longer)
    await store.transition(
        longer.id, {ApprovalStatus.PENDING}, ApprovalStatus.APPROVED, decided_by_adele()
    )

    indexes = sorted(k.decode() for k in await client.keys("person:user:*"))
    assert len(indexes) == 2
    assert not any("adele" in key or "megan" in key or "contoso" in key for key in indexes)
    longest_ms = (timedelta(hours=5) + timedelta(days=2)).total_seconds() * 1000
    for key in indexes:
        assert 0 < await client.pttl(key) <= longest_ms


async def test_after_forget_user_no_key_holds_the_person(client: redis.asyncio.Redis) -> None:
    store = RedisApprovalStore(client, "erase:")
    mine, megans = approval(user="adele"), approval(user="megan")
    await store.create(mine)
    await store.create(megans)
    await store.transition(
        megans.id, {ApprovalStatus.PENDING}, ApprovalStatus.APPROVED, decided_by_adele()
    )

    assert await store.forget_user("contoso", "adele") == 2

    for key in await client.keys("erase:*"):
        kind = await client.type(key)
        held = await client.hgetall(key) if kind == b"hash" else await client.zrange(key, 0, -1)
        assert b"adele" not in repr(held).encode()
        assert mine.id.encode() not in repr(held).encode()


def decided_by_adele() -> ApprovalChanges:
    return ApprovalChanges(decided_by="adele")


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
                lambda: store.forget_user("contoso", "adele"),
                lambda: store.of_user("contoso", "adele"),
            ]
            for operation in operations:
                with pytest.raises(ApprovalStoreUnavailable):
                    await operation()
        finally:
            await client.aclose()


def test_an_empty_prefix_is_refused(client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisApprovalStore(client, "")
