"""Two gateway replicas sharing breakers through a real Redis, and Redis going away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from inferencing.contracts import ChatMessage, ChatRequest, ProviderUnavailable, Role
from inferencing.gateway.breaker import BreakerState, InProcessBreakerStore
from inferencing.gateway.core import Gateway
from inferencing.gateway.redis_state import RedisBreakerStore, ResilientBreakerStore, redis_client
from inferencing.gateway.routing import Deployment
from inferencing.settings import BreakerSettings, DeploymentSettings, RetrySettings
from inferencing.tokens import ApproximateCounter
from tests.fakes import ScriptedChatModel
from tests.inferencing.conftest import Caller
from tests.support.redis_server import RedisServer, private_redis

QUESTION = ChatRequest([ChatMessage(Role.USER, "How many days of leave do I get?")])
POLICY = BreakerSettings(failure_rate=0.5, min_calls=4, window_s=60, open_s=30, half_open_probes=2)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with private_redis() as server:
        yield server


class Replica:
    """One Lamina replica's gateway: its own models, its own Redis connection."""

    def __init__(self, url: str, now: list[float]) -> None:
        self.redis = redis_client(url, connect_timeout_s=0.2, command_timeout_s=0.2)
        self.store = ResilientBreakerStore(
            RedisBreakerStore(self.redis), InProcessBreakerStore(), retry_after_s=60
        )
        self.primary = ScriptedChatModel(name="primary")
        self.gateway = Gateway(
            [
                Deployment(DeploymentSettings(name="primary", priority=1), self.primary),
                Deployment(DeploymentSettings(name="backup"), ScriptedChatModel(name="backup")),
            ],
            counter=ApproximateCounter(),
            breakers=self.store,
            breaker=POLICY,
            retry=RetrySettings(max_attempts=2, base_delay_s=0.0),
            clock=lambda: now[0],
        )

    async def aclose(self) -> None:
        await self.gateway.aclose()
        await self.redis.aclose()


@pytest.fixture
async def replicas(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[Replica, Replica, list[float]]]:
    now = [time.time()]
    first, second = Replica(redis_server.url, now), Replica(redis_server.url, now)
    yield first, second, now
    await first.aclose()
    await second.aclose()


def failing(count: int) -> list[ProviderUnavailable | object]:
    return [ProviderUnavailable("down", retryable=True) for _ in range(count)]


async def test_a_breaker_opened_by_one_replica_protects_the_other(
    replicas: tuple[Replica, Replica, list[float]], caller: Caller
) -> None:
    first, second, now = replicas
    first.primary.replies = failing(4)  # type: ignore[assignment]
    for _ in range(4):
        await first.gateway.complete(QUESTION, caller)
    assert (await second.gateway.breaker_states())["primary"] is BreakerState.OPEN

    response = await second.gateway.complete(QUESTION, caller)
    assert response.route is not None
    assert response.route.attempts == (("primary", "breaker open"), ("backup", "ok"))
    assert second.primary.requests == []  # the second replica never called it

    now[0] += POLICY.open_s  # half-open: one good probe from each replica closes it
    for replica in (second, first):
        response = await replica.gateway.complete(QUESTION, caller)
        assert response.route is not None and response.route.deployment == "primary"
    assert (await first.gateway.breaker_states())["primary"] is BreakerState.CLOSED
    assert not first.store.degraded and not second.store.degraded


async def test_with_redis_stopped_requests_are_served_and_none_hangs(
    replicas: tuple[Replica, Replica, list[float]],
    redis_server: RedisServer,
    caller: Caller,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, _ = replicas
    await first.gateway.complete(QUESTION, caller)
    redis_server.stop()
    caplog.set_level(logging.WARNING)

    async with asyncio.timeout(10):  # generous: each Redis call gives up after 0.2 s
        results = await asyncio.gather(
            *(r.gateway.complete(QUESTION, caller) for r in (first, second) for _ in range(20))
        )
    assert all(r.message.content for r in results)
    assert first.store.degraded and second.store.degraded
    assert first.store.describe()["breaker_state"].startswith("in-process")
    assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
