"""EscalatingPlanner: which rounds rules decide, when and to which agent they hand over,
and that every decision is read again from the planning context (no state kept)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from inferencing.contracts import Usage
from intelligence.contracts import (
    ConversationMessage,
    Plan,
    PlanningContext,
    PlanStep,
    Principal,
    StepKind,
    StepOutcome,
    StepResult,
    StepStatus,
)
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.planning.escalation import EscalatingPlanner, IntentRules
from knowledge.contracts import RetrievedPassage
from tests.fakes import FakeTool, FakeToolset, chunk
from tools.contracts import ToolSpec

ANN = Principal(tenant_id="contoso", user_id="ann", roles=frozenset({"employee"}))
NOBODY = Principal(tenant_id="contoso", user_id="guest")

ORDER_STATUS = ToolSpec(
    "order_status", "The status of an order.", {}, required_roles=frozenset({"employee"})
)
CREATE_TICKET = ToolSpec(
    "servicedesk-createTicket", "Open a ticket.", {}, required_roles=frozenset({"employee"})
)
TOOLS = FakeToolset([FakeTool(ORDER_STATUS, dict), FakeTool(CREATE_TICKET, dict)])


@dataclass(frozen=True)
class Context:
    question: str
    principal: Principal = ANN
    rounds: Sequence[Sequence[StepResult]] = ()
    passages: Sequence[RetrievedPassage] = ()
    history: Sequence[ConversationMessage] = ()

    @property
    def search_query(self) -> str:
        return self.question


@dataclass
class AgentDouble:
    """Plays an agent: one search (or nothing, once it has a round of its own) per call."""

    name: str
    seen: list[PlanningContext] = field(default_factory=list)

    async def plan(self, context: PlanningContext) -> Plan:
        self.seen.append(context)
        first = 1 + sum(len(r) for r in context.rounds)
        answer = PlanStep(f"s{first + 1}", StepKind.ANSWER, "Answer")
        search = PlanStep(
            f"s{first}", StepKind.RETRIEVE, "search", query="reworded", tool_call_id=f"c{first}"
        )
        return Plan((search, answer), planner=self.name, rationale="Searching.", usage=Usage(50, 5))


def planner(**options: object) -> tuple[EscalatingPlanner, AgentDouble, AgentDouble]:
    research, action = AgentDouble("agent:research"), AgentDouble("agent:action")
    agents = {"research": research, "action": action}
    built = EscalatingPlanner(DeterministicPlanner(), agents, TOOLS, **options)  # type: ignore[arg-type]
    return built, research, action


def ran(step: PlanStep, summary: str = "ok") -> StepResult:
    return StepResult(step, StepOutcome(step.id, StepStatus.OK, summary), "content")


RULES_SEARCH = PlanStep("s1", StepKind.RETRIEVE, "search", query="How many holidays?")
AGENT_SEARCH = PlanStep("s2", StepKind.RETRIEVE, "search", query="leave", tool_call_id="c2")
TOOL_CALL = PlanStep("s1", StepKind.CALL_TOOL, "call", tool="order_status", tool_call_id="c1")


# --- intent rules --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "agent", "reason"),
    [
        ("What is the status of order A-7?", "action", "names the tool order_status"),
        ("Status of my order?", "action", "names the tool order_status"),
        ("Create a servicedesk ticket for my screen", "action", "servicedesk-createTicket"),
        ("Please book a meeting room for Friday", "action", 'an action ("book")'),
        ("Could you please reset my password?", "action", 'an action ("reset")'),
        ("I'd like to cancel my trip", "action", 'an action ("cancel")'),
        ("Compare the leave policies of Germany and France", "research", "several parts"),
        ("What is the travel policy? Who approves it?", "research", "several parts"),
        ("What is parental leave and how do I apply?", "research", "several parts"),
    ],
)
def test_intent_rules_see_what_rules_cannot_plan(question: str, agent: str, reason: str) -> None:
    found = IntentRules().read(question, TOOLS.list_tools(ANN))
    assert found is not None and found.agent == agent and reason in found.reason


@pytest.mark.parametrize(
    "question",
    [
        "How many days of annual leave do I get?",
        "Who is the order manager?",  # one word of a tool's name is not its name
        "Opening hours of the canteen",
    ],
)
def test_a_plain_question_is_left_to_rules(question: str) -> None:
    assert IntentRules().read(question, TOOLS.list_tools(ANN)) is None


def test_a_request_to_act_is_left_to_rules_when_the_caller_may_use_no_tool() -> None:
    assert TOOLS.list_tools(NOBODY) == []
    assert IntentRules().read("Please book a room; status of order A-7", []) is None


# --- the rounds ------------------------------------------------------------------------


async def test_rules_plan_a_plain_question_and_ask_to_see_the_results() -> None:
    escalating, research, action = planner()
    plan = await escalating.plan(Context("How many holidays?"))
    assert plan.planner == "deterministic" and plan.revisit
    assert [s.kind for s in plan.steps] == [StepKind.RETRIEVE, StepKind.ANSWER]
    assert research.seen == action.seen == []


async def test_rules_answer_once_their_search_found_enough() -> None:
    escalating, research, _ = planner(min_score=1.0)
    found = [RetrievedPassage(chunk("leave", "27 days"), 1.5)]
    plan = await escalating.plan(Context("How many?", rounds=[[ran(RULES_SEARCH)]], passages=found))
    [answer] = plan.steps
    assert (answer.id, answer.kind, answer.depends_on) == ("s2", StepKind.ANSWER, ("s1",))
    assert plan.planner == "deterministic" and not plan.revisit and plan.usage is None
    assert research.seen == []


@pytest.mark.parametrize(
    ("passages", "reason"),
    [
        ((), "the search found no passage"),
        ((0.4, 0.7), "no passage scored 1 or more (best 0.7)"),
    ],
)
async def test_weak_results_go_to_the_research_agent(
    passages: tuple[float, ...], reason: str
) -> None:
    escalating, research, action = planner(min_score=1.0)
    found = [RetrievedPassage(chunk(f"c{i}", "text"), score) for i, score in enumerate(passages)]
    context = Context("How many holidays?", rounds=[[ran(RULES_SEARCH)]], passages=found)
    plan = await escalating.plan(context)
    assert plan.planner == "deterministic>agent:research" and not plan.revisit
    assert plan.rationale == f"Escalated to the research agent: {reason}. Searching."
    assert plan.usage == Usage(50, 5)
    assert research.seen == [context] and action.seen == []


async def test_an_ambiguous_request_goes_to_an_agent_before_any_search() -> None:
    escalating, research, action = planner()
    plan = await escalating.plan(Context("What is the status of order A-7?"))
    assert plan.planner == "deterministic>agent:action"
    assert plan.rationale.startswith("Escalated to the action agent: the request names the tool")
    assert len(action.seen) == 1 and research.seen == []


async def test_the_agent_setting_picks_the_agent_of_every_hand_over() -> None:
    escalating, research, action = planner(agent="research")
    plan = await escalating.plan(Context("What is the status of order A-7?"))
    assert plan.planner == "deterministic>agent:research" and action.seen == []

    escalating, research, action = planner(agent="action")
    plan = await escalating.plan(Context("Why?", rounds=[[ran(RULES_SEARCH)]]))
    assert plan.planner == "deterministic>agent:action" and research.seen == []


@pytest.mark.parametrize(
    ("question", "rounds", "agent"),
    [
        # Handed over after the rules' search: the research agent goes on.
        ("How many holidays?", [[ran(RULES_SEARCH)], [ran(AGENT_SEARCH)]], "research"),
        # Handed over on intent in the first round: the action agent goes on.
        ("What is the status of order A-7?", [[ran(TOOL_CALL)]], "action"),
    ],
)
async def test_the_agent_that_took_over_plans_the_following_rounds(
    question: str, rounds: list[list[StepResult]], agent: str
) -> None:
    escalating, research, action = planner()
    plan = await escalating.plan(Context(question, rounds=rounds))
    assert plan.planner == f"deterministic>agent:{agent}"
    assert "Escalated" not in plan.rationale  # said once, in the round that handed over
    assert len((research if agent == "research" else action).seen) == 1


def test_the_configured_agent_must_exist() -> None:
    with pytest.raises(ValueError, match="action agent"):
        EscalatingPlanner(
            DeterministicPlanner(), {"research": AgentDouble("r")}, TOOLS, agent="action"
        )
