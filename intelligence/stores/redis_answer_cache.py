"""The answer cache's entries in Redis, shared by every replica.

A key scope is three keys with one hash tag, so they live on one cluster slot:

- ``<prefix>{<scope>}:v`` — hash: entry id → created_at (float64) + question vector
  (float32), little-endian bytes;
- ``<prefix>{<scope>}:a`` — hash: entry id → the cached answer, JSON;
- ``<prefix>{<scope>}:t`` — sorted set: entry id by created_at, for expiry and eviction.

Plain Redis 7 has no vector search, so a lookup reads the scope's vectors (bounded
by ``max_entries``) and compares them here; only the best entry's answer is read,
and only when it is similar enough. ``put`` is one Lua script: insert, drop expired
and surplus entries, refresh the keys' TTL. A scope nobody writes to expires whole.

When Redis fails, calls raise :class:`~intelligence.answer_cache.AnswerCacheUnavailable`
(the cache counts a miss) and, for ``retry_after_s``, fail at once without trying,
so a dead Redis does not add a connect timeout to every turn.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from intelligence.answer_cache import (
    AnswerCacheUnavailable,
    CachedAnswer,
    CacheEntry,
    Clock,
    Nearest,
    QueryVector,
    float32,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_ANSWER = TypeAdapter(CachedAnswer)
_CREATED = struct.Struct("<d")
_UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

_PUT = """
local vectors, answers, order = KEYS[1], KEYS[2], KEYS[3]
local id, created_at = ARGV[1], tonumber(ARGV[4])
local max_entries, expired_before, ttl_ms = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
redis.call('HSET', vectors, id, ARGV[2])
redis.call('HSET', answers, id, ARGV[3])
redis.call('ZADD', order, created_at, id)
local gone = redis.call('ZRANGEBYSCORE', order, '-inf', '(' .. expired_before)
local surplus = redis.call('ZCARD', order) - #gone - max_entries
if surplus > 0 then
  for _, old in ipairs(redis.call('ZRANGE', order, #gone, #gone + surplus - 1)) do
    table.insert(gone, old)
  end
end
for _, old in ipairs(gone) do
  redis.call('HDEL', vectors, old)
  redis.call('HDEL', answers, old)
  redis.call('ZREM', order, old)
end
redis.call('PEXPIRE', vectors, ttl_ms)
redis.call('PEXPIRE', answers, ttl_ms)
redis.call('PEXPIRE', order, ttl_ms)
return #gone
"""


def pack_vector(created_at: float, vector: Sequence[float]) -> bytes:
    values = float32(vector)
    if sys.byteorder == "big":  # stored little-endian whatever the replica's CPU
        values.byteswap()
    return _CREATED.pack(created_at) + values.tobytes()


def unpack_vector(blob: bytes) -> tuple[float, array[float]]:
    (created_at,) = _CREATED.unpack_from(blob)
    values = array("f")
    values.frombytes(blob[_CREATED.size :])
    if sys.byteorder == "big":
        values.byteswap()
    return created_at, values


class RedisAnswerCacheStore:
    """An :class:`~intelligence.answer_cache.AnswerCacheStore` in Redis.

    The client belongs to the caller (the composition root builds it with short
    connect and command timeouts, and closes it).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "lamina:answer-cache:",
        retry_after_s: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._put = client.register_script(_PUT)
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._retry_at: float | None = None

    def _keys(self, scope: str) -> tuple[str, str, str]:
        base = f"{self._prefix}{{{scope}}}"
        return f"{base}:v", f"{base}:a", f"{base}:t"

    def describe(self) -> dict[str, str]:
        return {"answer_cache": "redis" if self._retry_at is None else "unavailable"}

    async def nearest(
        self,
        scope: str,
        vector: Sequence[float],
        *,
        min_similarity: float,
        now: float,
        ttl_s: float,
    ) -> Nearest | None:
        vectors_key, answers_key, _ = self._keys(scope)
        stored = await self._call(lambda: self._client.hgetall(vectors_key))
        query = QueryVector(vector)
        best: tuple[float, str, array[float]] | None = None
        for field, blob in stored.items():
            entry_id = field.decode() if isinstance(field, bytes) else field
            created_at, values = unpack_vector(blob if isinstance(blob, bytes) else blob.encode())
            if created_at < now - ttl_s:
                continue  # expired; the next put removes it
            similarity = query.similarity(values)
            if best is None or similarity > best[0]:
                best = (similarity, entry_id, values)
        if best is None:
            return None
        similarity, entry_id, values = best
        if similarity < min_similarity:
            return Nearest(similarity, None)
        raw = await self._call(lambda: self._client.hget(answers_key, entry_id))
        if raw is None:  # deleted since the vectors were read
            return Nearest(similarity, None)
        answer = _ANSWER.validate_json(raw)
        return Nearest(similarity, CacheEntry(entry_id, values, answer))

    async def put(
        self, scope: str, entry: CacheEntry, *, max_entries: int, now: float, ttl_s: float
    ) -> None:
        created_at = entry.answer.created_at
        await self._call(
            lambda: self._put(
                keys=list(self._keys(scope)),
                args=[
                    entry.id,
                    pack_vector(created_at, entry.vector),
                    _ANSWER.dump_json(entry.answer),
                    repr(created_at),
                    max_entries,
                    repr(now - ttl_s),
                    max(1, math.ceil(ttl_s * 1000)),
                ],
            )
        )

    async def delete(self, scope: str, entry_id: str) -> None:
        vectors_key, answers_key, order_key = self._keys(scope)

        async def remove() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(vectors_key, entry_id)
                pipe.hdel(answers_key, entry_id)
                pipe.zrem(order_key, entry_id)
                await pipe.execute()

        await self._call(remove)

    async def _call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        if self._retry_at is not None and self._clock() < self._retry_at:
            raise AnswerCacheUnavailable("Redis is unreachable")
        try:
            result = await operation()
        except _UNREACHABLE as exc:
            if self._retry_at is None:
                log.warning(
                    "answer cache: Redis unreachable, every lookup is a miss (%s: %s)",
                    type(exc).__name__,
                    exc,
                )
            self._retry_at = self._clock() + self._retry_after_s
            raise AnswerCacheUnavailable("Redis is unreachable") from exc
        if self._retry_at is not None:
            self._retry_at = None
            log.info("answer cache: Redis reachable again")
        return result
