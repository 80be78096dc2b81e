"""Turns in escalate mode, end to end through the orchestrator: rules first, the research
or action agent when rules cannot decide. The model is the real ``openai`` client talking
to the scripted simulator on loopback; tools run under the real policy and approval gate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inferencing.contracts import ChatModel
from inferencing.providers import build_chat_model
from inferencing.settings import DeploymentSettings
from inferencing.simulator import ScriptedReply, ScriptedToolCall, SimulatorServer
from intelligence.agents import ActionAgent, ResearchAgent
from intelligence.contracts import (
    ApprovalDecisionRequest,
    MessageStatus,
    Principal,
    StepKind,
    StepStatus,
    TurnRequest,
    collect_turn,
)
from intelligence.orchestrator import Orchestrator
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.planning.escalation import EscalatingPlanner
from intelligence.prompts import PromptLibrary
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from tests.fakes import InMemoryRetriever, chunk
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.support.lifecycle import opened
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.contracts import ApprovalDecision, RiskLevel
from tools.plugins import tool
from tools.policy import BuiltTools, build_tools
from tools.settings import ToolsSettings

HR = frozenset({"hr"})
ANN = Principal(tenant_id="contoso", user_id="ann", groups=HR, roles=frozenset({"employee"}))

CLOSED: list[str] = []


@tool
def order_status(order: str) -> dict[str, str]:
    """The status of an order."""
    return {"order": order, "status": "shipped"}


@tool(roles={"finance"})
def payroll_report(month: str) -> dict[str, str]:
    """Payroll figures for a month."""
    return {"month": month, "total": "1.2M"}


@tool(risk=RiskLevel.HIGH, roles={"employee"})
def close_account(account: str) -> dict[str, str]:
    """Close a customer account. This cannot be undone."""
    CLOSED.append(account)
    return {"closed": account}


# --- the simulator and what it was asked -------------------------------------------


@pytest.fixture
async def chat_model(simulator: SimulatorServer) -> AsyncIterator[ChatModel]:
    deployment = DeploymentSettings(
        name="sim", base_url=simulator.openai_base_url, api_key="sim-key", model="gpt-sim"
    )
    async with aclosing(build_chat_model(deployment)) as model:
        yield model


def chat_requests(simulator: SimulatorServer) -> list[dict[str, Any]]:
    return [r.body for r in simulator.requests() if r.path.endswith("/chat/completions")]


def offered(request: dict[str, Any]) -> set[str]:
    return {t["function"]["name"] for t in request.get("tools") or []}


def search(query: str) -> ScriptedReply:
    return ScriptedReply(
        tool_calls=[ScriptedToolCall(name="search_knowledge", arguments={"query": query})]
    )


def calls(name: str, **arguments: str) -> ScriptedReply:
    return ScriptedReply(tool_calls=[ScriptedToolCall(name=name, arguments=arguments)])


# --- the service under test ----------------------------------------------------------


@dataclass
class Service:
    assistant: Orchestrator
    retriever: InMemoryRetriever
    store: SqliteConversationStore


@pytest.fixture
async def tools_layer(tmp_path: Path) -> AsyncIterator[BuiltTools]:
    settings = ToolsSettings(load_entry_points=False)
    async with opened(SqliteApprovalStore(tmp_path / "approvals.db")) as approvals:
        yield build_tools(
            settings, [order_status, payroll_report, close_account], approval_store=approvals
        )


@pytest.fixture
def service(
    store: SqliteConversationStore, chat_model: ChatModel, tools_layer: BuiltTools
) -> Callable[..., Service]:
    def build(**settings: Any) -> Service:
        intelligence = IntelligenceSettings.model_validate({"planner": "escalate", **settings})
        prompts = PromptLibrary(PromptLibrary.bundled_directory())
        toolset = tools_layer.toolset
        planner = EscalatingPlanner(
            DeterministicPlanner(),
            {
                "research": ResearchAgent(chat_model, prompts),
                "action": ActionAgent(chat_model, toolset, prompts),
            },
            toolset,
            agent=intelligence.agent,
            min_score=intelligence.escalation_min_score,
        )
        retriever = InMemoryRetriever(
            [chunk("leave", "Employees get 27 days of annual leave.", groups=HR)]
        )
        assistant = orchestrator_over_fakes(
            store,
            chat_model,
            retriever=retriever,
            toolset=toolset,
            planner=planner,
            prompts=prompts,
            settings=intelligence,
            approvals=tools_layer.approvals,
        )
        return Service(assistant, retriever, store)

    CLOSED.clear()
    return build


# --- rules decide ----------------------------------------------------------------------


async def test_a_plain_question_is_planned_by_rules_without_a_model_planning_call(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(ScriptedReply(content="You get 27 days [1]."))
    result = await service().assistant.run_turn(
        TurnRequest("How many days of annual leave do I get?"), ANN
    )

    assert result.answer == "You get 27 days [1]."
    assert result.plan.planner == "deterministic"
    assert [s.kind for s in result.plan.steps] == [StepKind.RETRIEVE, StepKind.ANSWER]
    assert result.plan.usage is None
    # The simulator saw the answer request alone: streamed, with no functions offered.
    [answering] = chat_requests(simulator)
    assert answering["stream"] is True and not answering.get("tools")


# --- escalation to the research agent ----------------------------------------------------


async def test_weak_results_escalate_to_the_research_agent_which_reformulates(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(
        search("annual leave days"),  # the agent reformulates the empty search
        ScriptedReply(content="The results cover the question."),  # shown them, it stops
        ScriptedReply(content="You get 27 days a year [1]."),
    )
    svc = service()
    result = await svc.assistant.run_turn(TurnRequest("How many holidays per year?"), ANN)

    assert result.answer == "You get 27 days a year [1]."
    assert [c.chunk_id for c in result.citations] == ["leave"]
    plan = result.plan
    assert plan.planner == "deterministic>agent:research"
    # The rules' search, then the agent's reformulated one, then the answer.
    assert [(s.kind, s.query, bool(s.tool_call_id)) for s in plan.steps] == [
        (StepKind.RETRIEVE, "How many holidays per year?", False),
        (StepKind.RETRIEVE, "annual leave days", True),
        (StepKind.ANSWER, None, False),
    ]
    assert "Escalated to the research agent: the search found no passage." in plan.rationale
    assert "The results cover the question." in plan.rationale
    assert [q for q, _ in svc.retriever.queries] == [
        "How many holidays per year?",
        "annual leave days",
    ]
    assert plan.usage is not None and plan.usage.input_tokens > 0

    planning, replanning, answering = chat_requests(simulator)
    # The research agent may only search, though the caller may use tools.
    assert offered(planning) == {"search_knowledge"}
    system = planning["messages"][0]["content"]
    assert '"How many holidays per year?": 0 passage(s) found' in system
    # Asked again, it sees its own search's result.
    [shown] = [m for m in replanning["messages"] if m["role"] == "tool"]
    assert "27 days" in shown["content"]
    assert answering["stream"] is True

    stored = await svc.store.messages(ANN, result.conversation_id)
    assert stored[-1].plan is not None
    assert stored[-1].plan.planner == "deterministic>agent:research"


async def test_passages_scoring_below_the_threshold_escalate(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(
        search("annual leave days per year"),
        ScriptedReply(content="Enough."),
        ScriptedReply(content="27 days [1]."),
    )
    # The in-memory index scores by shared words: "leave" alone scores 1.
    result = await service(escalation_min_score=2).assistant.run_turn(
        TurnRequest("What about leave for holidays?"), ANN
    )
    assert result.plan.planner == "deterministic>agent:research"
    assert "no passage scored 2 or more (best 1)" in result.plan.rationale


async def test_the_research_agent_does_not_run_a_tool_it_was_not_offered(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(
            tool_calls=[
                ScriptedToolCall(name="order_status", arguments={"order": "A-7"}),
                ScriptedToolCall(name="search_knowledge", arguments={"query": "annual leave"}),
            ]
        ),
        ScriptedReply(content="Enough."),
        ScriptedReply(content="27 days [1]."),
    )
    result = await service().assistant.run_turn(TurnRequest("How many holidays per year?"), ANN)
    assert [s.kind for s in result.plan.steps] == [StepKind.RETRIEVE] * 2 + [StepKind.ANSWER]
    assert "may only search (it asked for order_status)" in result.plan.rationale
    assert [o.status for o in result.steps] == [StepStatus.OK] * 3


# --- escalation to the action agent --------------------------------------------------


async def test_a_request_naming_a_tool_goes_to_the_action_agent_with_the_callers_tools(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(
        calls("order_status", order="A-7"),
        ScriptedReply(content="Done."),
        ScriptedReply(content="Order A-7 has shipped."),
    )
    svc = service()
    result = await svc.assistant.run_turn(TurnRequest("What is the status of order A-7?"), ANN)

    assert result.answer == "Order A-7 has shipped."
    assert result.plan.planner == "deterministic>agent:action"
    assert [(s.kind, s.tool) for s in result.plan.steps] == [
        (StepKind.CALL_TOOL, "order_status"),
        (StepKind.ANSWER, None),
    ]
    assert "the request names the tool order_status" in result.plan.rationale
    assert svc.retriever.queries == []  # ambiguous intent escalates before any search
    planning = chat_requests(simulator)[0]
    # Only what the caller may use: payroll_report needs a role Ann lacks.
    assert offered(planning) == {"search_knowledge", "order_status", "close_account"}


async def test_the_action_agent_pauses_at_a_high_risk_tool_and_goes_on_once_approved(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(calls("close_account", account="A-1"))
    svc = service()
    request = TurnRequest("Could you please close the file of customer A-1?")
    paused = await svc.assistant.run_turn(request, ANN)

    assert paused.approval is not None and paused.approval.tool == "close_account"
    assert paused.plan.planner == "deterministic>agent:action"
    assert 'the request asks for an action ("close")' in paused.plan.rationale
    assert CLOSED == []
    stored = await svc.store.messages(ANN, paused.conversation_id)
    assert stored[-1].status is MessageStatus.AWAITING_APPROVAL

    simulator.script(ScriptedReply(content="Done."), ScriptedReply(content="A-1 is closed."))
    decision = ApprovalDecisionRequest(paused.approval.approval_id, ApprovalDecision.APPROVE)
    resumed = await collect_turn((await svc.assistant.decide(decision, ANN)).events)

    assert resumed.answer == "A-1 is closed."
    assert CLOSED == ["A-1"]
    # After the pause the same agent went on: it was shown the tool's result.
    replanning = chat_requests(simulator)[1]
    assert offered(replanning) >= {"close_account"}
    [shown] = [m for m in replanning["messages"] if m["role"] == "tool"]
    assert '"closed": "A-1"' in shown["content"]
    assert resumed.plan.planner == "deterministic>agent:action"


# --- budgets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"max_rounds": 2}, "more than 2 rounds"),
        ({"max_steps": 2}, "more than 2 searches and tool calls"),
    ],
)
async def test_an_agent_loop_out_of_steps_or_rounds_ends_the_turn(
    service: Callable[..., Service], simulator: SimulatorServer, limits: dict[str, int], words: str
) -> None:
    # An agent that never finds enough: it searches again every round.
    simulator.script(search("annual leave"), search("leave days"), search("vacation"))
    svc = service(**limits)
    started = await svc.assistant.start_turn(TurnRequest("How many holidays per year?"), ANN)
    events = [event async for event in started.events]

    error = events[-1]
    assert error.type == "error" and error.code == "turn_budget_exceeded"
    assert words in error.message
    assert all(not r.get("stream") for r in chat_requests(simulator))  # no answer written
    [stored] = (await svc.store.messages(ANN, started.conversation_id))[-1:]
    assert stored.status is MessageStatus.FAILED
    assert stored.plan is not None
    assert stored.plan.planner == "deterministic>agent:research"
    # The rules' step, then the agent's, as far as the turn got.
    assert [bool(s.tool_call_id) for s in stored.plan.steps if s.kind is StepKind.RETRIEVE][:2] == [
        False,
        True,
    ]


async def test_an_agent_loop_over_its_token_budget_ends_the_turn(
    service: Callable[..., Service], simulator: SimulatorServer
) -> None:
    simulator.script(search("annual leave"))
    svc = service(max_agent_tokens=20)
    started = await svc.assistant.start_turn(TurnRequest("How many holidays per year?"), ANN)
    events = [event async for event in started.events]

    error = events[-1]
    assert error.type == "error" and error.code == "turn_budget_exceeded"
    assert "more than 20 model tokens of planning" in error.message
    assert len(chat_requests(simulator)) == 1  # the one planning call; nothing after it
    assert [q for q, _ in svc.retriever.queries] == ["How many holidays per year?"]
    [stored] = (await svc.store.messages(ANN, started.conversation_id))[-1:]
    assert stored.status is MessageStatus.FAILED
    assert stored.plan is not None and stored.plan.usage is not None
    assert stored.plan.usage.input_tokens + stored.plan.usage.output_tokens > 20
    assert "Escalated to the research agent" in stored.plan.rationale
