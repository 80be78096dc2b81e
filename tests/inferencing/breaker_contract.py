"""The contract every ``BreakerStore`` passes (mix into a test class that provides a
``breaker_store`` fixture: an empty store).

Time is a fake clock: the tests pass plain ``now`` values, far from zero so that
rounding in a store's time arithmetic would show.
"""

from __future__ import annotations

import pytest

from inferencing.gateway.breaker import Admission, BreakerState, BreakerStore
from inferencing.settings import BreakerSettings

POLICY = BreakerSettings(
    failure_rate=0.5, min_calls=4, window_s=10.0, open_s=5.0, half_open_probes=2
)
"""Buckets of 1 s; opens on 2 failures in 4 calls; probes 5 s after opening."""

T0 = 1_700_000_000.25

CLOSED = Admission(True, BreakerState.CLOSED)
PROBE = Admission(True, BreakerState.HALF_OPEN, probe=True)
NO_MORE_PROBES = Admission(False, BreakerState.HALF_OPEN)


async def record_many(
    store: BreakerStore, key: str, now: float, *, ok: int = 0, failed: int = 0
) -> BreakerState:
    state = await store.state(key, now, POLICY)
    for outcome in [True] * ok + [False] * failed:
        state = await store.record(key, now, POLICY, ok=outcome, probe=False)
    return state


async def trip(store: BreakerStore, key: str, now: float) -> None:
    assert await record_many(store, key, now, failed=POLICY.min_calls) is BreakerState.OPEN


class BreakerStoreContract:
    @pytest.fixture
    def breaker_store(self) -> BreakerStore:
        """Overridden by each store's test class: an empty store."""
        raise NotImplementedError("a store's test class must provide the breaker_store fixture")

    async def test_an_unknown_breaker_is_closed_and_admits(
        self, breaker_store: BreakerStore
    ) -> None:
        assert await breaker_store.state("never-seen", T0, POLICY) is BreakerState.CLOSED
        assert await breaker_store.admit("never-seen", T0, POLICY) == CLOSED

    async def test_stays_closed_below_min_calls(self, breaker_store: BreakerStore) -> None:
        state = await record_many(breaker_store, "d", T0, failed=POLICY.min_calls - 1)
        assert state is BreakerState.CLOSED
        assert await breaker_store.admit("d", T0, POLICY) == CLOSED

    async def test_opens_once_the_failure_rate_is_reached(
        self, breaker_store: BreakerStore
    ) -> None:
        assert await record_many(breaker_store, "d", T0, ok=3, failed=2) is BreakerState.CLOSED
        # 3 of 6 failed: the rate (0.5) is reached.
        assert await record_many(breaker_store, "d", T0 + 0.5, failed=1) is BreakerState.OPEN
        assert await breaker_store.state("d", T0 + 0.5, POLICY) is BreakerState.OPEN

    async def test_refuses_while_open_saying_when_to_retry(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        refused = await breaker_store.admit("d", T0 + 1.5, POLICY)
        assert refused == Admission(False, BreakerState.OPEN, retry_in_s=refused.retry_in_s)
        assert refused.retry_in_s == pytest.approx(POLICY.open_s - 1.5)
        just_before = await breaker_store.admit("d", T0 + POLICY.open_s - 0.01, POLICY)
        assert not just_before.allowed
        assert just_before.retry_in_s == pytest.approx(0.01)

    async def test_a_result_arriving_while_open_does_not_count(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        assert await record_many(breaker_store, "d", T0 + 1, ok=10) is BreakerState.OPEN
        assert (await breaker_store.admit("d", T0 + 1, POLICY)).retry_in_s == pytest.approx(4.0)

    async def test_half_open_after_open_s_admits_exactly_the_probes(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        now = T0 + POLICY.open_s
        assert await breaker_store.state("d", now, POLICY) is BreakerState.HALF_OPEN
        admitted = [await breaker_store.admit("d", now, POLICY) for _ in range(5)]
        assert admitted == [PROBE] * POLICY.half_open_probes + [NO_MORE_PROBES] * 3

    async def test_a_non_probe_result_in_half_open_uses_no_probe(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        now = T0 + POLICY.open_s
        assert await record_many(breaker_store, "d", now, ok=3) is BreakerState.HALF_OPEN
        assert await breaker_store.admit("d", now, POLICY) == PROBE

    async def test_a_failed_probe_opens_it_again(self, breaker_store: BreakerStore) -> None:
        await trip(breaker_store, "d", T0)
        now = T0 + POLICY.open_s
        assert await breaker_store.admit("d", now, POLICY) == PROBE
        assert await breaker_store.admit("d", now, POLICY) == PROBE
        state = await breaker_store.record("d", now + 1, POLICY, ok=False, probe=True)
        assert state is BreakerState.OPEN
        refused = await breaker_store.admit("d", now + 2, POLICY)
        assert not refused.allowed
        assert refused.retry_in_s == pytest.approx(POLICY.open_s - 1)
        # The other probe's late success changes nothing.
        assert (
            await breaker_store.record("d", now + 2, POLICY, ok=True, probe=True)
            is BreakerState.OPEN
        )

    async def test_all_probes_succeeding_close_it_with_an_empty_window(
        self, breaker_store: BreakerStore
    ) -> None:
        await record_many(breaker_store, "d", T0, ok=1)
        await trip(breaker_store, "d", T0)
        now = T0 + POLICY.open_s
        assert await breaker_store.admit("d", now, POLICY) == PROBE
        assert await breaker_store.admit("d", now, POLICY) == PROBE
        first = await breaker_store.record("d", now, POLICY, ok=True, probe=True)
        assert first is BreakerState.HALF_OPEN
        assert await breaker_store.admit("d", now, POLICY) == NO_MORE_PROBES
        second = await breaker_store.record("d", now, POLICY, ok=True, probe=True)
        assert second is BreakerState.CLOSED
        assert await breaker_store.admit("d", now, POLICY) == CLOSED
        # Nothing from before survived: it takes min_calls new calls to trip again.
        failed = POLICY.min_calls - 1
        assert await record_many(breaker_store, "d", now, failed=failed) is BreakerState.CLOSED
        assert await record_many(breaker_store, "d", now, failed=1) is BreakerState.OPEN

    async def test_old_buckets_fall_out_of_the_window(self, breaker_store: BreakerStore) -> None:
        failed = POLICY.min_calls - 1
        await record_many(breaker_store, "inside", T0, failed=failed)
        last_inside = T0 + POLICY.window_s - 1
        assert await record_many(breaker_store, "inside", last_inside, failed=1) is (
            BreakerState.OPEN
        )
        await record_many(breaker_store, "outside", T0, failed=failed)
        first_outside = T0 + POLICY.window_s
        assert await record_many(breaker_store, "outside", first_outside, failed=1) is (
            BreakerState.CLOSED
        )
        # ...and the old failures are gone for good, not merely out of sight.
        assert await record_many(breaker_store, "outside", first_outside, failed=2) is (
            BreakerState.CLOSED
        )
        assert await record_many(breaker_store, "outside", first_outside, failed=1) is (
            BreakerState.OPEN
        )

    async def test_a_stale_probe_is_forgotten_after_twice_open_s(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        half_open_at = T0 + POLICY.open_s
        for _ in range(POLICY.half_open_probes):
            assert await breaker_store.admit("d", half_open_at, POLICY) == PROBE
        # The probes' callers died: nothing reports back.
        assert await breaker_store.admit("d", T0 + 2 * POLICY.open_s - 0.01, POLICY) == (
            NO_MORE_PROBES
        )
        restart = T0 + 2 * POLICY.open_s
        admitted = [await breaker_store.admit("d", restart, POLICY) for _ in range(3)]
        assert admitted == [PROBE] * POLICY.half_open_probes + [NO_MORE_PROBES]
        # Probing restarted at ``restart``: the next restart is open_s later.
        assert await breaker_store.admit("d", restart + POLICY.open_s - 0.01, POLICY) == (
            NO_MORE_PROBES
        )
        assert await breaker_store.admit("d", restart + POLICY.open_s, POLICY) == PROBE

    async def test_a_late_first_probe_is_not_forgotten_at_once(
        self, breaker_store: BreakerStore
    ) -> None:
        await trip(breaker_store, "d", T0)
        late = T0 + 10 * POLICY.open_s
        admitted = [await breaker_store.admit("d", late, POLICY) for _ in range(4)]
        assert admitted == [PROBE] * POLICY.half_open_probes + [NO_MORE_PROBES] * 2

    async def test_separate_keys_are_independent(self, breaker_store: BreakerStore) -> None:
        await trip(breaker_store, "east", T0)
        await record_many(breaker_store, "west", T0, failed=POLICY.min_calls - 1)
        assert await breaker_store.state("east", T0, POLICY) is BreakerState.OPEN
        assert await breaker_store.state("west", T0, POLICY) is BreakerState.CLOSED
        assert await breaker_store.admit("west", T0, POLICY) == CLOSED
        assert await record_many(breaker_store, "west", T0, failed=1) is BreakerState.OPEN
        now = T0 + POLICY.open_s
        assert await breaker_store.admit("east", now, POLICY) == PROBE
        assert await breaker_store.state("west", now, POLICY) is BreakerState.HALF_OPEN
