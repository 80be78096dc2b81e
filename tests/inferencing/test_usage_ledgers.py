from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferencing.gateway.metering import (
    ERASED_USER,
    InMemoryUsageLedger,
    SqliteUsageLedger,
    UsageMeter,
    UsageRow,
    totals,
)
from inferencing.gateway.redis_state import RedisUsageLedger, ResilientUsageLedger, redis_client
from tests.inferencing.usage_contract import (
    THIS_HOUR,
    UsageLedgerContract,
    hours_ago,
    sample,
    usage,
)
from tests.support.redis_server import RedisServer, private_redis


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid4().hex}:usage:"


class TestInMemoryUsageLedger(UsageLedgerContract):
    @pytest.fixture
    def ledger(self) -> InMemoryUsageLedger:
        return InMemoryUsageLedger()


class TestSqliteUsageLedger(UsageLedgerContract):
    @pytest.fixture
    async def ledger(self, tmp_path: Path) -> AsyncIterator[SqliteUsageLedger]:
        ledger = SqliteUsageLedger(tmp_path / "usage.db")
        await ledger.open()
        yield ledger
        await ledger.aclose()


class TestRedisUsageLedger(UsageLedgerContract):
    @pytest.fixture
    async def ledger(self, redis: Redis, prefix: str) -> AsyncIterator[RedisUsageLedger]:
        ledger = RedisUsageLedger(redis, prefix=prefix)
        yield ledger
        await ledger.aclose()


class TestResilientUsageLedger(UsageLedgerContract):
    @pytest.fixture
    async def ledger(
        self, redis: Redis, prefix: str, tmp_path: Path
    ) -> AsyncIterator[ResilientUsageLedger]:
        fallback = SqliteUsageLedger(tmp_path / "usage.db")
        await fallback.open()
        ledger = ResilientUsageLedger(RedisUsageLedger(redis, prefix=prefix), fallback)
        yield ledger
        await ledger.aclose()


async def test_redis_counts_the_whole_hour_that_holds_since(redis: Redis, prefix: str) -> None:
    ledger = RedisUsageLedger(redis, prefix=prefix)
    early = usage(hours_ago(2) + timedelta(minutes=5))
    await ledger.append([early])
    since = hours_ago(2) + timedelta(minutes=30)
    assert await ledger.summarize("tenant", since) == totals([early], "tenant")


async def test_redis_replicas_add_to_the_same_totals(
    redis_server: RedisServer, redis: Redis, prefix: str
) -> None:
    other = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
    try:
        records = sample()
        await RedisUsageLedger(redis, prefix=prefix).append(records[:3])
        await RedisUsageLedger(other, prefix=prefix).append(records[3:])
        for ledger in (
            RedisUsageLedger(redis, prefix=prefix),
            RedisUsageLedger(other, prefix=prefix),
        ):
            assert await ledger.summarize("deployment", hours_ago(24)) == totals(
                records, "deployment"
            )
    finally:
        await other.aclose()


async def test_redis_hours_expire_after_the_retention(redis: Redis, prefix: str) -> None:
    ledger = RedisUsageLedger(redis, prefix=prefix, retention=timedelta(hours=3))
    kept = usage(hours_ago(1))
    await ledger.append([usage(hours_ago(5)), kept])
    assert await ledger.summarize("user", hours_ago(24)) == totals([kept], "user")
    hour_key = prefix + hours_ago(1).strftime("%Y%m%d%H")
    ttl_s = await redis.ttl(hour_key)
    assert 0 < ttl_s <= timedelta(hours=3).total_seconds()
    assert await redis.ttl(prefix + "hours") > 0
    assert await redis.exists(prefix + hours_ago(5).strftime("%Y%m%d%H")) == 0


async def test_redis_keeps_tiny_costs_exactly(redis: Redis, prefix: str) -> None:
    ledger = RedisUsageLedger(redis, prefix=prefix)
    await ledger.append([usage(THIS_HOUR, cost=0.00000041, tokens=(1, 0))] * 1000)
    assert await ledger.summarize("tenant", THIS_HOUR) == [
        UsageRow("contoso", 1000, 1000, 0, 0.00041)
    ]


# --- a person's usage: what only some ledgers can show ------------------------------------


async def test_redis_after_forget_user_no_key_names_the_person(redis: Redis, prefix: str) -> None:
    ledger = RedisUsageLedger(redis, prefix=prefix)
    await ledger.append(sample())
    assert await ledger.forget_user("contoso", "bob") == 2

    for key in await redis.keys(prefix + "*"):
        assert b"bob" not in key
        if await redis.type(key) == b"hash":
            assert not any(b'"bob"' in field for field in await redis.hkeys(key))
    assert [k for k in await redis.keys(prefix + "user:*") if b"bob" in k] == []


async def test_an_unreachable_primary_fails_the_erasure_after_the_fallback_is_done(
    tmp_path: Path,
) -> None:
    fallback = InMemoryUsageLedger()
    with private_redis() as server:
        client = redis_client(server.url, connect_timeout_s=1.0, command_timeout_s=1.0)
        try:
            ledger = ResilientUsageLedger(RedisUsageLedger(client), fallback)
            server.stop()
            await ledger.append([usage(hours_ago(1), user="bob")])  # lands in the fallback
            with pytest.raises((RedisError, OSError)):
                await ledger.forget_user("contoso", "bob")
            assert [r.user_id for r in fallback.records] == [ERASED_USER]
        finally:
            await client.aclose()


async def test_the_meter_erases_buffered_usage_too() -> None:
    ledger = InMemoryUsageLedger()
    meter = UsageMeter(ledger, flush_every_s=3600)
    await ledger.append([usage(hours_ago(2), user="bob")])
    meter.record(usage(hours_ago(1), user="bob"))
    meter.record(usage(hours_ago(1), user="carol"))

    assert await meter.forget_user("contoso", "bob") == 2
    await meter.aclose()

    assert sorted(r.user_id for r in ledger.records) == [ERASED_USER, ERASED_USER, "carol"]


async def test_the_meter_exports_buffered_usage_too() -> None:
    ledger = InMemoryUsageLedger()
    meter = UsageMeter(ledger, flush_every_s=3600)
    meter.record(usage(hours_ago(1), user="bob"))
    try:
        [detail] = await meter.user_detail("contoso", "bob")
        assert detail.calls == 1 and detail.outcome == "ok"
    finally:
        await meter.aclose()
