"""Circuit breakers, one per deployment, with their state in a :class:`BreakerStore`.

The state machine:

- **closed**: calls flow. Outcomes are counted in time buckets over ``window_s``.
  Once the window holds at least ``min_calls`` calls and the share of failures
  reaches ``failure_rate``, the breaker **opens**.
- **open**: calls are refused until ``open_s`` has passed, then it turns
  **half-open**.
- **half-open**: up to ``half_open_probes`` calls are let through as probes. A
  failed probe opens it again; once that many probes have succeeded it
  **closes**, with an empty window. Probes that never report back (their
  process died) are forgotten after another ``open_s``, and probing starts over.

Time is passed in (``now``, seconds) rather than read, so that tests drive the
machine with a fake clock, and so that every replica sharing a Redis store
reasons about the same instants. The in-process store below implements the
machine in Python; :mod:`inferencing.gateway.redis_state` implements the same
machine in one Lua script, and both pass ``tests/inferencing/breaker_contract.py``.
Both count every state change where it happens (``lamina.breaker.transitions``),
so that a change shared by replicas is counted once, by the replica that made it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from inferencing.settings import BreakerSettings
from inferencing.telemetry import breaker_moved

BUCKETS = 10
"""The window is counted in this many buckets of ``window_s / BUCKETS`` seconds."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Admission:
    """May a call go to the deployment now? ``probe`` when it is a half-open probe."""

    allowed: bool
    state: BreakerState
    probe: bool = False
    retry_in_s: float = 0.0


class Clock(Protocol):
    def __call__(self) -> float: ...


def monotonic_wall() -> float:
    """Seconds since the epoch: comparable across the replicas sharing a store."""
    return time.time()


class BreakerStore(Protocol):
    """Keeps the breakers' state: in this process, or shared by replicas."""

    async def admit(self, key: str, now: float, policy: BreakerSettings) -> Admission: ...

    async def record(
        self, key: str, now: float, policy: BreakerSettings, *, ok: bool, probe: bool
    ) -> BreakerState: ...

    async def state(self, key: str, now: float, policy: BreakerSettings) -> BreakerState: ...


@dataclass
class _Breaker:
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    probes_in_flight: int = 0
    probe_successes: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)
    """bucket number → [calls, failures]"""


class InProcessBreakerStore:
    """Breaker state in this process's memory: the default, and the fallback when a
    shared store is unreachable."""

    def __init__(self) -> None:
        self._breakers: dict[str, _Breaker] = {}

    async def admit(self, key: str, now: float, policy: BreakerSettings) -> Admission:
        breaker = self._breaker(key)
        self._advance(key, breaker, now, policy)
        if breaker.state is BreakerState.CLOSED:
            return Admission(True, BreakerState.CLOSED)
        if breaker.state is BreakerState.OPEN:
            return Admission(
                False, BreakerState.OPEN, retry_in_s=breaker.opened_at + policy.open_s - now
            )
        if breaker.probes_in_flight + breaker.probe_successes < policy.half_open_probes:
            breaker.probes_in_flight += 1
            return Admission(True, BreakerState.HALF_OPEN, probe=True)
        return Admission(False, BreakerState.HALF_OPEN)

    async def record(
        self, key: str, now: float, policy: BreakerSettings, *, ok: bool, probe: bool
    ) -> BreakerState:
        breaker = self._breaker(key)
        self._advance(key, breaker, now, policy)
        if breaker.state is BreakerState.HALF_OPEN and probe:
            breaker.probes_in_flight = max(0, breaker.probes_in_flight - 1)
            if not ok:
                _open(key, breaker, now)
            else:
                breaker.probe_successes += 1
                if breaker.probe_successes >= policy.half_open_probes:
                    _move(key, breaker, BreakerState.CLOSED)
                    breaker.buckets.clear()
                    breaker.probe_successes = 0
            return breaker.state
        if breaker.state is not BreakerState.CLOSED:
            # A call admitted before the breaker opened: it no longer counts.
            return breaker.state
        bucket = _bucket(now, policy)
        counts = breaker.buckets.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += 0 if ok else 1
        for old in [b for b in breaker.buckets if b <= bucket - BUCKETS]:
            del breaker.buckets[old]
        calls = sum(c[0] for c in breaker.buckets.values())
        failures = sum(c[1] for c in breaker.buckets.values())
        if calls >= policy.min_calls and failures >= policy.failure_rate * calls:
            _open(key, breaker, now)
        return breaker.state

    async def state(self, key: str, now: float, policy: BreakerSettings) -> BreakerState:
        breaker = self._breaker(key)
        self._advance(key, breaker, now, policy)
        return breaker.state

    def _breaker(self, key: str) -> _Breaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = _Breaker()
        return breaker

    @staticmethod
    def _advance(key: str, breaker: _Breaker, now: float, policy: BreakerSettings) -> None:
        if breaker.state is BreakerState.OPEN and now >= breaker.opened_at + policy.open_s:
            _move(key, breaker, BreakerState.HALF_OPEN)
            # Half-open since now (at the latest), so the probe admitted now is not
            # taken for a stale one by the next call.
            breaker.opened_at = max(breaker.opened_at, now - policy.open_s)
            breaker.probes_in_flight = 0
            breaker.probe_successes = 0
        elif (
            breaker.state is BreakerState.HALF_OPEN and now >= breaker.opened_at + 2 * policy.open_s
        ):
            # Probes that never reported (their caller died) must not hold it half-open
            # for ever: after another open_s, probing starts over.
            breaker.opened_at = now - policy.open_s
            breaker.probes_in_flight = 0
            breaker.probe_successes = 0


def _move(key: str, breaker: _Breaker, state: BreakerState) -> None:
    if breaker.state is not state:
        breaker.state = state
        breaker_moved(key, state.value)


def _open(key: str, breaker: _Breaker, now: float) -> None:
    _move(key, breaker, BreakerState.OPEN)
    breaker.opened_at = now
    breaker.buckets.clear()
    breaker.probes_in_flight = 0
    breaker.probe_successes = 0


def _bucket(now: float, policy: BreakerSettings) -> int:
    return int(now // (policy.window_s / BUCKETS))
