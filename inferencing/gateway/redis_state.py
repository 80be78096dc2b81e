"""Gateway state shared by replicas through Redis: circuit breakers and usage metering.

- :class:`RedisBreakerStore` runs the breaker state machine of
  :mod:`inferencing.gateway.breaker` in Lua, so that ``admit`` and ``record`` are each
  one atomic round trip and every replica sees the same breaker.
- :class:`RedisUsageLedger` keeps usage totals in one hash per UTC hour.
- :class:`ResilientBreakerStore` and :class:`ResilientUsageLedger` wrap a shared store
  with a local one: when Redis is unreachable the gateway keeps serving from the local
  store and tries Redis again a few seconds later.
- :func:`redis_client` builds a client that fails fast: connect and command timeouts
  on every call and no retries, so that a stopped Redis never hangs a request.

This module imports ``redis`` and is only imported when Redis is configured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from inferencing.gateway.breaker import (
    BUCKETS,
    Admission,
    BreakerState,
    BreakerStore,
    Clock,
)
from inferencing.gateway.metering import (
    ERASED_USER,
    GroupBy,
    UsageDetail,
    UsageLedger,
    UsageRecord,
    UsageRow,
    group_key,
    sort_rows,
)
from inferencing.settings import BreakerSettings
from inferencing.telemetry import breaker_moved

log = logging.getLogger(__name__)

T = TypeVar("T")

UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
"""Errors that mean "the shared store cannot answer now" (``TimeoutError`` is
``asyncio.TimeoutError``)."""


def redis_client(
    url: str,
    *,
    connect_timeout_s: float,
    command_timeout_s: float,
    health_check_interval_s: int = 30,
    max_connections: int = 100,
) -> redis.asyncio.Redis:
    """A client on which every call has a connect and a command timeout, and no retries.

    Failing fast is the point: the resilient wrappers answer from local state when
    Redis is down, which only helps if a call to a dead Redis returns promptly.
    ``health_check_interval_s`` pings a connection that has been idle that long before
    using it, so a connection broken while idle is noticed before a command is lost.
    """
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        # A burst waits for a free connection (up to the connect timeout) instead of
        # failing with MaxConnectionsError, which the resilient wrappers would take for
        # an outage and answer from local state: limits would stop holding across replicas.
        max_connections=max_connections,
        timeout=connect_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=command_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=health_check_interval_s,
        # RESP2: with RESP3, redis-py 8 turns on maintenance notifications ("auto"), and
        # then its pool no longer checks that an idle connection is still open before
        # reusing it; without retries, a connection the server closed while idle (its
        # `timeout`, a load balancer, a restart) would fail a call and look like an outage.
        protocol=2,
    )
    return redis.asyncio.Redis.from_pool(pool)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- circuit breakers ----------------------------------------------------------------

# The Lua below mirrors InProcessBreakerStore line by line; keep the two in step (both
# pass tests/inferencing/breaker_contract.py). One hash per breaker holds the state,
# when it opened, the probes in flight and succeeded, and the window's buckets as fields
# ``c:<bucket>`` (calls) and ``f:<bucket>`` (failures). Times are formatted with %.17g so
# that a float survives the round trip through Redis exactly. The bucket number is
# computed in Python (float floor division) so both stores bucket identically. Every
# script also returns the states it moved the breaker to, in order (``moves``), for the
# replica that ran it to count.
_PRELUDE = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local open_s = tonumber(ARGV[2])
local probes = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])

local state, opened_at, inflight, successes = 'closed', 0, 0, 0
local buckets = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do
  local field, value = raw[i], raw[i + 1]
  if field == 'state' then state = value
  elseif field == 'opened_at' then opened_at = tonumber(value)
  elseif field == 'inflight' then inflight = tonumber(value)
  elseif field == 'successes' then successes = tonumber(value)
  else
    local bucket = tonumber(string.sub(field, 3))
    local counts = buckets[bucket] or {0, 0}
    if string.sub(field, 1, 1) == 'c' then counts[1] = tonumber(value)
    else counts[2] = tonumber(value) end
    buckets[bucket] = counts
  end
end
local dirty = false
local moves = {}

local function move(to)
  if state ~= to then
    state = to
    moves[#moves + 1] = to
  end
end

local function fmt(x)
  return string.format('%.17g', x)
end

local function drop_bucket(bucket)
  redis.call('HDEL', key, 'c:' .. fmt(bucket), 'f:' .. fmt(bucket))
  buckets[bucket] = nil
end

local function clear_buckets()
  for bucket, _ in pairs(buckets) do drop_bucket(bucket) end
end

local function open_now()
  move('open')
  opened_at, inflight, successes = now, 0, 0
  clear_buckets()
  dirty = true
end

local function save()
  if dirty then
    redis.call('HSET', key, 'state', state, 'opened_at', fmt(opened_at),
      'inflight', inflight, 'successes', successes)
    redis.call('PEXPIRE', key, ttl_ms)
  end
end

-- _advance
if state == 'open' and now >= opened_at + open_s then
  move('half_open')
  inflight, successes = 0, 0
  opened_at = math.max(opened_at, now - open_s)
  dirty = true
elseif state == 'half_open' and now >= opened_at + 2 * open_s then
  opened_at, inflight, successes = now - open_s, 0, 0
  dirty = true
end
"""

_ADMIT = (
    _PRELUDE
    + """
local allowed, probe = 0, 0
if state == 'closed' then
  allowed = 1
elseif state == 'half_open' and inflight + successes < probes then
  inflight = inflight + 1
  allowed, probe, dirty = 1, 1, true
end
save()
return {allowed, state, probe, fmt(opened_at), moves}
"""
)

_RECORD = (
    _PRELUDE
    + """
local ok = ARGV[5] == '1'
local is_probe = ARGV[6] == '1'
local bucket = tonumber(ARGV[7])
local window = tonumber(ARGV[8])
local min_calls = tonumber(ARGV[9])
local failure_rate = tonumber(ARGV[10])

if state == 'half_open' and is_probe then
  inflight = math.max(0, inflight - 1)
  dirty = true
  if not ok then
    open_now()
  else
    successes = successes + 1
    if successes >= probes then
      move('closed')
      successes = 0
      clear_buckets()
    end
  end
  save()
  return {state, moves}
end
if state ~= 'closed' then
  -- A call admitted before the breaker opened: it no longer counts.
  save()
  return {state, moves}
end
local counts = buckets[bucket] or {0, 0}
counts[1] = counts[1] + 1
redis.call('HINCRBY', key, 'c:' .. fmt(bucket), 1)
if not ok then
  counts[2] = counts[2] + 1
  redis.call('HINCRBY', key, 'f:' .. fmt(bucket), 1)
end
buckets[bucket] = counts
for old, _ in pairs(buckets) do
  if old <= bucket - window then drop_bucket(old) end
end
local calls, failures = 0, 0
for _, c in pairs(buckets) do
  calls = calls + c[1]
  failures = failures + c[2]
end
if calls >= min_calls and failures >= failure_rate * calls then
  open_now()
end
dirty = true
save()
return {state, moves}
"""
)

_STATE = (
    _PRELUDE
    + """
save()
return {state, moves}
"""
)

TTL_MULTIPLE = 4
"""Idle breakers expire after this many times ``window_s + 2 * open_s`` (the longest
span the state machine remembers anything for), counted from their last change."""


def _ttl_ms(policy: BreakerSettings) -> int:
    return math.ceil(TTL_MULTIPLE * (policy.window_s + 2 * policy.open_s) * 1000)


def _bucket(now: float, policy: BreakerSettings) -> int:
    # The same arithmetic as breaker._bucket: the two stores must bucket identically.
    return int(now // (policy.window_s / BUCKETS))


class RedisBreakerStore:
    """Breaker state in Redis, shared by every replica; one atomic script per call.

    ``now`` comes from the caller (never Redis ``TIME``), so replicas must agree on
    the wall clock to within a small part of ``open_s``.
    """

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "lamina:breaker:") -> None:
        self._prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._state = client.register_script(_STATE)

    def _args(self, now: float, policy: BreakerSettings) -> list[float | int]:
        return [now, policy.open_s, policy.half_open_probes, _ttl_ms(policy)]

    async def admit(self, key: str, now: float, policy: BreakerSettings) -> Admission:
        allowed, state, probe, opened_at, moves = await self._admit(
            keys=[self._prefix + key], args=self._args(now, policy)
        )
        _count(key, moves)
        breaker_state = BreakerState(_text(state))
        if breaker_state is BreakerState.OPEN:
            retry_in_s = float(_text(opened_at)) + policy.open_s - now
            return Admission(False, breaker_state, retry_in_s=retry_in_s)
        return Admission(bool(allowed), breaker_state, probe=bool(probe))

    async def record(
        self, key: str, now: float, policy: BreakerSettings, *, ok: bool, probe: bool
    ) -> BreakerState:
        state, moves = await self._record(
            keys=[self._prefix + key],
            args=[
                *self._args(now, policy),
                int(ok),
                int(probe),
                _bucket(now, policy),
                BUCKETS,
                policy.min_calls,
                policy.failure_rate,
            ],
        )
        _count(key, moves)
        return BreakerState(_text(state))

    async def state(self, key: str, now: float, policy: BreakerSettings) -> BreakerState:
        state, moves = await self._state(keys=[self._prefix + key], args=self._args(now, policy))
        _count(key, moves)
        return BreakerState(_text(state))


def _count(key: str, moves: list[bytes | str]) -> None:
    for state in moves:
        breaker_moved(key, _text(state))


# --- usage ---------------------------------------------------------------------------

_NANO = 1_000_000_000
"""Costs are summed as integers in units of 1e-9, exact for ``cost_of``'s 8 decimals."""

_METRICS = ("n", "i", "o", "c")
"""Hash field prefixes: calls, input tokens, output tokens, cost in nano-units."""

_HOUR = timedelta(hours=1)
_HOUR_FORMAT = "%Y%m%d%H"

# Moves a person's cells of one hour to other fields (their erased twins), atomically, so
# that a concurrent HINCRBY on a cell is never lost. ARGV: old field, new field, ...
# Returns the calls moved (the ``n`` cells).
_REATTRIBUTE = """
local hour = KEYS[1]
local calls = 0
for i = 1, #ARGV, 2 do
  local value = redis.call('HGET', hour, ARGV[i])
  if value then
    redis.call('HINCRBY', hour, ARGV[i + 1], value)
    redis.call('HDEL', hour, ARGV[i])
    if string.sub(ARGV[i], 1, 1) == 'n' then calls = calls + tonumber(value) end
  end
end
return calls
"""


def _hour_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class RedisUsageLedger:
    """Usage totals in Redis, one hash per UTC hour, shared by every replica.

    An hour's hash ``{prefix}{YYYYMMDDHH}`` holds, per (tenant, user, deployment, model,
    model version), the calls, tokens and cost of that hour; a sorted set
    ``{prefix}hours`` indexes the hours that have any, and ``{prefix}user:<digest>`` the
    hours of each person (so that erasing a person reads only their hours). Each hour
    expires ``retention`` after it ended; records already older than that are not written.

    The granularity is the hour: ``summarize`` counts whole hours, from the one that
    holds ``since`` (``since`` is rounded down to the hour). Records are totalled,
    not kept one by one: prompt version, outcome and ``estimated`` are not stored.
    The client belongs to the caller, who closes it.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "lamina:usage:",
        retention: timedelta = timedelta(days=400),
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._index = prefix + "hours"
        self._retention = retention
        self._reattribute = client.register_script(_REATTRIBUTE)

    def _user_index(self, tenant_id: str, user_id: str) -> str:
        # A digest: user ids may hold any character, and key names are seen by operators.
        digest = hashlib.sha256(json.dumps([tenant_id, user_id]).encode()).hexdigest()[:32]
        return f"{self._prefix}user:{digest}"

    async def append(self, records: Sequence[UsageRecord]) -> None:
        now = datetime.now(UTC)
        sums: dict[tuple[datetime, str], list[int]] = {}
        people: dict[str, set[datetime]] = {}
        for record in records:
            hour = _hour_of(record.at)
            if hour + _HOUR + self._retention <= now:
                continue
            dimension = _field(
                record.tenant_id,
                record.user_id,
                record.deployment,
                record.model,
                record.model_version,
            )
            people.setdefault(self._user_index(record.tenant_id, record.user_id), set()).add(hour)
            row = sums.setdefault((hour, dimension), [0, 0, 0, 0])
            row[0] += 1
            row[1] += record.input_tokens
            row[2] += record.output_tokens
            row[3] += round(record.cost * _NANO)
        if not sums:
            return
        hours = {hour for hour, _ in sums}
        # One transaction, so a failed batch (which the meter writes again) left nothing.
        async with self._client.pipeline(transaction=True) as pipe:
            for (hour, dimension), values in sums.items():
                name = self._prefix + hour.strftime(_HOUR_FORMAT)
                for metric, value in zip(_METRICS, values, strict=True):
                    if value:
                        pipe.hincrby(name, metric + dimension, value)
            for hour in hours:
                pipe.expireat(
                    self._prefix + hour.strftime(_HOUR_FORMAT), hour + _HOUR + self._retention
                )
            pipe.zadd(
                self._index, {hour.strftime(_HOUR_FORMAT): hour.timestamp() for hour in hours}
            )
            pipe.zremrangebyscore(self._index, "-inf", (now - self._retention - _HOUR).timestamp())
            pipe.expire(self._index, self._retention + _HOUR)
            oldest = (now - self._retention - _HOUR).timestamp()
            for index, their_hours in people.items():
                pipe.zadd(index, {h.strftime(_HOUR_FORMAT): h.timestamp() for h in their_hours})
                pipe.zremrangebyscore(index, "-inf", oldest)
                pipe.expire(index, self._retention + _HOUR)
            await pipe.execute()

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        if user_id == ERASED_USER:
            return 0
        index = self._user_index(tenant_id, user_id)
        members = await self._client.zrange(index, 0, -1)
        hours = [_text(m) for m in members if isinstance(m, bytes | str)]
        calls = 0
        for hour in hours:
            name = self._prefix + hour
            moves: list[str] = []
            for field in await self._client.hkeys(name):
                cell = _text(field)
                tenant, user, deployment, model, version = json.loads(cell[1:])
                if tenant == tenant_id and user == user_id:
                    moves += [
                        cell,
                        cell[0] + _field(tenant, ERASED_USER, deployment, model, version),
                    ]
            if moves:
                calls += int(await self._reattribute(keys=[name], args=moves))
        if hours:
            # Only the hours read: an hour indexed meanwhile stays findable.
            await self._client.zrem(index, *hours)
        return calls

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        members = await self._client.zrange(self._user_index(tenant_id, user_id), 0, -1)
        hours = [_text(m) for m in members if isinstance(m, bytes | str)]
        found: list[UsageDetail] = []
        for chunk in _chunks(sorted(hours), 500):
            async with self._client.pipeline(transaction=False) as pipe:
                for hour in chunk:
                    pipe.hgetall(self._prefix + hour)
                buckets: list[dict[bytes | str, bytes | str]] = await pipe.execute()
            for hour, bucket in zip(chunk, buckets, strict=True):
                cells: dict[tuple[str, str, str | None], list[int]] = {}
                for field, value in bucket.items():
                    name = _text(field)
                    tenant, user, deployment, model, version = json.loads(name[1:])
                    if tenant == tenant_id and user == user_id:
                        metrics = cells.setdefault((deployment, model, version), [0, 0, 0, 0])
                        metrics[_METRICS.index(name[0])] += int(value)
                at = datetime.strptime(hour, _HOUR_FORMAT).replace(tzinfo=UTC)
                found.extend(
                    UsageDetail(at, deployment, model, version, n, i, o, round(c / _NANO, 8))
                    for (deployment, model, version), (n, i, o, c) in sorted(
                        cells.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
                    )
                )
        return found

    async def summarize(
        self, by: GroupBy, since: datetime, *, tenant_id: str | None = None
    ) -> list[UsageRow]:
        """Totals per ``by`` of the hours from the one holding ``since``, costliest first."""
        members = await self._client.zrangebyscore(self._index, _hour_of(since).timestamp(), "+inf")
        hours = [_text(m) for m in members if isinstance(m, bytes | str)]  # no scores asked
        rows: dict[str, list[int]] = {}
        for chunk in _chunks(hours, 500):
            async with self._client.pipeline(transaction=False) as pipe:
                for hour in chunk:
                    pipe.hgetall(self._prefix + hour)
                buckets: list[dict[bytes | str, bytes | str]] = await pipe.execute()
            for bucket in buckets:
                for field, value in bucket.items():
                    name = _text(field)
                    metric = _METRICS.index(name[0])
                    tenant, user, deployment, model, version = json.loads(name[1:])
                    if tenant_id is not None and tenant != tenant_id:
                        continue
                    key = group_key(_dimension(tenant, user, deployment, model, version), by)
                    rows.setdefault(key, [0, 0, 0, 0])[metric] += int(value)
        return sort_rows(
            UsageRow(key, n, i, o, round(c / _NANO, 6)) for key, (n, i, o, c) in rows.items()
        )

    async def aclose(self) -> None:
        return None


def _field(tenant: str, user: str, deployment: str, model: str, version: str | None) -> str:
    """A cell's dimensions as its hash field holds them (after the metric's letter)."""
    return json.dumps([tenant, user, deployment, model, version], separators=(",", ":"))


def _dimension(
    tenant: str, user: str, deployment: str, model: str, version: str | None
) -> UsageRecord:
    # A record carrying only the stored dimensions, so that grouping reuses group_key.
    return UsageRecord(
        at=datetime.min.replace(tzinfo=UTC),
        tenant_id=tenant,
        user_id=user,
        deployment=deployment,
        model=model,
        model_version=version,
        prompt_version=None,
        input_tokens=0,
        output_tokens=0,
        cost=0.0,
        outcome="",
    )


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def merge_rows(*tables: Sequence[UsageRow]) -> list[UsageRow]:
    """Add up chargeback tables of the same grouping, costliest first."""
    rows: dict[str, list[float]] = {}
    for table in tables:
        for row in table:
            sums = rows.setdefault(row.key, [0, 0, 0, 0.0])
            sums[0] += row.calls
            sums[1] += row.input_tokens
            sums[2] += row.output_tokens
            sums[3] += row.cost
    return sort_rows(
        UsageRow(key, int(n), int(i), int(o), round(c, 6)) for key, (n, i, o, c) in rows.items()
    )


# --- failover ------------------------------------------------------------------------


class Failover:
    """Which store answers: the primary, or the fallback while the primary is
    unreachable and for ``retry_after_s`` after each failed attempt."""

    def __init__(
        self,
        *,
        what: str,
        primary_name: str,
        fallback_name: str,
        retry_after_s: float,
        clock: Clock,
    ) -> None:
        self._what = what
        self._primary_name = primary_name
        self._fallback_name = fallback_name
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._down_since: datetime | None = None
        self._retry_at = 0.0
        self._probing = False

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def describe(self) -> str:
        if self._down_since is None:
            return self._primary_name
        since = self._down_since.isoformat(timespec="seconds")
        return f"{self._fallback_name} ({self._primary_name} unreachable since {since})"

    async def run(
        self, primary: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        if self._down_since is not None and (self._probing or self._clock() < self._retry_at):
            return await fallback()
        # While degraded, one call at a time finds out whether the primary is back.
        self._probing = self._down_since is not None
        try:
            try:
                result = await primary()
            finally:
                self._probing = False
        except UNREACHABLE as exc:
            self._failed(exc)
            return await fallback()
        if self._down_since is not None:
            self._down_since = None
            log.info("gateway %s: %s reachable again", self._what, self._primary_name)
        return result

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock() + self._retry_after_s
        if self._down_since is None:
            self._down_since = datetime.now(UTC)
            log.warning(
                "gateway state: Redis unreachable, using %s state (%s: %s: %s)",
                self._fallback_name,
                self._what,
                type(exc).__name__,
                exc,
            )
        else:
            log.debug("gateway %s: %s still unreachable: %s", self._what, self._primary_name, exc)


class ResilientBreakerStore:
    """A shared breaker store with a local fallback for when it is unreachable.

    While the primary cannot answer, breakers live in the fallback (each replica on
    its own); the primary is tried again ``retry_after_s`` after each failure.
    """

    def __init__(
        self,
        primary: BreakerStore,
        fallback: BreakerStore,
        *,
        retry_after_s: float = 5.0,
        clock: Clock = time.monotonic,
        primary_name: str = "redis",
        fallback_name: str = "in-process",
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._failover = Failover(
            what="breakers",
            primary_name=primary_name,
            fallback_name=fallback_name,
            retry_after_s=retry_after_s,
            clock=clock,
        )

    @property
    def degraded(self) -> bool:
        return self._failover.degraded

    def describe(self) -> dict[str, str]:
        return {"breaker_state": self._failover.describe()}

    async def admit(self, key: str, now: float, policy: BreakerSettings) -> Admission:
        return await self._failover.run(
            lambda: self._primary.admit(key, now, policy),
            lambda: self._fallback.admit(key, now, policy),
        )

    async def record(
        self, key: str, now: float, policy: BreakerSettings, *, ok: bool, probe: bool
    ) -> BreakerState:
        return await self._failover.run(
            lambda: self._primary.record(key, now, policy, ok=ok, probe=probe),
            lambda: self._fallback.record(key, now, policy, ok=ok, probe=probe),
        )

    async def state(self, key: str, now: float, policy: BreakerSettings) -> BreakerState:
        return await self._failover.run(
            lambda: self._primary.state(key, now, policy),
            lambda: self._fallback.state(key, now, policy),
        )


class ResilientUsageLedger:
    """A shared usage ledger with a local fallback for when it is unreachable.

    Records the primary refuses go to the fallback, so each record lives in exactly
    one of the two; ``summarize`` therefore adds the fallback's totals to the
    primary's (or gives the fallback's alone while the primary is unreachable).
    The fallback's records are not moved to the primary when it recovers.
    """

    def __init__(
        self,
        primary: UsageLedger,
        fallback: UsageLedger,
        *,
        retry_after_s: float = 5.0,
        clock: Clock = time.monotonic,
        primary_name: str = "redis",
        fallback_name: str = "in-process",
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._failover = Failover(
            what="usage",
            primary_name=primary_name,
            fallback_name=fallback_name,
            retry_after_s=retry_after_s,
            clock=clock,
        )

    @property
    def degraded(self) -> bool:
        return self._failover.degraded

    def describe(self) -> dict[str, str]:
        return {"usage_ledger": self._failover.describe()}

    async def append(self, records: Sequence[UsageRecord]) -> None:
        await self._failover.run(
            lambda: self._primary.append(records), lambda: self._fallback.append(records)
        )

    async def summarize(
        self, by: GroupBy, since: datetime, *, tenant_id: str | None = None
    ) -> list[UsageRow]:
        async def nothing() -> list[UsageRow]:
            return []

        primary = await self._failover.run(
            lambda: self._primary.summarize(by, since, tenant_id=tenant_id), nothing
        )
        fallback = await self._fallback.summarize(by, since, tenant_id=tenant_id)
        return merge_rows(primary, fallback)

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        # Both, and no failover: an unreachable primary must fail the erasure (it still
        # holds the person's usage), not pass for done.
        fallback = await self._fallback.forget_user(tenant_id, user_id)
        return fallback + await self._primary.forget_user(tenant_id, user_id)

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        primary = await self._primary.user_detail(tenant_id, user_id)
        fallback = await self._fallback.user_detail(tenant_id, user_id)
        return sorted([*primary, *fallback], key=lambda detail: detail.at)

    async def aclose(self) -> None:
        try:
            await self._primary.aclose()
        finally:
            await self._fallback.aclose()
