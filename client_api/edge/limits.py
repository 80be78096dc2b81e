"""Rate limits and token quotas, per user and per tenant, held across replicas.

Four measures, each per user and per tenant (:class:`LimitsSettings`):

- **requests per minute** and **tokens per minute**: a sliding-window log, so a limit
  of 60 admits exactly 60 in any 60 seconds (no burst of twice the limit across a
  fixed window's edge);
- **tokens per day** and **tokens per month**: quotas over UTC calendar periods.

The edge calls :meth:`RateLimiter.admit` once per request (requests per minute) and
:meth:`RateLimiter.check_tokens` before a chat turn. The gateway holds tokens around
every model call through the :class:`~inferencing.contracts.TokenBudget` contract,
which :class:`RateLimiter` implements: :meth:`~RateLimiter.reserve` the prompt
estimate plus ``max_tokens`` before the call, :meth:`~RateLimiter.reconcile` to the
tokens used after it.

A check touches every limit that applies to the caller in one atomic step, and
records in all of them only when all have room. Two stores pass one contract suite
(``tests/client_api/test_limits.py``):

- :class:`InProcessLimitStore`: this process's memory (one replica, and the fallback);
- :class:`RedisLimitStore`: one Lua script per step, on keys hash-tagged by tenant so
  that a step's keys share a cluster slot, timed by Redis ``TIME`` so that replicas
  agree on the clock.

:class:`ResilientLimitStore` serves from the in-process store while Redis is
unreachable, as the gateway's breakers do. Nothing here imports ``redis``: the
Redis store takes a client built by the composition root.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferencing.contracts import (
    InferenceCaller,
    InferenceError,
    LimitState,
    TokenQuotaExceeded,
    TokenRateLimited,
    TokenReservation,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from inferencing.gateway.redis_state import Failover

log = logging.getLogger(__name__)

WINDOW_S = 60.0
"""The sliding window of the per-minute limits."""

_DAY_S = 86_400
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_UNLIMITED = frozenset({"", "none", "null", "unlimited"})


# --- settings --------------------------------------------------------------------------


class LimitOverrides(BaseModel):
    """One tenant's limits where they differ from the defaults. A field left out keeps
    the default; a field given as ``null`` (or ``"unlimited"``) lifts that limit."""

    model_config = ConfigDict(extra="forbid")

    user_requests_per_minute: int | None = Field(
        default=None, ge=1, description="Requests each user may send in any 60 s (else 429)"
    )
    tenant_requests_per_minute: int | None = Field(
        default=None, ge=1, description="Requests all of a tenant's users may send in any 60 s"
    )
    user_tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Model tokens (prompt plus output) each user may use in any 60 s (else 429)",
    )
    tenant_tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Model tokens a whole tenant may use in any 60 s"
    )
    user_tokens_per_day: int | None = Field(
        default=None, ge=0, description="Token quota of each user per UTC day (else 403)"
    )
    tenant_tokens_per_day: int | None = Field(
        default=None, ge=0, description="Token quota of a whole tenant per UTC day"
    )
    user_tokens_per_month: int | None = Field(
        default=None, ge=0, description="Token quota of each user per UTC calendar month"
    )
    tenant_tokens_per_month: int | None = Field(
        default=None, ge=0, description="Token quota of a whole tenant per UTC calendar month"
    )

    @field_validator(
        "user_requests_per_minute",
        "tenant_requests_per_minute",
        "user_tokens_per_minute",
        "tenant_tokens_per_minute",
        "user_tokens_per_day",
        "tenant_tokens_per_day",
        "user_tokens_per_month",
        "tenant_tokens_per_month",
        mode="before",
    )
    @classmethod
    def _unlimited(cls, value: Any) -> Any:
        # An environment variable cannot say null: let it say "unlimited" (or nothing).
        if isinstance(value, str) and value.strip().lower() in _UNLIMITED:
            return None
        return value


_LIMIT_FIELDS = tuple(LimitOverrides.model_fields)


class LimitsSettings(LimitOverrides):
    """Rate limits and token quotas (``LAMINA_LIMITS__*``). Every limit is off (None)
    unless set; ``tenants`` overrides any of them for named tenants."""

    tenants: dict[str, LimitOverrides] = Field(
        default_factory=dict,
        description='Per-tenant overrides as JSON, e.g. {"contoso": {"tenant_tokens_per_day": '
        '5000000, "user_requests_per_minute": null}}; null lifts a limit',
    )

    def for_tenant(self, tenant_id: str) -> dict[str, int | None]:
        """The limits that apply to ``tenant_id``'s callers, by field name."""
        values: dict[str, int | None] = {name: getattr(self, name) for name in _LIMIT_FIELDS}
        override = self.tenants.get(tenant_id)
        if override is not None:
            values.update({name: getattr(override, name) for name in override.model_fields_set})
        return values

    @property
    def any_token_limits(self) -> bool:
        """Whether any tokens-per-minute limit or token quota is set, for any tenant:
        without one, the gateway needs no token budget at all."""
        tables = [self, *self.tenants.values()]
        return any(
            getattr(table, name) is not None
            for table in tables
            for name in _LIMIT_FIELDS
            if "tokens" in name
        )


# --- what a store applies ------------------------------------------------------------


class Measure(StrEnum):
    """What a limit counts, and over which period (the values are the Lua script's)."""

    REQUESTS_PER_MINUTE = "c"
    TOKENS_PER_MINUTE = "w"
    TOKENS_PER_DAY = "d"
    TOKENS_PER_MONTH = "m"

    @property
    def is_quota(self) -> bool:
        return self in (Measure.TOKENS_PER_DAY, Measure.TOKENS_PER_MONTH)


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one caller, as a store applies it. ``key`` is unique to the limit
    and its user or tenant, and starts with the tenant's hash tag ``{tenant}``."""

    name: str
    key: str
    limit: int
    measure: Measure


@dataclass(frozen=True, slots=True)
class Hold:
    """What one admitted step recorded: ``amount`` under ``id`` in each of ``limits``,
    in the calendar period ``periods[i]`` of each quota (0 for windows). ``store`` names
    the store that holds it."""

    id: str
    amount: int
    limits: tuple[Limit, ...]
    periods: tuple[int, ...]
    store: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one step: a state per limit (in the order given), the limit that
    refused (the one with the longest wait, when several did), and what was recorded."""

    admitted: bool
    states: tuple[LimitState, ...]
    binding: LimitState | None = None
    hold: Hold | None = None


class LimitStore(Protocol):
    """Keeps the windows and quotas: in this process, or shared by replicas.

    ``acquire`` checks every limit and, only if all have room for ``amount``, records it
    in all of them, atomically. ``peek`` answers as ``acquire`` of 1 would, recording
    nothing. ``settle`` replaces a hold's amount by ``amount`` wherever it is still
    counted (a window entry that has left the window, a quota period that has ended,
    are left alone); call it once per hold.

    A window's state says how long until its oldest entry leaves it or, when it refused,
    until the amount asked for would fit; a quota's, how long until its period ends.
    """

    @property
    def name(self) -> str: ...

    async def acquire(self, limits: Sequence[Limit], amount: int) -> Verdict: ...

    async def peek(self, limits: Sequence[Limit]) -> Verdict: ...

    async def settle(self, hold: Hold, amount: int) -> None: ...

    def describe(self) -> dict[str, str]: ...


def period_of(measure: Measure, now: float) -> tuple[int, float]:
    """The UTC calendar period that holds ``now`` (days, or months, since the epoch;
    the Lua script numbers them alike) and the instant it ends."""
    # floor(now / day) rather than now // day: the Lua script can only do the former,
    # and the two differ a hair before midnight.
    day = math.floor(now / _DAY_S)
    if measure is Measure.TOKENS_PER_DAY:
        return day, float((day + 1) * _DAY_S)
    today = date.fromordinal(day + _EPOCH_ORDINAL)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    ends = (date(year, month, 1).toordinal() - _EPOCH_ORDINAL) * _DAY_S
    return today.year * 12 + today.month - 1, float(ends)


# --- in-process store ----------------------------------------------------------------


class _Window:
    """A sliding-window log: entries in time order, the amount of each, their sum."""

    __slots__ = ("amounts", "entries", "used")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, str]] = deque()
        self.amounts: dict[str, int] = {}
        self.used = 0

    def live(self, since: float, *, prune: bool) -> int:
        """The sum of the entries after ``since``; ``prune`` drops the others."""
        gone = 0
        if prune:
            while self.entries and self.entries[0][0] <= since:
                gone += self.amounts.pop(self.entries.popleft()[1], 0)
            self.used -= gone
            return self.used
        for at, member in self.entries:
            if at > since:
                break
            gone += self.amounts.get(member, 0)
        return self.used - gone

    def add(self, now: float, member: str, amount: int) -> None:
        # Never before the newest entry, so the log stays in order if the clock steps back.
        at = max(now, self.entries[-1][0]) if self.entries else now
        self.entries.append((at, member))
        self.amounts[member] = amount
        self.used += amount

    def oldest(self, since: float, now: float, window_s: float) -> float:
        for at, _ in self.entries:
            if at > since:
                return at + window_s - now
        return 0.0

    def wait(self, since: float, now: float, window_s: float, excess: int) -> float:
        """How long until entries summing to ``excess`` have left the window."""
        freed = 0
        for at, member in self.entries:
            if at <= since:
                continue
            freed += self.amounts.get(member, 0)
            if freed >= excess:
                return at + window_s - now
        return window_s

    def replace(self, member: str, amount: int) -> None:
        held = self.amounts.get(member)
        if held is None:  # it has left the window
            return
        if amount == 0:
            del self.amounts[member]
            for index, (_, entry) in enumerate(self.entries):
                if entry == member:
                    del self.entries[index]
                    break
        else:
            self.amounts[member] = amount
        self.used += amount - held


@dataclass(slots=True)
class _Quota:
    period: int
    ends: float
    used: int


class InProcessLimitStore:
    """Limits in this process's memory: the store of a single replica, and the fallback
    while Redis is unreachable. No method awaits anything, so each step is atomic on
    the event loop. ``clock`` gives seconds since the epoch (quotas follow UTC days)."""

    name = "in-process"

    def __init__(
        self, *, clock: Callable[[], float] = time.time, window_s: float = WINDOW_S
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._windows: dict[str, _Window] = {}
        self._quotas: dict[str, _Quota] = {}
        self._swept_at = -math.inf
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count()

    def describe(self) -> dict[str, str]:
        return {"rate_limits": self.name}

    async def acquire(self, limits: Sequence[Limit], amount: int) -> Verdict:
        return self._step(limits, amount, write=True)

    async def peek(self, limits: Sequence[Limit]) -> Verdict:
        return self._step(limits, 1, write=False)

    async def settle(self, hold: Hold, amount: int) -> None:
        for limit, period in zip(hold.limits, hold.periods, strict=True):
            if limit.measure is Measure.TOKENS_PER_MINUTE:
                window = self._windows.get(limit.key)
                if window is not None:
                    window.replace(hold.id, amount)
            elif limit.measure.is_quota:
                quota = self._quotas.get(limit.key)
                if quota is not None and quota.period == period:
                    quota.used += amount - hold.amount

    def _step(self, limits: Sequence[Limit], amount: int, *, write: bool) -> Verdict:
        # Mirrors the Lua script _ACQUIRE step by step; keep the two in line. Written for
        # speed (one pass per phase, locals): it runs twice on every model call.
        now = self._clock()
        if now >= self._swept_at + self._window_s:
            self._sweep(now)
        window_s = self._window_s
        since = now - window_s
        windows = self._windows
        quotas = self._quotas
        used: list[int] = []
        periods: list[int] = []
        ends: list[float] = []
        fits: list[bool] = []
        quota_flags: list[bool] = []
        for limit in limits:
            is_quota = limit.measure.is_quota
            quota_flags.append(is_quota)
            if is_quota:
                period, end = period_of(limit.measure, now)
                quota = quotas.get(limit.key)
                current = quota.used if quota is not None and quota.period == period else 0
                periods.append(period)
                ends.append(end)
            else:
                window = windows.get(limit.key)
                current = 0 if window is None else window.live(since, prune=write)
                periods.append(0)
                ends.append(0.0)
            used.append(current)
            fits.append(current + amount <= limit.limit)
        admitted = all(fits)
        hold: Hold | None = None
        if admitted and write:
            # Unique within this store, which is all a hold's id must be here: a counter
            # rather than random bytes (a system call on every request).
            member = f"{self._id_prefix}{next(self._ids):x}"
            for index, limit in enumerate(limits):
                if quota_flags[index]:
                    quotas[limit.key] = _Quota(periods[index], ends[index], used[index] + amount)
                else:
                    window = windows.get(limit.key)
                    if window is None:  # not setdefault: that builds a window every time
                        window = windows[limit.key] = _Window()
                    window.add(now, member, amount)
                used[index] += amount
            hold = Hold(member, amount, tuple(limits), tuple(periods), self.name)
        states: list[LimitState] = []
        binding: LimitState | None = None
        longest = -1.0
        for index, limit in enumerate(limits):
            if quota_flags[index]:
                reset = ends[index] - now
            else:
                window = windows.get(limit.key)
                if window is None:
                    reset = 0.0 if fits[index] else window_s
                elif fits[index]:
                    reset = window.oldest(since, now, window_s)
                else:
                    excess = used[index] + amount - limit.limit
                    reset = window.wait(since, now, window_s, excess)
            state = LimitState(limit.name, limit.limit, max(0, limit.limit - used[index]), reset)
            states.append(state)
            if not fits[index] and reset > longest:
                binding, longest = state, reset
        return Verdict(admitted, tuple(states), binding, hold)

    def _sweep(self, now: float) -> None:
        """Forget idle windows and ended quotas, once a window's length, so memory stays
        bounded by the callers active in the current periods."""
        if now < self._swept_at + self._window_s:
            return
        self._swept_at = now
        since = now - self._window_s
        for key in [k for k, w in self._windows.items() if not w.live(since, prune=True)]:
            if not self._windows[key].entries:
                del self._windows[key]
        for key in [k for k, q in self._quotas.items() if q.ends <= now]:
            del self._quotas[key]


# --- Redis store ---------------------------------------------------------------------

# The Lua below mirrors InProcessLimitStore._step line by line; keep the two in line (both
# pass the contract suite, and tests/client_api/test_limits.py runs them side by side).
# Per limit, by its measure:
# - 'c' (requests per minute): a sorted set, member = step id, score = time;
# - 'w' (tokens per minute): the same sorted set, plus a hash of each member's amount
#   and their sum in field '#';
# - 'd' / 'm' (quotas): a hash of the period number 'p' and the tokens 'used' in it.
# Times are written with %.17g, so a double survives the trip through Redis exactly.
_ACQUIRE = """
-- KEYS: per limit its key, and for a 'w' limit then the key of its amounts.
-- ARGV: mode ('acquire' | 'peek'), now ('' = Redis TIME), amount, id, window_s,
--       then a measure and a limit per limit.
if redis.replicate_commands then pcall(redis.replicate_commands) end  -- Redis < 7: TIME
local CHUNK = 500
local write = ARGV[1] == 'acquire'
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local amount = tonumber(ARGV[3])
local id = ARGV[4]
local window = tonumber(ARGV[5])

local function fmt(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local since = now - window
local since_s = fmt(since)
local live_from = '(' .. since_s

-- Civil dates from days since the epoch and back (H. Hinnant's algorithms): the
-- scripting sandbox has no os.date.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function first_day(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function period_of(measure)
  local day = math.floor(now / 86400)
  if measure == 'd' then return day, (day + 1) * 86400 end
  local y, m = civil(day)
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  return y * 12 + m - 1, first_day(ny, nm) * 86400
end

-- The amounts of the entries at or before `since`; `prune` deletes them.
local function expired(l, prune)
  local gone, offset = 0, 0
  while true do
    local members = redis.call('ZRANGEBYSCORE', l.key, '-inf', since_s, 'LIMIT', offset, CHUNK)
    if #members == 0 then break end
    local amounts = redis.call('HMGET', l.amounts, unpack(members))
    for j = 1, #members do gone = gone + (tonumber(amounts[j]) or 0) end
    if prune then
      redis.call('ZREM', l.key, unpack(members))
      redis.call('HDEL', l.amounts, unpack(members))
    else
      offset = offset + #members
    end
    if #members < CHUNK then break end
  end
  if prune and gone ~= 0 then redis.call('HINCRBY', l.amounts, '#', int(-gone)) end
  return gone
end

local function oldest(l)
  local first = redis.call('ZRANGEBYSCORE', l.key, live_from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 0 then return 0 end
  return tonumber(first[2]) + window - now
end

-- How long until live entries summing to `excess` have left the window.
local function wait(l, excess)
  if l.measure == 'c' then
    local entry = redis.call('ZRANGEBYSCORE', l.key, live_from, '+inf', 'WITHSCORES',
      'LIMIT', excess - 1, 1)
    if #entry == 0 then return window end
    return tonumber(entry[2]) + window - now
  end
  local freed, offset = 0, 0
  while true do
    local entries = redis.call('ZRANGEBYSCORE', l.key, live_from, '+inf', 'WITHSCORES',
      'LIMIT', offset, CHUNK)
    if #entries == 0 then return window end
    local members = {}
    for j = 1, #entries, 2 do members[#members + 1] = entries[j] end
    local amounts = redis.call('HMGET', l.amounts, unpack(members))
    for j = 1, #members do
      freed = freed + (tonumber(amounts[j]) or 0)
      if freed >= excess then return tonumber(entries[2 * j]) + window - now end
    end
    offset = offset + #members
  end
end

local limits = {}
local k = 1
for i = 1, (#ARGV - 5) / 2 do
  local l = {measure = ARGV[4 + 2 * i], limit = tonumber(ARGV[5 + 2 * i]), key = KEYS[k],
    used = 0, period = 0, ends = 0}
  if l.measure == 'w' then
    l.amounts = KEYS[k + 1]
    k = k + 2
  else
    k = k + 1
  end
  if l.measure == 'c' then
    if write then redis.call('ZREMRANGEBYSCORE', l.key, '-inf', since_s) end
    l.used = redis.call('ZCOUNT', l.key, live_from, '+inf')
  elseif l.measure == 'w' then
    local total = tonumber(redis.call('HGET', l.amounts, '#')) or 0
    l.used = total - expired(l, write)
  else
    l.period, l.ends = period_of(l.measure)
    local stored = redis.call('HMGET', l.key, 'p', 'used')
    if tonumber(stored[1]) == l.period then l.used = tonumber(stored[2]) or 0 end
  end
  l.fits = l.used + amount <= l.limit
  limits[i] = l
end

local admitted = true
for _, l in ipairs(limits) do
  if not l.fits then admitted = false end
end

if admitted and write then
  local window_ms = int(math.ceil(window * 1000) + 1000)
  for _, l in ipairs(limits) do
    if l.measure == 'c' or l.measure == 'w' then
      redis.call('ZADD', l.key, fmt(now), id)
      redis.call('PEXPIRE', l.key, window_ms)
      if l.measure == 'w' then
        redis.call('HSET', l.amounts, id, int(amount))
        redis.call('HINCRBY', l.amounts, '#', int(amount))
        redis.call('PEXPIRE', l.amounts, window_ms)
      end
    else
      redis.call('HSET', l.key, 'p', int(l.period), 'used', int(l.used + amount))
      redis.call('PEXPIRE', l.key, int(math.ceil((l.ends - now) * 1000) + 1000))
    end
    l.used = l.used + amount
  end
end

local out = {admitted and 1 or 0, 0}
local longest = -1
for i, l in ipairs(limits) do
  local reset
  if l.measure == 'd' or l.measure == 'm' then
    reset = l.ends - now
  elseif l.fits then
    reset = oldest(l)
  else
    reset = wait(l, l.used + amount - l.limit)
  end
  if not l.fits and reset > longest then
    out[2], longest = i, reset
  end
  out[#out + 1] = int(math.max(0, l.limit - l.used))
  out[#out + 1] = fmt(reset)
  out[#out + 1] = int(l.period)
end
return out
"""

_SETTLE = """
-- KEYS: as for the acquire script. ARGV: id, amount held, amount used, then a measure
-- and a period per limit.
local id, used = ARGV[1], tonumber(ARGV[3])
local delta = used - tonumber(ARGV[2])
local k = 1
for i = 1, (#ARGV - 3) / 2 do
  local measure, period = ARGV[2 + 2 * i], tonumber(ARGV[3 + 2 * i])
  local key = KEYS[k]
  if measure == 'w' then
    local amounts = KEYS[k + 1]
    k = k + 2
    local held = tonumber(redis.call('HGET', amounts, id))
    if held then  -- else it has left the window
      if used == 0 then
        redis.call('ZREM', key, id)
        redis.call('HDEL', amounts, id)
      else
        redis.call('HSET', amounts, id, string.format('%d', used))
      end
      redis.call('HINCRBY', amounts, '#', string.format('%d', used - held))
    end
  else
    k = k + 1
    if (measure == 'd' or measure == 'm') and tonumber(redis.call('HGET', key, 'p')) == period
    then
      redis.call('HINCRBY', key, 'used', string.format('%d', delta))
    end
  end
end
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLimitStore:
    """Limits in Redis, shared by every replica: each step is one atomic Lua script.

    The clock is Redis ``TIME``, so replicas agree on every window whatever their own
    clocks say; ``clock`` replaces it (tests drive time with it). Window keys expire a
    second after their last entry would leave the window, quota keys a second after
    their period ends, and windows are pruned on every step, so memory is bounded by
    the callers active in the current periods. The client belongs to the caller.
    """

    name = "redis"

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "lamina:limits:",
        clock: Callable[[], float] | None = None,
        window_s: float = WINDOW_S,
    ) -> None:
        self._prefix = prefix
        self._clock = clock
        self._window_s = window_s
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)

    def describe(self) -> dict[str, str]:
        return {"rate_limits": self.name}

    async def acquire(self, limits: Sequence[Limit], amount: int) -> Verdict:
        return await self._step(limits, amount, write=True)

    async def peek(self, limits: Sequence[Limit]) -> Verdict:
        return await self._step(limits, 1, write=False)

    async def settle(self, hold: Hold, amount: int) -> None:
        args: list[str | int] = [hold.id, hold.amount, amount]
        for limit, period in zip(hold.limits, hold.periods, strict=True):
            args += [limit.measure.value, period]
        await self._settle(keys=self._keys(hold.limits), args=args)

    async def _step(self, limits: Sequence[Limit], amount: int, *, write: bool) -> Verdict:
        member = uuid4().hex if write else ""
        now = "" if self._clock is None else repr(self._clock())
        args: list[str | int] = [
            "acquire" if write else "peek",
            now,
            amount,
            member,
            repr(self._window_s),
        ]
        for limit in limits:
            args += [limit.measure.value, limit.limit]
        reply = await self._acquire(keys=self._keys(limits), args=args)
        admitted, binding = int(reply[0]), int(reply[1])
        states: list[LimitState] = []
        periods: list[int] = []
        for index, limit in enumerate(limits):
            remaining, reset, period = reply[2 + 3 * index : 5 + 3 * index]
            states.append(LimitState(limit.name, limit.limit, int(remaining), float(_text(reset))))
            periods.append(int(period))
        hold = (
            Hold(member, amount, tuple(limits), tuple(periods), self.name)
            if admitted and write
            else None
        )
        return Verdict(
            bool(admitted), tuple(states), states[binding - 1] if binding else None, hold
        )

    def _keys(self, limits: Iterable[Limit]) -> list[str]:
        keys: list[str] = []
        for limit in limits:
            key = self._prefix + limit.key
            keys.append(key)
            if limit.measure is Measure.TOKENS_PER_MINUTE:
                keys.append(key + ":amounts")
        return keys


# --- failover ------------------------------------------------------------------------


class ResilientLimitStore:
    """A shared limit store with a local fallback for when it is unreachable.

    While the primary cannot answer (a Redis error or timeout), steps go to the fallback,
    so requests keep being served, each replica then enforcing the limits on its own;
    the primary is tried again ``retry_after_s`` after each failure, and the outage is
    logged once. A hold is settled in the store that made it: one the primary made
    while it was reachable keeps its reserved amount if the primary is down when it is
    settled (its window entries leave within a minute).
    """

    def __init__(
        self,
        primary: LimitStore,
        fallback: LimitStore,
        *,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Imported here: it imports redis, which only a shared deployment needs.
        from inferencing.gateway.redis_state import Failover

        if primary.name == fallback.name:
            raise ValueError("the primary and the fallback store need different names")
        self._primary = primary
        self._fallback = fallback
        self._failover: Failover = Failover(
            what="rate limits",
            primary_name=primary.name,
            fallback_name=fallback.name,
            retry_after_s=retry_after_s,
            clock=clock,
        )

    @property
    def name(self) -> str:
        return f"{self._primary.name} or {self._fallback.name}"

    @property
    def degraded(self) -> bool:
        return self._failover.degraded

    def describe(self) -> dict[str, str]:
        return {"rate_limits": self._failover.describe()}

    async def acquire(self, limits: Sequence[Limit], amount: int) -> Verdict:
        return await self._failover.run(
            lambda: self._primary.acquire(limits, amount),
            lambda: self._fallback.acquire(limits, amount),
        )

    async def peek(self, limits: Sequence[Limit]) -> Verdict:
        return await self._failover.run(
            lambda: self._primary.peek(limits), lambda: self._fallback.peek(limits)
        )

    async def settle(self, hold: Hold, amount: int) -> None:
        if hold.store != self._primary.name:
            await self._fallback.settle(hold, amount)
            return

        async def kept() -> None:
            return None

        await self._failover.run(lambda: self._primary.settle(hold, amount), kept)


# --- the limiter ---------------------------------------------------------------------


class RateLimited(Exception):
    """A requests-per-minute limit is reached: HTTP 429 with ``Retry-After``.

    ``state`` is the limit that refused, ``states`` every request limit of the caller
    (for :meth:`RateLimiter.headers`); ``message`` is safe to show.
    """

    def __init__(
        self, state: LimitState, retry_after_s: float, states: Sequence[LimitState] = ()
    ) -> None:
        self.state = state
        self.retry_after_s = retry_after_s
        self.states = tuple(states) or (state,)
        owner, what = _words(state.name)
        self.message = (
            f"{owner} limit of {state.limit:,} {what} is reached. "
            f"Try again in {_seconds(retry_after_s)}."
        )
        super().__init__(self.message)


@dataclass(frozen=True, slots=True)
class _Reservation(TokenReservation):
    hold: Hold


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    per_user: bool
    measure: Measure
    limit: int


@dataclass(frozen=True, slots=True)
class _Policy:
    """The limits of one tenant's callers, ready to be keyed by user."""

    tag: str
    requests: tuple[_Rule, ...]
    tokens: tuple[_Rule, ...]


_MEASURES = {
    "requests_per_minute": Measure.REQUESTS_PER_MINUTE,
    "tokens_per_minute": Measure.TOKENS_PER_MINUTE,
    "tokens_per_day": Measure.TOKENS_PER_DAY,
    "tokens_per_month": Measure.TOKENS_PER_MONTH,
}
_POLICY_CACHE = 4096
_CALLER_CACHE = 65536


class RateLimiter:
    """Applies :class:`LimitsSettings` through a :class:`LimitStore`.

    At the edge, :meth:`admit` counts a request against the requests-per-minute limits
    and :meth:`check_tokens` refuses a chat turn whose token limits are already used
    up. As the gateway's :class:`~inferencing.contracts.TokenBudget`, :meth:`reserve`
    holds a call's tokens against every tokens-per-minute limit and quota, and
    :meth:`reconcile` replaces them by the tokens used. Limits that are not set cost
    nothing: with none, no store is asked at all. ``clock`` (seconds since the epoch)
    dates a quota's reset in messages.
    """

    def __init__(
        self,
        store: LimitStore,
        settings: LimitsSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._policies: dict[str, _Policy] = {}
        self._caller_limits: dict[tuple[str, str], tuple[tuple[Limit, ...], ...]] = {}

    @property
    def store(self) -> LimitStore:
        return self._store

    @property
    def settings(self) -> LimitsSettings:
        return self._settings

    def describe(self) -> dict[str, str]:
        """Which store answers, for ``/readyz``."""
        return self._store.describe()

    async def admit(self, caller: InferenceCaller) -> list[LimitState]:
        """Count one request; raise :class:`RateLimited` when a limit has no room."""
        limits = self._limits(caller, requests=True)
        if not limits:
            return []
        verdict = await self._store.acquire(limits, 1)
        if verdict.binding is not None:
            raise RateLimited(verdict.binding, verdict.binding.reset_s, verdict.states)
        return list(verdict.states)

    async def check_tokens(self, caller: InferenceCaller) -> list[LimitState]:
        """The caller's token limits, recording nothing; raises ``TokenRateLimited`` or
        ``TokenQuotaExceeded`` when one is already used up."""
        limits = self._limits(caller, requests=False)
        if not limits:
            return []
        verdict = await self._store.peek(limits)
        if verdict.binding is not None:
            raise self._refusal(verdict.binding, None)
        return list(verdict.states)

    async def reserve(self, caller: InferenceCaller, tokens: int) -> TokenReservation:
        """Hold ``tokens`` in every token limit of the caller, or raise
        ``TokenRateLimited`` (retryable, unless ``tokens`` exceed a whole per-minute
        limit) or ``TokenQuotaExceeded``."""
        limits = self._limits(caller, requests=False)
        if not limits or tokens <= 0:
            return TokenReservation("", max(tokens, 0))
        verdict = await self._store.acquire(limits, tokens)
        if verdict.hold is not None:
            return _Reservation(verdict.hold.id, tokens, verdict.hold)
        for limit, state in zip(limits, verdict.states, strict=True):
            if tokens > limit.limit:
                raise self._never_fits(state, tokens)
        assert verdict.binding is not None  # refused: some limit refused it
        raise self._refusal(verdict.binding, tokens)

    async def reconcile(self, reservation: TokenReservation, used_tokens: int) -> None:
        """Replace the reservation by ``used_tokens``. Never raises: a failure leaves the
        reserved amount counted, and is logged."""
        if not isinstance(reservation, _Reservation):
            return  # nothing was held
        try:
            await self._store.settle(reservation.hold, max(0, used_tokens))
        except Exception:
            log.warning(
                "token reservation %s (%d tokens) not reconciled to %d",
                reservation.id,
                reservation.tokens,
                used_tokens,
                exc_info=True,
            )

    @staticmethod
    def headers(
        states: Iterable[LimitState], *, retry_after_s: float | None = None
    ) -> dict[str, str]:
        """Response headers for ``states``: ``Retry-After`` (whole seconds) and
        ``retry-after-ms`` when ``retry_after_s`` is given, and OpenAI's
        ``X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens}`` for the tightest
        request limit and the tightest token limit (the least remaining, then the
        longest reset). Resets are written as OpenAI writes them: ``1s``, ``6m0s``."""
        headers: dict[str, str] = {}
        if retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
            headers["retry-after-ms"] = str(max(0, math.ceil(retry_after_s * 1000)))
        requests: list[LimitState] = []
        tokens: list[LimitState] = []
        for state in states:
            (requests if "-requests-" in state.name else tokens).append(state)
        for suffix, group in (("Requests", requests), ("Tokens", tokens)):
            if not group:
                continue
            tightest = min(group, key=lambda s: (s.remaining, -s.reset_s))
            headers[f"X-RateLimit-Limit-{suffix}"] = str(tightest.limit)
            headers[f"X-RateLimit-Remaining-{suffix}"] = str(tightest.remaining)
            headers[f"X-RateLimit-Reset-{suffix}"] = _duration(tightest.reset_s)
        return headers

    # --- limits of a caller -----------------------------------------------------------

    def _limits(self, caller: InferenceCaller, *, requests: bool) -> tuple[Limit, ...]:
        # A caller's limits are the same on every request (the settings do not change
        # while the process runs): built once per caller, not twice per request.
        key = (caller.tenant_id, caller.user_id)
        built = self._caller_limits.get(key)
        if built is None:
            policy = self._policy(caller.tenant_id)
            built = (
                self._keyed(policy, policy.requests, caller.user_id),
                self._keyed(policy, policy.tokens, caller.user_id),
            )
            if len(self._caller_limits) >= _CALLER_CACHE:
                self._caller_limits.clear()
            self._caller_limits[key] = built
        return built[0] if requests else built[1]

    @staticmethod
    def _keyed(policy: _Policy, rules: tuple[_Rule, ...], user_id: str) -> tuple[Limit, ...]:
        user = f"{policy.tag}:user:{quote(user_id, safe='')}:"
        tenant = f"{policy.tag}:tenant:"
        return tuple(
            Limit(
                rule.name,
                (user if rule.per_user else tenant) + rule.name.split("-", 1)[1],
                rule.limit,
                rule.measure,
            )
            for rule in rules
        )

    def _policy(self, tenant_id: str) -> _Policy:
        policy = self._policies.get(tenant_id)
        if policy is not None:
            return policy
        requests: list[_Rule] = []
        tokens: list[_Rule] = []
        for field_name, limit in self._settings.for_tenant(tenant_id).items():
            if limit is None:
                continue
            scope, measure = field_name.split("_", 1)
            rule = _Rule(
                f"{scope}-{measure.replace('_', '-')}",
                scope == "user",
                _MEASURES[measure],
                limit,
            )
            (requests if rule.measure is Measure.REQUESTS_PER_MINUTE else tokens).append(rule)
        # Per user before per tenant: of two limits that refuse alike, the user's is named.
        requests.sort(key=lambda r: not r.per_user)
        tokens.sort(key=lambda r: not r.per_user)
        # The hash tag: every key of a tenant lands in one cluster slot. Escaped, so that
        # no tenant or user id can reach into another's keys.
        policy = _Policy("{" + quote(tenant_id, safe="") + "}", tuple(requests), tuple(tokens))
        if len(self._policies) >= _POLICY_CACHE:
            self._policies.clear()
        self._policies[tenant_id] = policy
        return policy

    # --- refusals ---------------------------------------------------------------------

    def _refusal(self, state: LimitState, tokens: int | None) -> InferenceError:
        owner, what = _words(state.name)
        details = {"limit": state.name}
        if state.name.endswith("-per-minute"):
            if tokens is None or state.remaining == 0:
                head = f"{owner} limit of {state.limit:,} {what} is used up."
            else:
                head = (
                    f"{owner} limit of {state.limit:,} {what} has {state.remaining:,} left, "
                    f"fewer than this request may use (up to {tokens:,})."
                )
            return TokenRateLimited(
                f"{head} Try again in {_seconds(state.reset_s)}.",
                retryable=True,
                details=details,
                state=state,
                retry_after_s=state.reset_s,
            )
        when = self._reset_time(state)
        if tokens is None or state.remaining == 0:
            message = f"{owner} {what} of {state.limit:,} tokens is used up. It resets at {when}."
        else:
            message = (
                f"{owner} {what} of {state.limit:,} tokens has {state.remaining:,} left, fewer "
                f"than this request may use (up to {tokens:,}). Ask for fewer output tokens "
                f"(max_tokens), or wait until it resets at {when}."
            )
        return TokenQuotaExceeded(message, details=details, state=state)

    def _never_fits(self, state: LimitState, tokens: int) -> InferenceError:
        owner, what = _words(state.name)
        per_minute = state.name.endswith("-per-minute")
        whole = (
            f"limit of {state.limit:,} {what}"
            if per_minute
            else f"{what} of {state.limit:,} tokens"
        )
        message = (
            f"This request may use up to {tokens:,} tokens, more than {owner.lower()} whole "
            f"{whole}, so it can never be served. Ask for fewer output tokens (max_tokens) "
            f"or send a shorter prompt."
        )
        details = {"limit": state.name, "tokens": tokens}
        if per_minute:
            return TokenRateLimited(
                message, retryable=False, details=details, state=state, retry_after_s=0.0
            )
        return TokenQuotaExceeded(message, details=details, state=state)

    def _reset_time(self, state: LimitState) -> str:
        # Rounded to the minute: the period ends on one, and the clocks may differ a little.
        at = round((self._clock() + state.reset_s) / 60) * 60
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _words(name: str) -> tuple[str, str]:
    """Whose limit, and what it counts, in words: ("Your organization's", "daily token
    quota") for ``tenant-tokens-per-day``."""
    scope, measure = name.split("-", 1)
    owner = "Your" if scope == "user" else "Your organization's"
    what = {
        "tokens-per-day": "daily token quota",
        "tokens-per-month": "monthly token quota",
    }.get(measure, measure.replace("-", " "))
    return owner, what


def _seconds(seconds: float) -> str:
    whole = max(1, math.ceil(seconds))
    return f"{whole} second" if whole == 1 else f"{whole} seconds"


def _duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go's notation): 20ms, 1.5s, 6m0s."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
