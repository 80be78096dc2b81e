"""The gateway against the OpenAI-compatible simulator, through the real ``openai`` client.

Deployments are told apart by their model name, which is how the simulator
picks a fault profile. The gateway's clock and sleep are fake where breakers
and backoff are asserted, so nothing here waits on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from inferencing.contracts import (
    ChatMessage,
    ChatRequest,
    ContextWindowExceeded,
    Role,
    StreamInterrupted,
)
from inferencing.gateway import Gateway, build_gateway
from inferencing.gateway.breaker import BreakerState, InProcessBreakerStore
from inferencing.gateway.metering import InMemoryUsageLedger, UsageMeter
from inferencing.settings import InferencingSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from inferencing.simulator.config import ConfigUpdate, FaultProfile, SimulatorConfig
from tests.inferencing.chat_model_contract import ChatModelContract
from tests.inferencing.conftest import Caller
from tests.inferencing.test_extractive_answerer import ask

QUESTION = ChatRequest([ChatMessage(Role.USER, "How many days of annual leave do I get?")])


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=20261121, record_requests=False)) as server:
        yield server


class FakeTime:
    def __init__(self) -> None:
        self.now = 5_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def registry(
    simulator: SimulatorServer, *entries: dict[str, Any], **settings: Any
) -> InferencingSettings:
    deployments = [
        {"base_url": simulator.openai_base_url, "api_key": "sk-sim", "model": entry["name"]} | entry
        for entry in entries
    ]
    return InferencingSettings.model_validate({"deployments": deployments, **settings})


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    built: list[Gateway] = []
    yield built
    for gateway in built:
        await gateway.aclose()


def make(
    gateways: list[Gateway],
    settings: InferencingSettings,
    *,
    time: FakeTime | None = None,
    ledger: InMemoryUsageLedger | None = None,
) -> Gateway:
    gateway = build_gateway(settings, breakers=InProcessBreakerStore(), ledger=ledger)
    if time is not None:
        gateway._clock = time.clock
        gateway._sleep = time.sleep
    gateways.append(gateway)
    return gateway


def profiles(simulator: SimulatorServer, **by_deployment: FaultProfile) -> None:
    simulator.configure(ConfigUpdate(profiles=by_deployment))


async def test_at_a_30_percent_fault_rate_on_the_primary_failover_keeps_99_9_percent(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    profiles(
        simulator,
        primary=FaultProfile(
            error_rate=0.3, kinds={"unavailable": 2, "rate_limited": 1, "status": 1}
        ),
    )
    settings = registry(
        simulator,
        {"name": "primary", "priority": 1},
        {"name": "secondary", "priority": 2},
        retry={"base_delay_s": 0.001, "max_delay_s": 0.01},
        # A 30% failure rate must not open the primary's breaker (it trips at 50%).
        breaker={"failure_rate": 0.5, "min_calls": 20},
    )
    gateway = make(gateways, settings)
    limit = asyncio.Semaphore(20)
    served: dict[str, int] = {}

    async def one() -> bool:
        async with limit:
            try:
                response = await gateway.complete(QUESTION, caller)
            except Exception:
                return False
            assert response.route is not None
            served[response.route.deployment] = served.get(response.route.deployment, 0) + 1
            return True

    results = await asyncio.gather(*(one() for _ in range(1_000)))
    assert sum(results) >= 999
    # Failover really happened, and the primary still served most requests.
    assert 150 <= served.get("secondary", 0) <= 450
    assert served["primary"] >= 550


async def test_the_breaker_opens_half_opens_and_closes_against_a_failing_deployment(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    time = FakeTime()
    settings = registry(
        simulator,
        {"name": "flaky", "priority": 1},
        {"name": "steady", "priority": 2},
        breaker={"failure_rate": 0.5, "min_calls": 5, "open_s": 30, "half_open_probes": 2},
    )
    gateway = make(gateways, settings, time=time)
    profiles(simulator, flaky=FaultProfile(error_rate=1.0))

    for _ in range(5):
        response = await gateway.complete(QUESTION, caller)
        assert response.route is not None and response.route.deployment == "steady"
    assert (await gateway.breaker_states())["flaky"] is BreakerState.OPEN
    received = _flaky_requests(simulator)

    response = await gateway.complete(QUESTION, caller)
    assert response.route is not None
    assert response.route.attempts[0] == ("flaky", "breaker open")
    assert _flaky_requests(simulator) == received  # open: no call reached it

    time.now += 30  # half-open; the first probe fails and opens it again
    response = await gateway.complete(QUESTION, caller)
    assert response.route is not None and response.route.attempts[0] == (
        "flaky",
        "ProviderUnavailable",
    )
    assert (await gateway.breaker_states())["flaky"] is BreakerState.OPEN

    profiles(simulator, flaky=FaultProfile(error_rate=0.0))  # the deployment recovers
    time.now += 30
    assert (await gateway.breaker_states())["flaky"] is BreakerState.HALF_OPEN
    for _ in range(2):  # two successful probes close it
        response = await gateway.complete(QUESTION, caller)
        assert response.route is not None and response.route.deployment == "flaky"
    assert (await gateway.breaker_states())["flaky"] is BreakerState.CLOSED


def _flaky_requests(simulator: SimulatorServer) -> int:
    import httpx

    stats = httpx.get(f"{simulator.base_url}/_sim/stats", timeout=5).json()
    return int(stats.get("flaky", {}).get("requests", 0))


async def test_retry_after_from_the_provider_is_honoured(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    time = FakeTime()
    gateway = make(gateways, registry(simulator, {"name": "only"}), time=time)
    simulator.script(ScriptedReply(fault=Fault(kind="rate_limited", retry_after_s=3)))
    response = await gateway.complete(QUESTION, caller)
    assert response.route is not None
    assert response.route.attempts == (("only", "ProviderRateLimited"), ("only", "ok"))
    assert len(time.slept) == 1 and time.slept[0] >= 3


async def test_a_stream_cut_midway_is_a_typed_error_and_its_usage_is_still_recorded(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    ledger = InMemoryUsageLedger()
    gateway = make(
        gateways,
        registry(simulator, {"name": "primary", "priority": 1}, {"name": "backup"}),
        ledger=ledger,
    )
    simulator.script(
        ScriptedReply(
            content="Full-time staff get twenty-five days of leave a year, plus holidays.",
            fault=Fault(kind="stream_cut", after_chunks=4),
        )
    )
    received: list[str] = []

    async def consume() -> None:
        async for delta in gateway.stream(QUESTION, caller):
            received.append(delta.content)

    with pytest.raises(StreamInterrupted):
        await consume()
    assert "".join(received).startswith("Full-time")
    meter = gateway.meter
    assert isinstance(meter, UsageMeter)
    await meter.flush()
    (record,) = ledger.records
    assert (record.deployment, record.outcome, record.estimated) == ("primary", "interrupted", True)
    assert record.input_tokens > 0 and record.output_tokens > 0


async def test_a_retired_deployment_is_skipped(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    gateway = make(
        gateways,
        registry(
            simulator,
            {"name": "old", "priority": 1, "retires_on": "2025-06-30"},
            {"name": "current", "priority": 2},
        ),
    )
    response = await gateway.complete(QUESTION, caller)
    assert response.route is not None and response.route.deployment == "current"
    assert "old skipped: retired on 2025-06-30" in response.route.reasons
    assert _requests_of(simulator, "old") == 0


async def test_a_request_too_large_for_one_deployment_goes_to_a_larger_one(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    # The registry overstates the small deployment's window, so only the provider's own
    # context_length_exceeded error can tell: the gateway answers it with a larger one.
    profiles(simulator, small=FaultProfile(context_window=200))
    gateway = make(
        gateways,
        registry(
            simulator,
            {"name": "small", "priority": 1, "context_window": 8_000},
            {"name": "large", "priority": 2, "context_window": 128_000},
        ),
    )
    long_question = ChatRequest([ChatMessage(Role.USER, "Summarise this: " + "leave " * 400)])
    response = await gateway.complete(long_question, caller)
    assert response.route is not None
    assert response.route.attempts == (("small", "ContextWindowExceeded"), ("large", "ok"))

    only_small = make(gateways, registry(simulator, {"name": "small", "context_window": 8_000}))
    with pytest.raises(ContextWindowExceeded):
        await only_small.complete(long_question, caller)


def _requests_of(simulator: SimulatorServer, deployment: str) -> int:
    import httpx

    stats = httpx.get(f"{simulator.base_url}/_sim/stats", timeout=5).json()
    return int(stats.get(deployment, {}).get("requests", 0))


class TestGatewayOverTheSimulatorContract(ChatModelContract):
    @pytest.fixture
    async def chat_model(self, simulator: SimulatorServer) -> AsyncIterator[Gateway]:
        gateway = build_gateway(registry(simulator, {"name": "a"}, {"name": "b"}))
        yield gateway
        await gateway.aclose()

    @pytest.fixture
    def question(self) -> ChatRequest:
        return QUESTION


class TestGatewayOverTheExtractiveAnswererContract(ChatModelContract):
    @pytest.fixture
    async def chat_model(self) -> AsyncIterator[Gateway]:
        gateway = build_gateway(InferencingSettings())
        yield gateway
        await gateway.aclose()

    @pytest.fixture
    def question(self) -> ChatRequest:
        return ask("How many weeks of parental leave does a new parent get?")
