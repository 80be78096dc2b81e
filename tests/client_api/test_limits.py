"""Rate limits and token quotas: the stores' shared contract, exactness across replicas
sharing one real Redis, the limiter's refusals and headers, and Redis going away.

Time is a fake clock wherever windows and periods are asserted (both stores take one);
the replica tests use Redis ``TIME``, as production does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis

from client_api.edge.limits import (
    WINDOW_S,
    Hold,
    InProcessLimitStore,
    Limit,
    LimitsSettings,
    LimitStore,
    Measure,
    RateLimited,
    RateLimiter,
    RedisLimitStore,
    ResilientLimitStore,
    Verdict,
    period_of,
)
from inferencing.contracts import (
    LimitState,
    TokenBudget,
    TokenQuotaExceeded,
    TokenRateLimited,
    TokenReservation,
)
from inferencing.gateway.redis_state import redis_client
from tests.support.redis_server import RedisServer, private_redis

NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp() + 0.25
"""A Saturday noon, a quarter second past (so that rounding would show)."""
FAILOVER_LOGGER = "inferencing.gateway.redis_state"


class FakeClock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Who:
    """Satisfies ``InferenceCaller``."""

    def __init__(self, user_id: str = "adele", tenant_id: str = "contoso") -> None:
        self.user_id = user_id
        self.tenant_id = tenant_id


def at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


def limit(measure: Measure, value: int, scope: str = "user") -> Limit:
    label = {
        Measure.REQUESTS_PER_MINUTE: "requests-per-minute",
        Measure.TOKENS_PER_MINUTE: "tokens-per-minute",
        Measure.TOKENS_PER_DAY: "tokens-per-day",
        Measure.TOKENS_PER_MONTH: "tokens-per-month",
    }[measure]
    owner = "user:adele" if scope == "user" else "tenant"
    return Limit(f"{scope}-{label}", f"{{contoso}}:{owner}:{label}", value, measure)


def rpm(value: int, scope: str = "user") -> Limit:
    return limit(Measure.REQUESTS_PER_MINUTE, value, scope)


def tpm(value: int, scope: str = "user") -> Limit:
    return limit(Measure.TOKENS_PER_MINUTE, value, scope)


def per_day(value: int, scope: str = "user") -> Limit:
    return limit(Measure.TOKENS_PER_DAY, value, scope)


def per_month(value: int, scope: str = "user") -> Limit:
    return limit(Measure.TOKENS_PER_MONTH, value, scope)


async def remaining(store: LimitStore, *limits: Limit) -> list[int]:
    return [state.remaining for state in (await store.peek(limits)).states]


async def keys_under(redis: Redis, prefix: str) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in await redis.keys(prefix + "*"))


def held(verdict: Verdict) -> Hold:
    assert verdict.admitted and verdict.hold is not None
    return verdict.hold


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for this module (the outage tests bring their own)."""
    with private_redis() as server:
        yield server


async def connect(server: RedisServer, timeout_s: float = 2.0) -> Redis:
    return redis_client(server.url, connect_timeout_s=timeout_s, command_timeout_s=timeout_s)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = await connect(redis_server)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid4().hex}:"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- the contract every store passes -------------------------------------------------


class LimitStoreContract:
    """Mixed into a test class that provides ``store``: an empty store on ``clock``."""

    @pytest.fixture
    def store(self, clock: FakeClock) -> LimitStore:
        raise NotImplementedError("a store's test class must provide the store fixture")

    async def test_a_request_window_admits_exactly_its_limit_then_says_when_room_returns(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = rpm(5)
        for n in range(5):
            verdict = await store.acquire([window], 1)
            assert verdict.admitted
            assert verdict.states[0].remaining == 4 - n
            clock.now += 1
        clock.now = NOON + 10
        refused = await store.acquire([window], 1)
        assert not refused.admitted and refused.hold is None
        assert refused.binding == LimitState("user-requests-per-minute", 5, 0, 50.0)

    async def test_the_window_slides_it_does_not_reset_on_the_minute(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = rpm(3)
        for offset in (0, 20, 40):
            clock.now = NOON + offset
            assert (await store.acquire([window], 1)).admitted
        clock.now = NOON + 59.999
        assert not (await store.acquire([window], 1)).admitted
        clock.now = NOON + WINDOW_S  # the first request leaves the window now
        assert await remaining(store, window) == [1]
        assert (await store.acquire([window], 1)).admitted
        refused = await store.acquire([window], 1)
        assert refused.binding is not None
        assert refused.binding.reset_s == pytest.approx(20.0)

    async def test_no_burst_of_twice_the_limit_across_a_minute_boundary(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = rpm(60)
        clock.now = at(2026, 11, 21, 12, 0, 59)
        verdicts = [await store.acquire([window], 1) for _ in range(60)]
        assert all(v.admitted for v in verdicts)
        clock.now = at(2026, 11, 21, 12, 1, 1)  # a new calendar minute
        assert not (await store.acquire([window], 1)).admitted

    async def test_tokens_are_held_and_a_refusal_says_when_the_request_would_fit(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = tpm(1_000)
        assert (await store.acquire([window], 600)).states[0].remaining == 400
        clock.now += 10
        assert (await store.acquire([window], 300)).states[0].remaining == 100
        clock.now += 10
        refused = await store.acquire([window], 500)
        # 400 more are needed: the 600 held 20 s ago free them in 40 s.
        assert refused.binding == LimitState("user-tokens-per-minute", 1_000, 100, 40.0)
        assert (await store.acquire([window], 100)).states[0].remaining == 0

    async def test_settling_for_fewer_tokens_frees_room(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = tpm(1_000)
        hold = held(await store.acquire([window], 800))
        assert not (await store.acquire([window], 800)).admitted
        await store.settle(hold, 150)
        assert await remaining(store, window) == [850]
        assert (await store.acquire([window], 800)).admitted

    async def test_settling_to_nothing_removes_the_entry(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = tpm(1_000)
        first = held(await store.acquire([window], 700))
        clock.now += 5
        await store.acquire([window], 100)
        await store.settle(first, 0)
        verdict = await store.peek([window])
        # The oldest entry is now the one of 5 s later.
        assert verdict.states[0] == LimitState("user-tokens-per-minute", 1_000, 900, 60.0)

    async def test_settling_for_more_than_was_held_counts_the_difference(
        self, store: LimitStore
    ) -> None:
        window, quota = tpm(1_000), per_day(10_000)
        hold = held(await store.acquire([window, quota], 100))
        await store.settle(hold, 1_100)
        assert await remaining(store, window, quota) == [0, 8_900]
        assert not (await store.peek([window])).admitted

    async def test_a_settlement_after_the_entry_left_the_window_changes_nothing(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window = tpm(1_000)
        hold = held(await store.acquire([window], 500))
        clock.now += WINDOW_S + 1
        await store.settle(hold, 900)
        assert await remaining(store, window) == [1_000]

    async def test_every_limit_has_room_or_none_records_anything(self, store: LimitStore) -> None:
        user, tenant = tpm(1_000), tpm(500, "tenant")
        refused = await store.acquire([user, tenant], 600)
        assert not refused.admitted
        assert refused.binding is not None and refused.binding.name == "tenant-tokens-per-minute"
        assert await remaining(store, user, tenant) == [1_000, 500]

    async def test_the_binding_limit_is_the_one_with_the_longest_wait(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        window, quota = tpm(100), per_day(100, "tenant")
        await store.acquire([window, quota], 80)
        clock.now += 1
        refused = await store.acquire([window, quota], 30)
        assert [s.remaining for s in refused.states] == [20, 20]
        assert refused.states[0].reset_s == pytest.approx(59.0)
        assert refused.binding == refused.states[1]
        assert refused.binding.reset_s == pytest.approx(12 * 3600 - 1.25)

    async def test_peek_records_nothing_and_refuses_only_what_is_used_up(
        self, store: LimitStore
    ) -> None:
        window, quota = tpm(100), per_day(1_000)
        for _ in range(3):
            peeked = await store.peek([window, quota])
            assert peeked.admitted and peeked.hold is None
            assert [s.remaining for s in peeked.states] == [100, 1_000]
        await store.acquire([window, quota], 99)
        assert (await store.peek([window, quota])).admitted
        await store.acquire([window, quota], 1)
        exhausted = await store.peek([window, quota])
        assert not exhausted.admitted
        assert exhausted.binding == LimitState("user-tokens-per-minute", 100, 0, 60.0)

    async def test_a_day_quota_refuses_until_midnight_utc_then_starts_over(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        quota = per_day(1_000)
        clock.now = at(2026, 11, 21, 23, 59, 30)
        before_midnight = held(await store.acquire([quota], 1_000))
        refused = await store.acquire([quota], 1)
        assert refused.binding == LimitState("user-tokens-per-day", 1_000, 0, 30.0)
        clock.now = at(2026, 11, 22)
        assert (await store.acquire([quota], 1_000)).admitted
        # Settling yesterday's call leaves today's count alone.
        await store.settle(before_midnight, 0)
        assert await remaining(store, quota) == [0]

    @pytest.mark.parametrize(
        ("last_second", "next_month"),
        [
            ((2028, 2, 29, 23, 59, 59), (2028, 3, 1)),  # leap year
            ((2027, 2, 28, 23, 59, 59), (2027, 3, 1)),
            ((2026, 12, 31, 23, 59, 59), (2027, 1, 1)),
            ((2026, 4, 30, 23, 59, 59), (2026, 5, 1)),
        ],
    )
    async def test_a_month_quota_rolls_over_on_the_first_of_the_month(
        self,
        store: LimitStore,
        clock: FakeClock,
        last_second: tuple[int, ...],
        next_month: tuple[int, ...],
    ) -> None:
        quota = per_month(5_000, "tenant")
        clock.now = at(*last_second)
        verdict = await store.acquire([quota], 5_000)
        assert verdict.states[0] == LimitState("tenant-tokens-per-month", 5_000, 0, 1.0)
        assert not (await store.acquire([quota], 1)).admitted
        clock.now = at(*next_month)
        fresh = await store.acquire([quota], 1)
        assert fresh.admitted and fresh.states[0].remaining == 4_999

    async def test_period_ends_agree_with_the_calendar(
        self, store: LimitStore, clock: FakeClock
    ) -> None:
        rng = random.Random(20261121)
        for n in range(150):
            clock.now = rng.uniform(0, at(2100, 1, 1))
            when = datetime.fromtimestamp(clock.now, UTC)
            month_end = datetime(
                when.year + when.month // 12, when.month % 12 + 1, 1, tzinfo=UTC
            ).timestamp()
            day_end = datetime(when.year, when.month, when.day, tzinfo=UTC).timestamp() + 86_400
            quotas = [per_day(10 + n), per_month(10 + n)]
            states = (await store.peek(quotas)).states
            assert states[0].reset_s == pytest.approx(day_end - clock.now, abs=1e-6), when
            assert states[1].reset_s == pytest.approx(month_end - clock.now, abs=1e-6), when
            assert period_of(Measure.TOKENS_PER_MONTH, clock.now)[1] == month_end


class TestInProcessLimitStore(LimitStoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock) -> LimitStore:
        return InProcessLimitStore(clock=clock)


class TestRedisLimitStore(LimitStoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock, redis: Redis, prefix: str) -> LimitStore:
        return RedisLimitStore(redis, prefix=prefix, clock=clock)


async def test_the_in_process_store_forgets_idle_windows_and_ended_quotas(
    clock: FakeClock,
) -> None:
    store = InProcessLimitStore(clock=clock)
    for user in range(100):
        key = f"{{contoso}}:user:{user}:"
        limits = [
            Limit("user-tokens-per-minute", key + "tpm", 1_000, Measure.TOKENS_PER_MINUTE),
            Limit("user-tokens-per-day", key + "tpd", 1_000, Measure.TOKENS_PER_DAY),
        ]
        await store.acquire(limits, 10)
    assert len(store._windows) == len(store._quotas) == 100
    clock.now = at(2026, 11, 22, 0, 0, 1)
    await store.peek([rpm(1)])
    assert store._windows == {} and store._quotas == {}


async def test_the_in_process_stores_holds_have_ids_of_their_own(clock: FakeClock) -> None:
    # The ids come from a counter, not random bytes: two holds sharing one would let
    # settling the first move the second's tokens.
    store = InProcessLimitStore(clock=clock)
    tpm = Limit("user-tokens-per-minute", "{contoso}:user:u:tpm", 1_000, Measure.TOKENS_PER_MINUTE)
    holds = [(await store.acquire([tpm], 100)).hold for _ in range(5)]
    assert len({hold.id for hold in holds if hold is not None}) == 5
    assert holds[0] is not None
    await store.settle(holds[0], 0)
    assert (await store.peek([tpm])).states[0].remaining == 1_000 - 400


# --- Redis: many replicas, bounded memory -----------------------------------------------


def pool_sized() -> list[asyncio.Semaphore]:
    """Per replica, no more calls in flight than its client's pool has connections
    (redis-py's pool refuses a call beyond them rather than make it wait)."""
    return [asyncio.Semaphore(64) for _ in range(3)]


async def test_three_replicas_admit_exactly_the_requests_per_minute_limit(
    redis_server: RedisServer, prefix: str
) -> None:
    replicas = [await connect(redis_server) for _ in range(3)]
    in_flight = pool_sized()
    try:
        settings = LimitsSettings(user_requests_per_minute=60)
        limiters = [RateLimiter(RedisLimitStore(r, prefix=prefix), settings) for r in replicas]
        caller = Who()

        async def admit(n: int) -> RateLimited | None:
            try:
                async with in_flight[n % 3]:
                    await limiters[n % 3].admit(caller)
            except RateLimited as refused:
                return refused
            return None

        outcomes = await asyncio.gather(*(admit(n) for n in range(600)))
        refusals = [o for o in outcomes if o is not None]
        assert len(outcomes) - len(refusals) == 60
        assert {r.state.name for r in refusals} == {"user-requests-per-minute"}
        assert all(0 < r.retry_after_s <= WINDOW_S for r in refusals)
        key = prefix + "{contoso}:user:adele:requests-per-minute"
        assert await replicas[0].zcard(key) == 60
    finally:
        for client in replicas:
            await client.aclose()


async def test_three_replicas_never_hold_more_tokens_than_the_limit(
    redis_server: RedisServer, prefix: str
) -> None:
    replicas = [await connect(redis_server) for _ in range(3)]
    in_flight = pool_sized()
    try:
        settings = LimitsSettings(tenant_tokens_per_minute=10_000)
        limiters = [RateLimiter(RedisLimitStore(r, prefix=prefix), settings) for r in replicas]
        rng = random.Random(7)
        sizes = [rng.randint(100, 1_500) for _ in range(300)]

        async def reserve(n: int, size: int) -> TokenReservation | None:
            user = Who(user_id=f"user-{n % 17}")
            try:
                async with in_flight[n % 3]:
                    return await limiters[n % 3].reserve(user, size)
            except TokenRateLimited as refused:
                # Refused only for want of room, never as too large to fit at all.
                refusals.append((refused, size))
                return None

        refusals: list[tuple[TokenRateLimited, int]] = []

        first = await asyncio.gather(*(reserve(n, s) for n, s in enumerate(sizes)))
        held = [r for r in first if r is not None]
        in_use = sum(r.tokens for r in held)
        assert 10_000 - max(sizes) < in_use <= 10_000

        # The calls used half what they reserved: the room they leave is filled again,
        # never beyond the limit.
        await asyncio.gather(*(limiters[0].reconcile(r, r.tokens // 2) for r in held))
        in_use = sum(r.tokens // 2 for r in held)
        (state,) = await limiters[1].check_tokens(Who())
        assert state.remaining == 10_000 - in_use
        second = await asyncio.gather(*(reserve(n, s) for n, s in enumerate(sizes)))
        in_use += sum(r.tokens for r in second if r is not None)
        assert 10_000 - max(sizes) < in_use <= 10_000
        assert refusals
        for refused, size in refusals:
            assert refused.retryable and refused.state is not None
            assert refused.state.remaining < size
    finally:
        for client in replicas:
            await client.aclose()


async def test_keys_share_the_tenants_hash_tag_expire_and_are_pruned(
    redis: Redis, prefix: str, clock: FakeClock
) -> None:
    store = RedisLimitStore(redis, prefix=prefix, clock=clock)
    limits = [rpm(1_000), tpm(100_000, "tenant"), per_day(10**9), per_month(10**9, "tenant")]
    for _ in range(50):
        await store.acquire(limits, 10)
    keys = await keys_under(redis, prefix)
    assert len(keys) == 5  # one each, and the token window's amounts
    assert all(k.startswith(prefix + "{contoso}:") for k in keys)
    for key in keys:
        ttl_ms = await redis.pttl(key)
        if key.endswith(("tokens-per-day", "tokens-per-month")):
            assert 0 < ttl_ms <= (at(2026, 12, 1) - clock.now + 1) * 1000
        else:
            assert 0 < ttl_ms <= (WINDOW_S + 1) * 1000

    clock.now += WINDOW_S + 1
    await store.acquire(limits, 10)
    window = prefix + "{contoso}:tenant:tokens-per-minute"
    assert await redis.zcard(window) == 1
    assert await redis.hlen(window + ":amounts") == 2  # the entry and the sum
    assert await redis.zcard(prefix + "{contoso}:user:adele:requests-per-minute") == 1


async def test_ids_cannot_reach_into_another_tenants_keys(redis: Redis, prefix: str) -> None:
    limiter = RateLimiter(
        RedisLimitStore(redis, prefix=prefix), LimitsSettings(user_requests_per_minute=1)
    )
    await limiter.admit(Who(user_id="adele", tenant_id="contoso"))
    # Were ids not escaped, this caller's key would be contoso's adele's.
    await limiter.admit(Who(user_id="adele", tenant_id="contoso}:user:x"))
    assert await keys_under(redis, prefix) == [
        prefix + "{contoso%7D%3Auser%3Ax}:user:adele:requests-per-minute",
        prefix + "{contoso}:user:adele:requests-per-minute",
    ]


async def test_redis_and_in_process_stores_agree_step_by_step(redis: Redis, prefix: str) -> None:
    """A long random run through both stores: every verdict is identical."""
    rng = random.Random(20261121)
    clock = FakeClock(at(2026, 11, 30, 23, 58) + 0.123456789)
    reference = InProcessLimitStore(clock=clock)
    shared = RedisLimitStore(redis, prefix=prefix, clock=clock)
    menus = [
        [rpm(7), rpm(11, "tenant")],
        [tpm(900), tpm(1_500, "tenant"), per_day(4_000), per_month(6_000, "tenant")],
        [tpm(900), per_day(4_000, "tenant")],
    ]
    holds: list[tuple[Hold, Hold]] = []
    for step in range(1_200):
        clock.now += rng.choice([0.0, 0.001, 0.5, 1.0, 7.3, 20.0, 59.999])
        if holds and rng.random() < 0.3:
            mine, theirs = holds.pop(rng.randrange(len(holds)))
            used = rng.choice([0, mine.amount // 3, mine.amount, mine.amount + 50])
            await reference.settle(mine, used)
            await shared.settle(theirs, used)
            continue
        limits = rng.choice(menus)
        if rng.random() < 0.15:
            expected, actual = await reference.peek(limits), await shared.peek(limits)
        else:
            amount = 1 if limits is menus[0] else rng.randint(1, 700)
            expected = await reference.acquire(limits, amount)
            actual = await shared.acquire(limits, amount)
            if expected.hold is not None and actual.hold is not None:
                holds.append((expected.hold, actual.hold))
        assert (actual.admitted, actual.states, actual.binding) == (
            expected.admitted,
            expected.states,
            expected.binding,
        ), f"step {step}"


# --- the limiter ---------------------------------------------------------------------


def limiter(clock: FakeClock, **settings: object) -> RateLimiter:
    return RateLimiter(
        InProcessLimitStore(clock=clock), LimitsSettings.model_validate(settings), clock=clock
    )


def test_the_limiter_is_a_token_budget(clock: FakeClock) -> None:
    assert isinstance(limiter(clock), TokenBudget)


async def test_admit_counts_requests_per_user_and_per_tenant(clock: FakeClock) -> None:
    limits = limiter(clock, user_requests_per_minute=2, tenant_requests_per_minute=3)
    states = await limits.admit(Who("adele"))
    assert [(s.name, s.remaining) for s in states] == [
        ("user-requests-per-minute", 1),
        ("tenant-requests-per-minute", 2),
    ]
    await limits.admit(Who("adele"))
    clock.now += 15
    with pytest.raises(RateLimited) as refused:
        await limits.admit(Who("adele"))
    assert refused.value.state == LimitState("user-requests-per-minute", 2, 0, 45.0)
    assert refused.value.retry_after_s == 45.0
    assert refused.value.message == (
        "Your limit of 2 requests per minute is reached. Try again in 45 seconds."
    )
    assert [s.name for s in refused.value.states] == [
        "user-requests-per-minute",
        "tenant-requests-per-minute",
    ]
    await limits.admit(Who("bianca"))
    with pytest.raises(RateLimited) as tenant_refused:
        await limits.admit(Who("carmen"))
    assert tenant_refused.value.message.startswith(
        "Your organization's limit of 3 requests per minute is reached."
    )


async def test_without_limits_nothing_is_stored(redis: Redis, prefix: str) -> None:
    limits = RateLimiter(RedisLimitStore(redis, prefix=prefix), LimitsSettings())
    assert await limits.admit(Who()) == []
    assert await limits.check_tokens(Who()) == []
    reservation = await limits.reserve(Who(), 5_000)
    await limits.reconcile(reservation, 10)
    assert await redis.keys(prefix + "*") == []


async def test_tenants_override_the_defaults(clock: FakeClock) -> None:
    limits = limiter(
        clock,
        user_requests_per_minute=1,
        tenants={
            "fabrikam": {"user_requests_per_minute": 3},
            "northwind": {"user_requests_per_minute": None, "user_tokens_per_day": 10},
        },
    )
    for tenant, admitted in (("contoso", 1), ("fabrikam", 3)):
        for _ in range(admitted):
            await limits.admit(Who(tenant_id=tenant))
        with pytest.raises(RateLimited):
            await limits.admit(Who(tenant_id=tenant))
    for _ in range(10):
        assert await limits.admit(Who(tenant_id="northwind")) == []
    with pytest.raises(TokenQuotaExceeded):
        await limits.reserve(Who(tenant_id="northwind"), 11)
    await limits.reserve(Who(tenant_id="contoso"), 11)


async def test_a_reservation_beyond_the_room_left_is_retryable_and_says_when(
    clock: FakeClock,
) -> None:
    limits = limiter(clock, user_tokens_per_minute=1_000)
    await limits.reserve(Who(), 600)
    clock.now += 12
    with pytest.raises(TokenRateLimited) as refused:
        await limits.reserve(Who(), 500)
    error = refused.value
    assert error.retryable
    assert error.state == LimitState("user-tokens-per-minute", 1_000, 400, 48.0)
    assert error.retry_after_s == 48.0
    assert error.message == (
        "Your limit of 1,000 tokens per minute has 400 left, fewer than this request may "
        "use (up to 500). Try again in 48 seconds."
    )


async def test_a_reservation_larger_than_a_whole_minute_can_never_fit(clock: FakeClock) -> None:
    limits = limiter(clock, tenant_tokens_per_minute=1_000)
    with pytest.raises(TokenRateLimited) as refused:
        await limits.reserve(Who(), 1_001)
    assert not refused.value.retryable
    assert refused.value.message.startswith(
        "This request may use up to 1,001 tokens, more than your organization's whole limit "
        "of 1,000 tokens per minute, so it can never be served."
    )


async def test_an_exhausted_quota_is_refused_with_when_it_resets(clock: FakeClock) -> None:
    limits = limiter(clock, user_tokens_per_day=1_000, tenant_tokens_per_month=5_000)
    await limits.reserve(Who(), 900)
    with pytest.raises(TokenQuotaExceeded) as short:
        await limits.reserve(Who(), 200)
    assert short.value.state == LimitState("user-tokens-per-day", 1_000, 100, 12 * 3600 - 0.25)
    assert short.value.message == (
        "Your daily token quota of 1,000 tokens has 100 left, fewer than this request may "
        "use (up to 200). Ask for fewer output tokens (max_tokens), or wait until it resets "
        "at 2026-11-22 00:00 UTC."
    )
    await limits.reserve(Who(), 100)
    with pytest.raises(TokenQuotaExceeded) as used_up:
        await limits.check_tokens(Who())
    assert used_up.value.message == (
        "Your daily token quota of 1,000 tokens is used up. It resets at 2026-11-22 00:00 UTC."
    )
    for user in ("bianca", "carmen", "dora", "emma"):
        await limits.reserve(Who(user), 1_000)
    with pytest.raises(TokenQuotaExceeded) as tenant:
        await limits.check_tokens(Who("fiona"))
    assert tenant.value.message == (
        "Your organization's monthly token quota of 5,000 tokens is used up. It resets at "
        "2026-12-01 00:00 UTC."
    )
    only_monthly = limiter(clock, tenant_tokens_per_month=5_000)
    with pytest.raises(TokenQuotaExceeded) as whole:
        await only_monthly.reserve(Who(), 5_001)
    assert whole.value.message == (
        "This request may use up to 5,001 tokens, more than your organization's whole monthly "
        "token quota of 5,000 tokens, so it can never be served. Ask for fewer output tokens "
        "(max_tokens) or send a shorter prompt."
    )


async def test_check_tokens_refuses_a_used_up_window_and_otherwise_reports(
    clock: FakeClock,
) -> None:
    limits = limiter(clock, user_tokens_per_minute=100, tenant_tokens_per_day=10_000)
    states = await limits.check_tokens(Who())
    assert [(s.name, s.remaining) for s in states] == [
        ("user-tokens-per-minute", 100),
        ("tenant-tokens-per-day", 10_000),
    ]
    await limits.reserve(Who(), 100)
    clock.now += 30
    with pytest.raises(TokenRateLimited) as refused:
        await limits.check_tokens(Who())
    assert refused.value.retry_after_s == 30.0
    assert refused.value.message == (
        "Your limit of 100 tokens per minute is used up. Try again in 30 seconds."
    )
    assert await limits.check_tokens(Who("bianca"))


async def test_reconcile_frees_what_was_not_used(clock: FakeClock) -> None:
    limits = limiter(clock, user_tokens_per_minute=1_000, user_tokens_per_month=100_000)
    reservation = await limits.reserve(Who(), 900)
    assert isinstance(reservation, TokenReservation) and reservation.tokens == 900
    await limits.reconcile(reservation, 250)
    assert [s.remaining for s in await limits.check_tokens(Who())] == [750, 99_750]
    await limits.reconcile(TokenReservation("not ours", 5), 0)  # ignored


def test_headers_show_the_tightest_limits_as_openai_does() -> None:
    states = [
        LimitState("user-requests-per-minute", 60, 12, 30.5),
        LimitState("tenant-requests-per-minute", 600, 500, 2.0),
        LimitState("user-tokens-per-minute", 10_000, 9_000, 0.02),
        LimitState("tenant-tokens-per-day", 1_000_000, 5_000, 3_700.0),
    ]
    assert RateLimiter.headers(states) == {
        "X-RateLimit-Limit-Requests": "60",
        "X-RateLimit-Remaining-Requests": "12",
        "X-RateLimit-Reset-Requests": "30.5s",
        "X-RateLimit-Limit-Tokens": "1000000",
        "X-RateLimit-Remaining-Tokens": "5000",
        "X-RateLimit-Reset-Tokens": "1h1m40s",
    }
    refused = [LimitState("user-tokens-per-minute", 10_000, 0, 0.0199)]
    assert RateLimiter.headers(refused, retry_after_s=0.0199) == {
        "Retry-After": "1",
        "retry-after-ms": "20",
        "X-RateLimit-Limit-Tokens": "10000",
        "X-RateLimit-Remaining-Tokens": "0",
        "X-RateLimit-Reset-Tokens": "20ms",
    }
    assert RateLimiter.headers([LimitState("user-requests-per-minute", 5, 0, 360.0)]) == {
        "X-RateLimit-Limit-Requests": "5",
        "X-RateLimit-Remaining-Requests": "0",
        "X-RateLimit-Reset-Requests": "6m0s",
    }
    assert RateLimiter.headers([]) == {}


# --- settings ------------------------------------------------------------------------


class _Root(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMINA_", env_nested_delimiter="__")

    limits: LimitsSettings = LimitsSettings()


def test_settings_come_from_the_environment_and_can_lift_a_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert LimitsSettings().for_tenant("contoso") == dict.fromkeys(
        [
            "user_requests_per_minute",
            "tenant_requests_per_minute",
            "user_tokens_per_minute",
            "tenant_tokens_per_minute",
            "user_tokens_per_day",
            "tenant_tokens_per_day",
            "user_tokens_per_month",
            "tenant_tokens_per_month",
        ]
    )
    assert not LimitsSettings().any_token_limits
    monkeypatch.setenv("LAMINA_LIMITS__USER_REQUESTS_PER_MINUTE", "120")
    monkeypatch.setenv("LAMINA_LIMITS__TENANT_TOKENS_PER_DAY", "unlimited")
    monkeypatch.setenv(
        "LAMINA_LIMITS__TENANTS",
        '{"fabrikam": {"user_requests_per_minute": null, "tenant_tokens_per_month": 9000}}',
    )
    limits = _Root().limits
    assert limits.user_requests_per_minute == 120
    assert limits.tenant_tokens_per_day is None
    assert limits.for_tenant("contoso")["user_requests_per_minute"] == 120
    fabrikam = limits.for_tenant("fabrikam")
    assert fabrikam["user_requests_per_minute"] is None
    assert fabrikam["tenant_tokens_per_month"] == 9000
    assert limits.any_token_limits


def test_invalid_limits_fail_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="user_requests_per_minute"):
        LimitsSettings.model_validate({"user_requests_per_minute": 0})
    with pytest.raises(ValidationError, match="user_tokens_per_dya"):
        LimitsSettings.model_validate({"tenants": {"contoso": {"user_tokens_per_dya": 5}}})


# --- Redis going away ----------------------------------------------------------------


class CountingLimitStore:
    """Passes every step through to a store, counting them."""

    def __init__(self, inner: LimitStore) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    async def acquire(self, limits: Sequence[Limit], amount: int) -> Verdict:
        self.calls += 1
        return await self.inner.acquire(limits, amount)

    async def peek(self, limits: Sequence[Limit]) -> Verdict:
        self.calls += 1
        return await self.inner.peek(limits)

    async def settle(self, hold: Hold, amount: int) -> None:
        self.calls += 1
        await self.inner.settle(hold, amount)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of this test's own, which it stops and starts."""
    with private_redis() as server:
        yield server


def failover_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == FAILOVER_LOGGER and r.levelno == logging.WARNING
    ]


async def test_limits_hold_from_the_in_process_store_while_redis_is_down(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=FAILOVER_LOGGER)
    client = redis_client(own_redis.url, connect_timeout_s=0.5, command_timeout_s=0.5)
    monotonic = FakeClock(100.0)
    primary = CountingLimitStore(RedisLimitStore(client, prefix=prefix))
    fallback = InProcessLimitStore()
    store = ResilientLimitStore(primary, fallback, retry_after_s=5.0, clock=monotonic)
    limits = RateLimiter(
        store, LimitsSettings(user_requests_per_minute=100, user_tokens_per_minute=1_000)
    )
    try:
        assert store.describe() == {"rate_limits": "redis"}
        await limits.admit(Who())
        in_redis = await limits.reserve(Who(), 600)
        assert await client.exists(prefix + "{contoso}:user:adele:requests-per-minute") == 1

        own_redis.stop()
        # Requests keep being answered, promptly, from this replica's own state.
        states = await asyncio.wait_for(limits.admit(Who()), timeout=5)
        assert states[0].remaining == 99  # the in-process store starts empty
        assert store.degraded
        assert store.describe()["rate_limits"].startswith("in-process (redis unreachable since ")
        await asyncio.wait_for(limits.reconcile(in_redis, 100), timeout=5)  # kept, no error
        calls = primary.calls
        for _ in range(20):
            await asyncio.wait_for(limits.admit(Who()), timeout=5)
        in_fallback = await asyncio.wait_for(limits.reserve(Who(), 700), timeout=5)
        with pytest.raises(TokenRateLimited):
            await asyncio.wait_for(limits.reserve(Who(), 400), timeout=5)
        assert primary.calls == calls, "Redis is not tried again before retry_after_s"
        [warning] = failover_warnings(caplog)
        assert warning.startswith("gateway state: Redis unreachable, using in-process state")

        own_redis.start()  # empty: it kept nothing
        monotonic.now += 5.0
        async with asyncio.timeout(5):
            states = await limits.admit(Who())
        assert states[0].remaining == 99  # counted in Redis again
        assert not store.degraded
        assert store.describe() == {"rate_limits": "redis"}
        assert len(failover_warnings(caplog)) == 1, "one warning per outage"
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        # A reservation is settled where it was made.
        await limits.reconcile(in_fallback, 100)
        (window,) = (await fallback.peek([tpm(1_000)])).states
        assert window.remaining == 900
    finally:
        await client.aclose()


async def test_a_redis_that_never_answers_is_given_up_on_within_its_timeouts(
    prefix: str,
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = redis_client(
            f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.3, command_timeout_s=0.3
        )
        try:
            store = ResilientLimitStore(
                RedisLimitStore(client, prefix=prefix), InProcessLimitStore()
            )
            limits = RateLimiter(store, LimitsSettings(user_requests_per_minute=1))
            await asyncio.wait_for(limits.admit(Who()), timeout=5)
            assert store.degraded
            with pytest.raises(RateLimited):
                await asyncio.wait_for(limits.admit(Who()), timeout=5)
        finally:
            await client.aclose()


async def test_a_failed_reconciliation_is_logged_not_raised(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_client(own_redis.url, connect_timeout_s=0.5, command_timeout_s=0.5)
    try:
        limits = RateLimiter(
            RedisLimitStore(client, prefix=prefix), LimitsSettings(user_tokens_per_day=1_000)
        )
        reservation = await limits.reserve(Who(), 500)
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="client_api.edge.limits"):
            await asyncio.wait_for(limits.reconcile(reservation, 10), timeout=5)
        assert any("not reconciled" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()


def test_the_two_stores_of_a_resilient_one_must_be_told_apart() -> None:
    with pytest.raises(ValueError, match="different names"):
        ResilientLimitStore(InProcessLimitStore(), InProcessLimitStore())
