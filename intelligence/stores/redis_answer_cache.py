"""The answer cache's entries in Redis, shared by every replica.

A key scope is up to four keys with one hash tag, so they live on one cluster slot:

- ``<prefix>{<scope>}:v`` — hash: entry id → created_at (float64) + question vector
  (float32), little-endian bytes;
- ``<prefix>{<scope>}:a`` — hash: entry id → the cached answer, JSON;
- ``<prefix>{<scope>}:o`` — hash: entry id → whose turn stored it, JSON
  ``[tenant, user]`` (entries without an owner have none);
- ``<prefix>{<scope>}:t`` — sorted set: entry id by created_at, for expiry and eviction.

Each person whose turns stored entries has an index, so that erasing their data
never scans the keyspace: ``<prefix>user:<digest of tenant and user>`` — a sorted set
of ``[scope, entry id]`` (JSON) by created_at. It is written before the entry, so no
stored entry is missing from it, and it outlives every entry it names: an entry leaves
its scope at the latest one TTL after it expired (the next write to the scope drops
it; a scope nobody writes to expires whole), so the index keeps members for two TTLs
and expires two TTLs after its last write. Members of entries gone by eviction are
skipped when read.

Plain Redis 7 has no vector search, so a lookup reads the scope's vectors (bounded
by ``max_entries``) and compares them here; only the best entry's answer is read,
and only when it is similar enough. ``put`` is one Lua script: insert, drop expired
and surplus entries, refresh the keys' TTL. A scope nobody writes to expires whole.

When Redis fails, calls raise :class:`~intelligence.answer_cache.AnswerCacheUnavailable`
(the cache counts a miss) and, for ``retry_after_s``, fail at once without trying,
so a dead Redis does not add a connect timeout to every turn.
"""

from __future__ import annotations

import hashlib
import json
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
    CacheOwner,
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
local vectors, answers, order, owners = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, created_at = ARGV[1], tonumber(ARGV[4])
local max_entries, expired_before, ttl_ms = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local owner = ARGV[8]
redis.call('HSET', vectors, id, ARGV[2])
redis.call('HSET', answers, id, ARGV[3])
redis.call('ZADD', order, created_at, id)
if owner ~= '' then redis.call('HSET', owners, id, owner) end
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
  redis.call('HDEL', owners, old)
  redis.call('ZREM', order, old)
end
redis.call('PEXPIRE', vectors, ttl_ms)
redis.call('PEXPIRE', answers, ttl_ms)
redis.call('PEXPIRE', order, ttl_ms)
if redis.call('EXISTS', owners) == 1 then redis.call('PEXPIRE', owners, ttl_ms) end
return #gone
"""

# One user's index: add a member, drop those older than the index keeps, and never
# shorten the key's life (another replica may run with a longer TTL).
_INDEX = """
local index = KEYS[1]
redis.call('ZADD', index, ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. ARGV[3])
local keep_ms = tonumber(ARGV[4])
if redis.call('PTTL', index) < keep_ms then redis.call('PEXPIRE', index, keep_ms) end
return 1
"""

_INDEX_TTLS = 2
"""The user index keeps a member this many TTLs: an entry can outlive its TTL in its
scope by at most one more (see the module docstring)."""


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
        self._index = client.register_script(_INDEX)
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._retry_at: float | None = None

    def _keys(self, scope: str) -> tuple[str, str, str, str]:
        """The scope's vectors, answers, order and owners keys."""
        base = f"{self._prefix}{{{scope}}}"
        return f"{base}:v", f"{base}:a", f"{base}:t", f"{base}:o"

    def _user_key(self, tenant_id: str, user_id: str) -> str:
        # A digest: user ids may hold any character, and key names are seen by operators.
        digest = hashlib.sha256(json.dumps([tenant_id, user_id]).encode()).hexdigest()[:32]
        return f"{self._prefix}user:{digest}"

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
        vectors_key, answers_key, _, owners_key = self._keys(scope)
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
        raw, owner = await self._call(lambda: self._read(answers_key, owners_key, entry_id))
        if raw is None:  # deleted since the vectors were read
            return Nearest(similarity, None)
        answer = _ANSWER.validate_json(raw)
        return Nearest(similarity, CacheEntry(entry_id, values, answer, _owner(owner)))

    async def _read(
        self, answers_key: str, owners_key: str, entry_id: str
    ) -> tuple[bytes | str | None, bytes | str | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hget(answers_key, entry_id)
            pipe.hget(owners_key, entry_id)
            raw, owner = await pipe.execute()
        return raw, owner

    async def put(
        self, scope: str, entry: CacheEntry, *, max_entries: int, now: float, ttl_s: float
    ) -> None:
        created_at = entry.answer.created_at
        owner = entry.owner
        if owner is not None:
            # Indexed first: an entry stored must be found when its owner is erased (an
            # index member whose entry never got stored is skipped when read).
            keep_s = _INDEX_TTLS * ttl_s
            await self._call(
                lambda: self._index(
                    keys=[self._user_key(owner.tenant_id, owner.user_id)],
                    args=[
                        repr(created_at),
                        _member(scope, entry.id),
                        repr(now - keep_s),
                        max(1, math.ceil(keep_s * 1000)),
                    ],
                )
            )
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
                    "" if owner is None else json.dumps([owner.tenant_id, owner.user_id]),
                ],
            )
        )

    async def delete(self, scope: str, entry_id: str) -> None:
        await self._call(lambda: self._remove(scope, [entry_id]))

    async def _remove(self, scope: str, entry_ids: Sequence[str]) -> int:
        """Delete entries of one scope (one slot: one transaction); how many were there."""
        vectors_key, answers_key, order_key, owners_key = self._keys(scope)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(vectors_key, *entry_ids)
            pipe.hdel(answers_key, *entry_ids)
            pipe.hdel(owners_key, *entry_ids)
            pipe.zrem(order_key, *entry_ids)
            _, answers, _, _ = await pipe.execute()
        return int(answers)

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        index = self._user_key(tenant_id, user_id)

        async def forget() -> int:
            listed = await self._client.zrange(index, 0, -1)
            members = [_text(m) for m in listed if isinstance(m, bytes | str)]
            gone = 0
            for scope, entry_ids in _by_scope(members).items():
                gone += await self._remove(scope, entry_ids)
            if members:
                # Only the members read: an entry indexed meanwhile stays findable.
                await self._client.zrem(index, *members)
            return gone

        return await self._call(forget)

    async def entries_of(self, tenant_id: str, user_id: str) -> list[CacheEntry]:
        index = self._user_key(tenant_id, user_id)
        owner = CacheOwner(tenant_id, user_id)

        async def read() -> list[CacheEntry]:
            listed = await self._client.zrange(index, 0, -1)
            members = [_text(m) for m in listed if isinstance(m, bytes | str)]
            found: list[CacheEntry] = []
            for scope, entry_ids in _by_scope(members).items():
                vectors_key, answers_key, _, _ = self._keys(scope)
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.hmget(vectors_key, entry_ids)
                    pipe.hmget(answers_key, entry_ids)
                    blobs, answers = await pipe.execute()
                for entry_id, blob, raw in zip(entry_ids, blobs, answers, strict=True):
                    if blob is None or raw is None:
                        continue  # evicted or expired since it was indexed
                    _, values = unpack_vector(blob if isinstance(blob, bytes) else blob.encode())
                    found.append(CacheEntry(entry_id, values, _ANSWER.validate_json(raw), owner))
            return sorted(found, key=lambda entry: (entry.answer.created_at, entry.id))

        return await self._call(read)

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _member(scope: str, entry_id: str) -> str:
    return json.dumps([scope, entry_id], separators=(",", ":"))


def _by_scope(members: Sequence[str]) -> dict[str, list[str]]:
    scopes: dict[str, list[str]] = {}
    for member in members:
        scope, entry_id = json.loads(member)
        scopes.setdefault(scope, []).append(entry_id)
    return scopes


def _owner(raw: bytes | str | None) -> CacheOwner | None:
    if raw is None:
        return None
    tenant_id, user_id = json.loads(raw)
    return CacheOwner(tenant_id, user_id)
