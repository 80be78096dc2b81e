from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from redis.asyncio import Redis

from inferencing.gateway.metering import InMemoryUsageLedger, SqliteUsageLedger, UsageRow, totals
from inferencing.gateway.redis_state import RedisUsageLedger, redis_client
from tests.inferencing.usage_contract import (
    THIS_HOUR,
    UsageLedgerContract,
    hours_ago,
    sample,
    usage,
)
from tests.support.redis_server import RedisServer


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
