from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
from redis.asyncio import Redis

from inferencing.gateway.breaker import Admission, BreakerState, InProcessBreakerStore
from inferencing.gateway.redis_state import RedisBreakerStore, redis_client
from tests.inferencing.breaker_contract import (
    POLICY,
    PROBE,
    T0,
    BreakerStoreContract,
    trip,
)
from tests.support.redis_server import RedisServer


@pytest.fixture
async def other_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A second client on the same server: another replica."""
    client = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid4().hex}:breaker:"


class TestInProcessBreakerStore(BreakerStoreContract):
    @pytest.fixture
    def breaker_store(self) -> InProcessBreakerStore:
        return InProcessBreakerStore()


class TestRedisBreakerStore(BreakerStoreContract):
    @pytest.fixture
    def breaker_store(self, redis: Redis, prefix: str) -> RedisBreakerStore:
        return RedisBreakerStore(redis, prefix=prefix)


async def test_replicas_sharing_a_redis_see_one_breaker(
    redis: Redis, other_redis: Redis, prefix: str
) -> None:
    east = RedisBreakerStore(redis, prefix=prefix)
    west = RedisBreakerStore(other_redis, prefix=prefix)
    await trip(east, "gpt4o", T0)
    refused = await west.admit("gpt4o", T0 + 1, POLICY)
    assert (refused.allowed, refused.state) == (False, BreakerState.OPEN)
    assert refused.retry_in_s == pytest.approx(POLICY.open_s - 1)
    assert await west.admit("gpt4o", T0 + POLICY.open_s, POLICY) == PROBE
    assert await east.record("gpt4o", T0 + 6, POLICY, ok=True, probe=True) is (
        BreakerState.HALF_OPEN
    )
    assert await west.admit("gpt4o", T0 + 6, POLICY) == PROBE
    assert await west.record("gpt4o", T0 + 6, POLICY, ok=True, probe=True) is (BreakerState.CLOSED)
    assert await east.state("gpt4o", T0 + 6, POLICY) is BreakerState.CLOSED


async def test_concurrent_admits_in_half_open_never_exceed_the_probes(
    redis: Redis, other_redis: Redis, prefix: str
) -> None:
    replicas = [
        RedisBreakerStore(redis, prefix=prefix),
        RedisBreakerStore(other_redis, prefix=prefix),
    ]
    await trip(replicas[0], "gpt4o", T0)
    now = T0 + POLICY.open_s
    admissions = await asyncio.gather(
        *(replicas[i % 2].admit("gpt4o", now, POLICY) for i in range(60))
    )
    assert sum(a.allowed for a in admissions) == POLICY.half_open_probes
    assert all(a.probe == a.allowed for a in admissions)


async def test_idle_breakers_expire_and_reads_write_nothing(redis: Redis, prefix: str) -> None:
    store = RedisBreakerStore(redis, prefix=prefix)
    await store.admit("quiet", T0, POLICY)
    await store.state("quiet", T0, POLICY)
    assert await redis.exists(prefix + "quiet") == 0
    await store.record("busy", T0, POLICY, ok=True, probe=False)
    ttl_ms = await redis.pttl(prefix + "busy")
    assert 0 < ttl_ms <= 4 * (POLICY.window_s + 2 * POLICY.open_s) * 1000


async def test_redis_and_in_process_stores_agree_step_by_step(redis: Redis, prefix: str) -> None:
    """A long random run through both stores: every answer is identical."""
    rng = random.Random(20240607)
    reference = InProcessBreakerStore()
    shared = RedisBreakerStore(redis, prefix=prefix)
    now = T0 + 0.123456789
    in_flight: list[tuple[str, Admission]] = []
    for step in range(1500):
        now += rng.choice([0.0, 0.001, 0.37, 1.0, 2.5, 7.3])
        key = rng.choice(["a", "b"])
        if in_flight and rng.random() < 0.5:
            key, admission = in_flight.pop(rng.randrange(len(in_flight)))
            ok = rng.random() < 0.55
            expected = await reference.record(key, now, POLICY, ok=ok, probe=admission.probe)
            actual = await shared.record(key, now, POLICY, ok=ok, probe=admission.probe)
        elif rng.random() < 0.1:
            expected = await reference.state(key, now, POLICY)
            actual = await shared.state(key, now, POLICY)
        else:
            admitted = await reference.admit(key, now, POLICY)
            assert await shared.admit(key, now, POLICY) == admitted, f"step {step}"
            if admitted.allowed and rng.random() < 0.95:  # some callers die
                in_flight.append((key, admitted))
            continue
        assert actual is expected, f"step {step}"
