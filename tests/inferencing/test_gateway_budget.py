"""The gateway charges every call to a token budget: once, before any provider is asked,
and reconciled to the tokens the call used (complete, stream, passthrough).

The budget is an in-memory one that satisfies ``TokenBudget``; the models are real
deployments on the simulator, reached through the real ``openai`` client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferencing.contracts import (
    ChatMessage,
    ChatRequest,
    InferenceCaller,
    InvalidModelRequest,
    LimitState,
    Role,
    StreamInterrupted,
    TokenBudget,
    TokenRateLimited,
    TokenReservation,
    Usage,
)
from inferencing.gateway import Gateway, build_gateway
from inferencing.settings import InferencingSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from inferencing.tokens import default_counter
from tests.inferencing.conftest import Caller

QUESTION = [ChatMessage(Role.USER, "How many days of annual leave do I get?")]
ANSWER = "Full-time staff get twenty-five days of annual leave a year, plus public holidays."


class LedgerBudget:
    """A token budget in memory: holds up to ``capacity`` tokens at once, and records
    every reservation and reconciliation."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.held: dict[str, int] = {}
        self.reserved: list[tuple[str, str, int]] = []
        self.reconciled: list[tuple[int, int]] = []
        """(tokens reserved, tokens used) per reconciliation."""

    async def reserve(self, caller: InferenceCaller, tokens: int) -> TokenReservation:
        in_use = sum(self.held.values())
        if self.capacity is not None and in_use + tokens > self.capacity:
            state = LimitState("user-tokens-per-minute", self.capacity, self.capacity - in_use, 30)
            raise TokenRateLimited(
                "Too many tokens.", retryable=True, state=state, retry_after_s=30.0
            )
        reservation = TokenReservation(f"r{len(self.reserved)}", tokens)
        self.reserved.append((caller.tenant_id, caller.user_id, tokens))
        self.held[reservation.id] = tokens
        return reservation

    async def reconcile(self, reservation: TokenReservation, used_tokens: int) -> None:
        self.reconciled.append((reservation.tokens, used_tokens))
        self.held[reservation.id] = used_tokens


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    built: list[Gateway] = []
    yield built
    for gateway in built:
        await gateway.aclose()


def make(
    gateways: list[Gateway],
    simulator: SimulatorServer,
    budget: TokenBudget,
    *names: str,
    **settings: Any,
) -> Gateway:
    deployments = [
        {
            "name": name,
            "model": name,
            "base_url": simulator.openai_base_url,
            "api_key": "sk-sim",
            "priority": priority,
        }
        for priority, name in enumerate(names or ("only",))
    ]
    gateway = build_gateway(
        InferencingSettings.model_validate({"deployments": deployments, **settings}),
        budget=budget,
    )
    gateways.append(gateway)
    return gateway


def prompt_tokens(request: ChatRequest) -> int:
    return default_counter().count_messages(request.messages, request.tools)


def total(usage: Usage | None) -> int:
    assert usage is not None
    return usage.input_tokens + usage.output_tokens


def test_the_in_memory_budget_satisfies_the_contract() -> None:
    assert isinstance(LedgerBudget(), TokenBudget)


async def test_a_call_reserves_its_prompt_plus_max_tokens_and_reconciles_to_its_usage(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(content=ANSWER))
    request = ChatRequest(QUESTION, max_tokens=120)

    response = await gateway.complete(request, caller)

    reserved = prompt_tokens(request) + 120
    assert budget.reserved == [("contoso", "adele", reserved)]
    assert budget.reconciled == [(reserved, total(response.usage))]
    assert total(response.usage) < reserved
    (sent,) = simulator.requests()
    assert sent.body["max_tokens"] == 120


async def test_without_max_tokens_the_default_answer_length_is_reserved(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget, max_output_tokens=300)
    request = ChatRequest(QUESTION)

    await gateway.complete(request, caller)

    assert budget.reserved == [("contoso", "adele", prompt_tokens(request) + 300)]
    # The reservation covers what the provider was allowed to write.
    (sent,) = simulator.requests()
    assert sent.body["max_tokens"] == 300


async def test_a_call_that_fails_over_is_reserved_once(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget, "primary", "backup")
    simulator.script(ScriptedReply(fault=Fault(kind="unavailable")), ScriptedReply(content=ANSWER))

    response = await gateway.complete(ChatRequest(QUESTION, max_tokens=100), caller)

    assert response.route is not None
    assert response.route.attempts == (("primary", "ProviderUnavailable"), ("backup", "ok"))
    assert len(simulator.requests()) == 2
    [(_, _, reserved)] = budget.reserved
    assert budget.reconciled == [(reserved, total(response.usage))]


async def test_a_refused_reservation_reaches_no_provider(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget(capacity=50)
    gateway = make(gateways, simulator, budget)
    request = ChatRequest(QUESTION, max_tokens=100)

    with pytest.raises(TokenRateLimited) as refused:
        await gateway.complete(request, caller)
    assert refused.value.retry_after_s == 30.0
    with pytest.raises(TokenRateLimited):
        await anext(aiter(gateway.stream(request, caller)))
    with pytest.raises(TokenRateLimited):
        await gateway.forward({"model": "only", "messages": []}, request, caller)

    assert simulator.requests() == []
    assert budget.reconciled == []


async def test_a_failed_call_is_reconciled_to_nothing(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(fault=Fault(kind="status", status_code=400)))

    with pytest.raises(InvalidModelRequest):
        await gateway.complete(ChatRequest(QUESTION, max_tokens=100), caller)

    [(_, _, reserved)] = budget.reserved
    assert budget.reconciled == [(reserved, 0)]


async def test_a_call_cancelled_while_the_provider_works_keeps_its_reservation(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(fault=Fault(kind="timeout", hang_s=3)))

    call = asyncio.create_task(gateway.complete(ChatRequest(QUESTION, max_tokens=100), caller))
    async with asyncio.timeout(10):
        # Polled: the simulator signals nothing when a request arrives.
        while not simulator.requests():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    [(_, _, reserved)] = budget.reserved
    assert budget.reconciled == [(reserved, reserved)]


async def test_a_stream_is_reconciled_to_its_reported_usage(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(content=ANSWER))

    deltas = [d async for d in gateway.stream(ChatRequest(QUESTION, max_tokens=100), caller)]

    [(_, _, reserved)] = budget.reserved
    assert budget.reconciled == [(reserved, total(deltas[-1].usage))]


async def test_a_stream_cut_midway_is_reconciled_to_what_it_delivered(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(content=ANSWER, fault=Fault(kind="stream_cut", after_chunks=4)))
    request = ChatRequest(QUESTION, max_tokens=100)
    received: list[str] = []

    async def consume() -> None:
        async for delta in gateway.stream(request, caller):
            received.append(delta.content)

    with pytest.raises(StreamInterrupted):
        await consume()

    delivered = default_counter().count("".join(received))
    assert 0 < delivered < default_counter().count(ANSWER)
    [(_, _, reserved)] = budget.reserved
    assert budget.reconciled == [(reserved, prompt_tokens(request) + delivered)]


async def test_a_stream_the_caller_closes_is_reconciled_to_what_it_delivered(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(content=ANSWER))
    request = ChatRequest(QUESTION, max_tokens=100)

    stream = gateway.stream(request, caller)
    first = await anext(aiter(stream))
    await stream.aclose()  # type: ignore[attr-defined]

    [(_, _, reserved)] = budget.reserved
    expected = prompt_tokens(request) + default_counter().count(first.content)
    assert budget.reconciled == [(reserved, expected)]
    assert expected < reserved


async def test_the_passthrough_is_reconciled_to_the_usage_in_the_body(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    budget = LedgerBudget()
    gateway = make(gateways, simulator, budget)
    simulator.script(ScriptedReply(content=ANSWER))
    request = ChatRequest(QUESTION, max_tokens=100)
    payload = {"model": "only", "messages": [{"role": "user", "content": QUESTION[0].content}]}

    body, _ = await gateway.forward({**payload, "max_tokens": 100}, request, caller)

    usage = body["usage"]
    assert budget.reserved == [("contoso", "adele", prompt_tokens(request) + 100)]
    assert budget.reconciled == [
        (prompt_tokens(request) + 100, usage["prompt_tokens"] + usage["completion_tokens"])
    ]


async def test_without_a_budget_nothing_is_charged(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    gateway = build_gateway(
        InferencingSettings.model_validate(
            {
                "deployments": [
                    {"name": "only", "base_url": simulator.openai_base_url, "api_key": "sk-sim"}
                ]
            }
        )
    )
    gateways.append(gateway)
    assert gateway.budget is None
    response = await gateway.complete(ChatRequest(QUESTION, max_tokens=100), caller)
    assert response.usage is not None
