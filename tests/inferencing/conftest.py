"""Fixtures of the inferencing tests (the simulator comes from ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from inferencing.gateway.redis_state import redis_client
from tests.support.redis_server import RedisServer, private_redis


@dataclass(frozen=True)
class Caller:
    """Satisfies ``InferenceCaller``."""

    tenant_id: str = "contoso"
    user_id: str = "adele"


@pytest.fixture
def caller() -> Caller:
    return Caller()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for a test module (tests that stop it bring their own)."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
    yield client
    await client.aclose()
