"""Redis going away and coming back: the gateway keeps answering, from local state."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from inferencing.gateway.breaker import Admission, BreakerState, InProcessBreakerStore
from inferencing.gateway.metering import InMemoryUsageLedger, totals
from inferencing.gateway.redis_state import (
    RedisBreakerStore,
    RedisUsageLedger,
    ResilientBreakerStore,
    ResilientUsageLedger,
    redis_client,
)
from inferencing.settings import BreakerSettings
from tests.inferencing.breaker_contract import POLICY, T0, trip
from tests.inferencing.usage_contract import hours_ago, usage
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer, private_redis

LOGGER = "inferencing.gateway.redis_state"
RETRY_AFTER_S = 5.0
CLOSED = Admission(True, BreakerState.CLOSED)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingBreakerStore:
    """Passes calls through, counting them."""

    def __init__(self, inner: RedisBreakerStore) -> None:
        self.inner = inner
        self.calls = 0

    async def admit(self, key: str, now: float, policy: BreakerSettings) -> Admission:
        self.calls += 1
        return await self.inner.admit(key, now, policy)

    async def record(
        self, key: str, now: float, policy: BreakerSettings, *, ok: bool, probe: bool
    ) -> BreakerState:
        self.calls += 1
        return await self.inner.record(key, now, policy, ok=ok, probe=probe)

    async def state(self, key: str, now: float, policy: BreakerSettings) -> BreakerState:
        self.calls += 1
        return await self.inner.state(key, now, policy)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop and start."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url, connect_timeout_s=0.5, command_timeout_s=0.5)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid4().hex}:"


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


async def test_breakers_fall_back_while_redis_is_down_and_return_after_retry_after_s(
    redis_server: RedisServer, redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = FakeClock()
    primary = CountingBreakerStore(RedisBreakerStore(redis, prefix=prefix))
    store = ResilientBreakerStore(
        primary, InProcessBreakerStore(), retry_after_s=RETRY_AFTER_S, clock=clock
    )
    await trip(store, "gpt4o", T0)
    assert not store.degraded
    assert store.describe() == {"breaker_state": "redis"}
    assert await redis.exists(prefix + "gpt4o") == 1

    redis_server.stop()
    async with asyncio.timeout(5):
        # The in-process store never saw the failures: its breaker is closed.
        assert await store.admit("gpt4o", T0 + 1, POLICY) == CLOSED
        assert store.degraded
        calls = primary.calls
        for _ in range(20):
            assert await store.admit("gpt4o", T0 + 1, POLICY) == CLOSED
        assert await store.record("gpt4o", T0 + 1, POLICY, ok=False, probe=False) is (
            BreakerState.CLOSED
        )
        assert primary.calls == calls, "Redis is not tried again before retry_after_s"
    [warning] = warnings_in(caplog)
    assert warning.startswith("gateway state: Redis unreachable, using in-process state")
    assert store.describe()["breaker_state"].startswith("in-process (redis unreachable since ")

    clock.now += RETRY_AFTER_S  # Redis is still down: one try, then another wait
    async with asyncio.timeout(5):
        assert await store.state("gpt4o", T0 + 1, POLICY) is BreakerState.CLOSED
    assert primary.calls == calls + 1
    assert store.degraded
    assert len(warnings_in(caplog)) == 1, "one warning per outage"

    redis_server.start()  # empty: it kept nothing
    clock.now += RETRY_AFTER_S - 0.5
    assert await store.admit("gpt4o", T0 + 2, POLICY) == CLOSED
    assert store.degraded
    clock.now += 0.5
    async with asyncio.timeout(5):
        await trip(store, "gpt4o", T0 + 2)
    assert not store.degraded
    assert store.describe() == {"breaker_state": "redis"}
    assert await redis.exists(prefix + "gpt4o") == 1
    assert any(
        r.levelno == logging.INFO and "reachable again" in r.getMessage() for r in caplog.records
    )


async def test_usage_falls_back_while_redis_is_down_and_returns_after_retry_after_s(
    redis_server: RedisServer, redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = FakeClock()
    fallback = InMemoryUsageLedger()
    ledger = ResilientUsageLedger(
        RedisUsageLedger(redis, prefix=prefix),
        fallback,
        retry_after_s=RETRY_AFTER_S,
        clock=clock,
    )
    before, during, after = (usage(hours_ago(1), user=u) for u in ("before", "during", "after"))
    await ledger.append([before])
    assert await ledger.summarize("user", hours_ago(2)) == totals([before], "user")
    assert fallback.records == []

    redis_server.stop()
    async with asyncio.timeout(5):
        await ledger.append([during])
        assert ledger.degraded
        assert fallback.records == [during]
        assert await ledger.summarize("user", hours_ago(2)) == totals([during], "user")
    [warning] = warnings_in(caplog)
    assert warning.startswith("gateway state: Redis unreachable, using in-process state")
    assert ledger.describe()["usage_ledger"].startswith("in-process (redis unreachable since ")

    redis_server.start()  # empty: it kept nothing
    clock.now += RETRY_AFTER_S
    async with asyncio.timeout(5):
        await ledger.append([after])
    assert not ledger.degraded
    assert ledger.describe() == {"usage_ledger": "redis"}
    assert fallback.records == [during]
    # Each record is in exactly one ledger; the summary adds them up.
    assert await ledger.summarize("user", hours_ago(2)) == totals([during, after], "user")
    await ledger.aclose()


async def test_connecting_where_nothing_listens_fails_fast() -> None:
    client = redis_client(
        f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5, command_timeout_s=0.5
    )
    try:
        async with asyncio.timeout(5):
            with pytest.raises(RedisConnectionError):
                await client.ping()
    finally:
        await client.aclose()


async def test_a_redis_that_never_answers_times_out(prefix: str) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = redis_client(
            f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.3, command_timeout_s=0.3
        )
        try:
            async with asyncio.timeout(5):
                with pytest.raises(RedisError):
                    await client.ping()
                store = ResilientBreakerStore(
                    RedisBreakerStore(client, prefix=prefix), InProcessBreakerStore()
                )
                assert await store.admit("gpt4o", T0, POLICY) == CLOSED
                assert store.degraded
        finally:
            await client.aclose()


async def test_a_connection_the_server_dropped_is_replaced_not_taken_for_an_outage(
    redis: Redis, prefix: str
) -> None:
    store = ResilientBreakerStore(RedisBreakerStore(redis, prefix=prefix), InProcessBreakerStore())
    await trip(store, "gpt4o", T0)
    # As a server-side idle timeout or a proxy would, some time before the next call.
    await redis.client_kill_filter(skipme=False)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        refused = await store.admit("gpt4o", T0 + 1, POLICY)
    assert (refused.allowed, refused.state) == (False, BreakerState.OPEN)
    assert not store.degraded
