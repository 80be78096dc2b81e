"""Turns in rounds: the model sees results and plans more, independent calls run at
once, and a turn's budget (rounds, steps, tool calls, time) ends it with a clear error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from inferencing.contracts import Role
from intelligence.contracts import (
    AnswerFailed,
    MessageStatus,
    Plan,
    PlanningContext,
    PlanStep,
    Principal,
    StepKind,
    StepStatus,
    TurnRequest,
)
from intelligence.orchestrator import Orchestrator
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from tests.fakes import ScriptedChatModel, chunk, text_reply
from tests.intelligence.assembly import orchestrator_over_fakes
from tools.contracts import Toolset
from tools.plugins import tool
from tools.policy import build_toolset
from tools.settings import ToolsSettings

HR = frozenset({"hr"})
ALICE = Principal(tenant_id="contoso", user_id="alice", groups=HR)


def call(step_id: str, name: str, call_id: str, **arguments: object) -> PlanStep:
    return PlanStep(
        step_id,
        StepKind.CALL_TOOL,
        f"Call {name}",
        tool=name,
        arguments=arguments,
        tool_call_id=call_id,
    )


def answer(step_id: str) -> PlanStep:
    return PlanStep(step_id, StepKind.ANSWER, "Answer")


class RoundsPlanner:
    """Plays one plan per round, as a model calling functions would, and keeps what it saw."""

    def __init__(self, *rounds: Callable[[PlanningContext], Plan]) -> None:
        self._rounds = list(rounds)
        self.seen: list[PlanningContext] = []

    async def plan(self, context: PlanningContext) -> Plan:
        self.seen.append(context)
        return self._rounds[len(self.seen) - 1](context)


def plan_of(*steps: PlanStep) -> Callable[[PlanningContext], Plan]:
    return lambda _: Plan(steps=steps, planner="model:test")


def orchestrator(
    store: SqliteConversationStore,
    model: ScriptedChatModel,
    planner: RoundsPlanner,
    toolset: Toolset,
    **limits: float,
) -> Orchestrator:
    return orchestrator_over_fakes(
        store,
        model,
        chunks=[chunk("leave", "27 days of leave.", groups=frozenset({"hr"}))],
        toolset=toolset,
        planner=planner,
        settings=IntelligenceSettings.model_validate(limits),
    )


def tools(*functions: object) -> Toolset:
    return build_toolset(ToolsSettings(load_entry_points=False), extra=functions)


@tool
def order_status(order: str) -> dict[str, str]:
    """The status of an order."""
    return {"order": order, "status": "shipped", "carrier": "DHL"}


@tool
def track_parcel(carrier: str) -> dict[str, str]:
    """Where a parcel is."""
    return {"carrier": carrier, "where": "Rotterdam"}


async def test_the_model_sees_a_rounds_results_and_chains_the_next_call(
    store: SqliteConversationStore,
) -> None:
    def second_round(context: PlanningContext) -> Plan:
        [[result]] = context.rounds
        assert result.outcome.status is StepStatus.OK and '"carrier": "DHL"' in result.content
        steps = (call("s2", "track_parcel", "c2", carrier="DHL"), answer("s3"))
        return Plan(steps=steps, planner="model:test")

    planner = RoundsPlanner(
        plan_of(call("s1", "order_status", "c1", order="A-7"), answer("s2")),
        second_round,
        plan_of(answer("s3")),
    )
    model = ScriptedChatModel([text_reply("It is in Rotterdam.")])
    result = await orchestrator(store, model, planner, tools(order_status, track_parcel)).run_turn(
        TurnRequest("Where is my order A-7?"), ALICE
    )

    assert result.answer == "It is in Rotterdam."
    assert [s.id for s in result.plan.steps] == ["s1", "s2", "s3"]
    assert [o.status for o in result.steps] == [StepStatus.OK] * 3
    # The answer is written knowing both calls, each round as its own tool round trip.
    messages = model.requests[0].messages
    rounds = [m for m in messages if m.role is Role.ASSISTANT and m.tool_calls]
    assert [[c.name for c in m.tool_calls] for m in rounds] == [["order_status"], ["track_parcel"]]
    results = [m.content for m in messages if m.role is Role.TOOL]
    assert "DHL" in (results[0] or "") and "Rotterdam" in (results[1] or "")


async def test_independent_calls_of_a_round_run_at_the_same_time(
    store: SqliteConversationStore,
) -> None:
    both_started = asyncio.Barrier(2)

    @tool
    async def stock(item: str) -> str:
        """Units in stock."""
        # Each call waits for the other to start: run one after the other, they never would.
        async with asyncio.timeout(5):
            await both_started.wait()
        return f"{item}: 4"

    planner = RoundsPlanner(
        plan_of(
            call("s1", "stock", "c1", item="desk"),
            call("s2", "stock", "c2", item="lamp"),
            answer("s3"),
        ),
        plan_of(answer("s3")),
    )
    model = ScriptedChatModel([text_reply("Both in stock.")])
    result = await orchestrator(store, model, planner, tools(stock)).run_turn(
        TurnRequest("Are desks and lamps in stock?"), ALICE
    )
    assert [o.status for o in result.steps] == [StepStatus.OK] * 3


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"max_tool_calls": 1}, "more than 1 tool calls"),
        ({"max_steps": 1}, "more than 1 searches and tool calls"),
        ({"max_rounds": 1}, "more than 1 rounds"),
    ],
)
async def test_a_spent_budget_ends_the_turn_with_a_clear_message(
    store: SqliteConversationStore, limits: dict[str, float], words: str
) -> None:
    planner = RoundsPlanner(
        plan_of(call("s1", "order_status", "c1", order="A-7"), answer("s2")),
        plan_of(call("s2", "track_parcel", "c2", carrier="DHL"), answer("s3")),
    )
    model = ScriptedChatModel([])
    assistant = orchestrator(store, model, planner, tools(order_status, track_parcel), **limits)
    started = await assistant.start_turn(TurnRequest("Where is my order A-7?"), ALICE)
    events = [event async for event in started.events]

    error = events[-1]
    assert error.type == "error" and error.code == "turn_budget_exceeded"
    assert words in error.message
    assert model.requests == []  # no answer is written from half the work
    stored = await store.messages(ALICE, started.conversation_id)
    assert stored[-1].status is MessageStatus.FAILED


async def test_a_turn_out_of_time_stops_its_running_calls(store: SqliteConversationStore) -> None:
    stopped = asyncio.Event()

    @tool(timeout_s=60)
    async def slow_report(quarter: str) -> str:
        """A report that takes long."""
        try:
            await asyncio.sleep(60)
        finally:
            stopped.set()
        return quarter

    planner = RoundsPlanner(plan_of(call("s1", "slow_report", "c1", quarter="q3"), answer("s2")))
    assistant = orchestrator(
        store, ScriptedChatModel([]), planner, tools(slow_report), max_turn_s=0.2
    )
    with pytest.raises(AnswerFailed) as failed:
        await assistant.run_turn(TurnRequest("Build the Q3 report"), ALICE)
    assert failed.value.code == "turn_budget_exceeded"
    assert "0.2 seconds" in failed.value.message
    assert stopped.is_set()  # cancelled with the turn, not left running


async def test_deterministic_plans_are_not_planned_again(store: SqliteConversationStore) -> None:
    retrieve = PlanStep("s1", StepKind.RETRIEVE, "search", query="leave")
    planner = RoundsPlanner(plan_of(retrieve, answer("s2")))
    model = ScriptedChatModel([text_reply("27 days [1].")])
    result = await orchestrator(store, model, planner, tools()).run_turn(
        TurnRequest("How much leave?"), ALICE
    )
    assert len(planner.seen) == 1
    assert [c.chunk_id for c in result.citations] == ["leave"]
