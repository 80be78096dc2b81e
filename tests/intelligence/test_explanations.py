"""A turn's explanation is what actually ran: the plan as streamed (round by round, or a
cached answer's), each step with its timing, the sources with scores and ``[n]`` refs,
the prompt versions, the model calls and the policy decisions in order; a paused turn's
explanation is continued when it resumes; a turn whose process died is explained with its
status now. The turn's spans nest as one tree, without the question unless content
capture is on. A replay answers again from the recorded sources, as the owner may see
them now, and is audited as done by whoever asked for it.

The real orchestrator, SQLite knowledge index and conversation store, the extractive
answerer, the offline safety checks and the real tools policy and approval gate.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from inferencing.contracts import (
    ChatDelta,
    ChatModel,
    ChatRequest,
    ChatResponse,
    InferenceCaller,
    ModelCapabilities,
    Usage,
)
from inferencing.providers import build_chat_model
from inferencing.providers.extractive import NOTHING_FOUND
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from inferencing.safety import HeuristicPromptShield
from inferencing.settings import InferencingSettings
from intelligence.answer_cache import AnswerCache, InProcessAnswerCacheStore
from intelligence.contracts import (
    AnswerDelta,
    ApprovalDecisionRequest,
    CitationsEvent,
    ConversationNotFound,
    DoneEvent,
    MessageStatus,
    NewTurn,
    Plan,
    PlanEvent,
    PlanningContext,
    PlanStep,
    PolicyDecision,
    Principal,
    ReplayUnavailable,
    StepKind,
    StepStatus,
    TurnEvent,
    TurnExplanation,
    TurnRequest,
    TurnResult,
    collect_turn,
)
from intelligence.orchestrator import Orchestrator
from intelligence.prompts import PromptLibrary
from intelligence.safety import SafetyPolicy
from intelligence.settings import AnswerCacheSettings, SafetySettings
from intelligence.stores.sqlite import SqliteConversationStore
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.fakes import InMemoryAuditLog, ScriptedChatModel, text_reply
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.knowledge.factories import access, make_chunks
from tests.support.telemetry import InMemorySpanExporter, MetricsProbe, children, finished_spans
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.contracts import ApprovalDecision, RiskLevel
from tools.plugins import tool
from tools.policy import build_tools, build_toolset
from tools.settings import ApprovalSettings, ToolsSettings

ALICE = Principal("contoso", "alice", frozenset({"hr"}), frozenset({"employee"}))
BOB = Principal("contoso", "bob", frozenset({"hr"}), frozenset({"employee"}))

LEAVE_TEXT = (
    "Employees receive 27 days of annual leave each year. "
    "Unused annual leave days carry over until the end of March."
)
FINANCE_TEXT = "Finance staff receive two extra annual leave days after the year-end close."
LEAVE_QUESTION = "How many days of annual leave do employees receive?"
ANSWER_PROMPT = "grounded_answer@v1"
OPERATOR = "cli:ops"
HEX_TRACE_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    await index.replace_document(
        "leave",
        make_chunks("leave", LEAVE_TEXT, acl=access(groups=["hr"]), title="Leave"),
        content_hash="test",
    )
    # Matches the question too, but only finance may read it: counted as trimmed, never named.
    await index.replace_document(
        "finance-leave",
        make_chunks("finance-leave", FINANCE_TEXT, acl=access(groups=["finance"])),
        content_hash="test",
    )
    yield index
    await index.close()


def extractive() -> ChatModel:
    (deployment,) = InferencingSettings().registry()
    return build_chat_model(deployment)


def safety() -> SafetyPolicy:
    return SafetyPolicy(
        shield=HeuristicPromptShield(), settings=SafetySettings(), audit=InMemoryAuditLog()
    )


def assistant(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, **options: object
) -> Orchestrator:
    options.setdefault("chat_model", extractive())
    return orchestrator_over_fakes(
        store, retriever=SecurityTrimmedRetriever(index), safety=safety(), **options
    )


@dataclass
class Streamed:
    """A turn's events, as a client saw them."""

    events: list[TurnEvent]
    conversation_id: str
    reply_id: str

    @property
    def plans(self) -> list[Plan]:
        return [e.plan for e in self.events if isinstance(e, PlanEvent)]

    @property
    def cited(self) -> set[str]:
        [citations] = [e for e in self.events if isinstance(e, CitationsEvent)]
        return {c.chunk_id for c in citations.citations}


async def ask(orchestrator: Orchestrator, question: str, principal: Principal) -> Streamed:
    started = await orchestrator.start_turn(TurnRequest(question), principal)
    events = [event async for event in started.events]
    [done] = [e for e in events if isinstance(e, DoneEvent)]
    return Streamed(events, done.conversation_id, done.message_id)


async def explained(orchestrator: Orchestrator, turn: Streamed) -> TurnExplanation:
    explanation = await orchestrator.explain(ALICE, turn.conversation_id, turn.reply_id)
    assert explanation is not None
    return explanation


# --- what ran --------------------------------------------------------------------------------


async def test_explain_returns_the_plan_that_actually_ran_with_timed_steps_and_scored_sources(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    explanation = await explained(orchestrator, turn)

    [streamed_plan] = turn.plans
    assert explanation.plan == streamed_plan
    assert (explanation.status, explanation.error) == (MessageStatus.COMPLETE, None)
    assert (explanation.turn_id, explanation.question) == (turn.reply_id, LEAVE_QUESTION)

    assert [s.step_id for s in explanation.steps] == [s.id for s in streamed_plan.steps]
    assert [s.kind for s in explanation.steps] == [StepKind.RETRIEVE, StepKind.ANSWER]
    for step in explanation.steps:
        assert step.status is StepStatus.OK
        assert step.duration_ms is not None and step.duration_ms >= 0
        assert explanation.started_at <= step.started_at
    assert explanation.steps[0].summary == "1 passage(s) found"

    [source] = explanation.sources
    assert (source.chunk_id, source.ref, source.cited, source.step_id) == ("leave-0", 1, True, "s1")
    assert source.score is not None and source.score > 0
    assert {s.chunk_id for s in explanation.sources if s.cited} == turn.cited
    counts = explanation.retrieval
    assert (counts.searches, counts.returned, counts.trimmed, counts.candidates) == (1, 1, 1, 2)
    assert counts.indexes == (source.index,)

    assert explanation.prompts == {"answer": ANSWER_PROMPT}
    [call] = explanation.model_calls
    assert (call.purpose, call.model, call.finish_reason) == ("answer", "extractive", "stop")
    assert call.output_tokens and call.time_to_first_token_ms is not None
    assert explanation.time_to_first_token_ms is not None
    assert explanation.time_to_first_token_ms <= explanation.duration_ms
    assert [(p.check, p.outcome) for p in explanation.policy] == [
        ("input_safety", "passed"),
        ("output_safety", "passed"),
    ]


@tool(roles={"employee"})
def order_status(order: str) -> dict[str, str]:
    """The status of an order."""
    return {"order": order, "status": "shipped"}


@tool(roles={"payroll"})
def salary_of(employee: str) -> dict[str, int]:
    """An employee's salary."""
    return {"salary": 1}


def call(step_id: str, name: str, call_id: str, **arguments: object) -> PlanStep:
    return PlanStep(
        step_id, StepKind.CALL_TOOL, f"Call {name}", tool=name, arguments=arguments,
        tool_call_id=call_id,
    )  # fmt: skip


class RoundsPlanner:
    """Plays one plan per round, as a model calling functions would."""

    def __init__(self, *rounds: Plan) -> None:
        self._rounds = list(rounds)

    async def plan(self, context: PlanningContext) -> Plan:
        return self._rounds[len(context.rounds)]


async def test_a_multi_round_tool_turn_explains_its_extended_plan_and_each_policy_decision(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    first = Plan(
        steps=(
            call("s1", "order_status", "c1", order="A-7"),
            call("s2", "salary_of", "c2", employee="bob"),
            PlanStep("s3", StepKind.ANSWER, "Answer"),
        ),
        planner="model:test",
        usage=Usage(120, 30),
    )
    second = Plan(
        steps=(
            PlanStep("s4", StepKind.RETRIEVE, "Search", query="annual leave", tool_call_id="c3"),
            PlanStep("s5", StepKind.ANSWER, "Answer"),
        ),
        planner="model:test",
        usage=Usage(200, 20),
    )
    last = Plan(steps=(PlanStep("s5", StepKind.ANSWER, "Answer"),), planner="model:test")
    toolset = build_toolset(ToolsSettings(load_entry_points=False), extra=[order_status, salary_of])
    # An address in the answer: the output guard redacts it.
    model = ScriptedChatModel([text_reply("Order A-7 shipped; write to ann@contoso.com [1].")])
    orchestrator = assistant(
        store, index, chat_model=model, planner=RoundsPlanner(first, second, last), toolset=toolset
    )
    turn = await ask(orchestrator, "Where is order A-7, and how much leave do I get?", ALICE)
    explanation = await explained(orchestrator, turn)

    assert len(turn.plans) == 3
    assert explanation.plan == turn.plans[-1]
    assert [s.id for s in explanation.plan.steps] == ["s1", "s2", "s4", "s5"]
    assert explanation.plan.usage == Usage(320, 50)
    steps = {s.step_id: s for s in explanation.steps}
    assert list(steps) == ["s1", "s2", "s4", "s5"]
    assert (steps["s1"].status, steps["s1"].tool) == (StepStatus.OK, "order_status")
    assert steps["s2"].status is StepStatus.REFUSED
    assert (steps["s4"].status, steps["s4"].query) == (StepStatus.OK, "annual leave")
    assert all(s.duration_ms is not None for s in explanation.steps)

    [source] = explanation.sources
    assert (source.step_id, source.ref, source.cited) == ("s4", 1, True)
    # The third planning call spent no tokens (no model was asked): not a model call.
    assert [(c.purpose, c.input_tokens, c.output_tokens) for c in explanation.model_calls] == [
        ("plan", 120, 30),
        ("plan", 200, 20),
        ("answer", 10, 7),  # the scripted model's usage: 10 in, one token a word out
    ]
    assert explanation.prompts == {"answer": ANSWER_PROMPT, "planner": "planner@v1"}

    policy = explanation.policy
    assert policy[0] == PolicyDecision("input_safety", "passed")
    # The round's two calls ran concurrently: their decisions come in either order.
    assert set(policy[1:3]) == {
        PolicyDecision("tool_policy", "allowed", "order_status"),
        PolicyDecision("tool_policy", "refused", "salary_of"),
    }
    assert policy[3:] == (PolicyDecision("output_safety", "redacted"),)
    answer = "".join(e.text for e in turn.events if isinstance(e, AnswerDelta))
    assert "Order A-7 shipped" in answer and "ann@contoso.com" not in answer


def answer_cache(index: SqliteKnowledgeIndex) -> AnswerCache:
    return AnswerCache(
        store=InProcessAnswerCacheStore(),
        embedder=HashingEmbeddingModel(),
        retriever=SecurityTrimmedRetriever(index),
        settings=AnswerCacheSettings(enabled=True),
        model_version="extractive",
    )


async def test_a_cached_answer_explains_the_plan_it_streamed_and_its_sources(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index, answer_cache=answer_cache(index))
    fresh = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    cached = await ask(orchestrator, LEAVE_QUESTION, ALICE)

    first, again = await explained(orchestrator, fresh), await explained(orchestrator, cached)
    assert first.policy[1] == PolicyDecision("answer_cache", "miss")
    [streamed_plan] = cached.plans
    assert streamed_plan.planner == "cache"
    assert again.plan == streamed_plan
    assert again.policy[1].check == "answer_cache" and again.policy[1].outcome == "hit"
    assert again.policy[1].detail.startswith("similarity ")
    [step] = again.steps
    assert (step.step_id, step.status) == ("s1", StepStatus.OK)
    [source] = again.sources
    # Not searched in this turn: no score, no index, no step; numbered as in the cached answer.
    assert (source.chunk_id, source.ref, source.cited) == ("leave-0", 1, True)
    assert (source.score, source.index, source.step_id) == (None, None, None)
    assert again.retrieval.searches == 0
    assert again.model_calls == ()


CLOSED: list[str] = []


@tool(risk=RiskLevel.HIGH, roles={"employee"})
def close_account(account: str) -> dict[str, str]:
    """Close a customer account. This cannot be undone."""
    CLOSED.append(account)
    return {"closed": account}


@pytest.fixture
async def approvals(tmp_path: Path) -> AsyncIterator[SqliteApprovalStore]:
    approvals = SqliteApprovalStore(tmp_path / "approvals.db")
    await approvals.open()
    yield approvals
    await approvals.close()


def closing_assistant(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, approvals: SqliteApprovalStore
) -> Orchestrator:
    """Plans the high-risk call of :func:`close_account` (which pauses the turn), then
    the answer."""
    built = build_tools(
        ToolsSettings(load_entry_points=False, approvals=ApprovalSettings()),
        [close_account],
        approval_store=approvals,
    )
    plan = Plan(
        steps=(
            call("s1", "close_account", "c1", account="A-1"),
            PlanStep("s2", StepKind.ANSWER, "Answer"),
        ),
        planner="model:test",
    )
    return assistant(
        store,
        index,
        chat_model=ScriptedChatModel([text_reply("Account A-1 is closed.")]),
        planner=RoundsPlanner(plan, Plan((plan.steps[1],), "model:test")),
        toolset=built.toolset,
        approvals=built.approvals,
    )


async def paused_turn(orchestrator: Orchestrator) -> TurnResult:
    paused = await orchestrator.run_turn(TurnRequest("Close account A-1"), ALICE)
    assert paused.approval is not None
    return paused


async def test_a_paused_turn_stores_its_part_and_the_resumed_run_extends_it(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, approvals: SqliteApprovalStore
) -> None:
    orchestrator = closing_assistant(store, index, approvals)
    paused = await paused_turn(orchestrator)
    assert paused.approval is not None
    partial = await orchestrator.explain(ALICE, paused.conversation_id, paused.message_id)
    assert partial is not None
    assert partial.status is MessageStatus.AWAITING_APPROVAL
    assert partial.plan == paused.plan
    assert [(s.step_id, s.status) for s in partial.steps] == [("s1", StepStatus.NEEDS_APPROVAL)]
    assert partial.policy[-1] == PolicyDecision(
        "approval", "requested", f"close_account: {paused.approval.approval_id}"
    )

    resumed = await orchestrator.decide(
        ApprovalDecisionRequest(paused.approval.approval_id, ApprovalDecision.APPROVE), ALICE
    )
    result = await collect_turn(resumed.events)
    assert CLOSED == ["A-1"]
    whole = await orchestrator.explain(ALICE, paused.conversation_id, paused.message_id)
    assert whole is not None
    assert whole.status is MessageStatus.COMPLETE
    assert whole.plan == result.plan
    assert whole.started_at == partial.started_at
    assert whole.duration_ms >= partial.duration_ms
    assert [(s.step_id, s.status) for s in whole.steps] == [
        ("s1", StepStatus.OK),
        ("s2", StepStatus.OK),
    ]
    assert whole.policy[: len(partial.policy)] == partial.policy
    assert whole.policy[len(partial.policy)] == PolicyDecision(
        "approval", "approved", f"close_account: {paused.approval.approval_id}"
    )


async def test_only_the_owner_gets_a_finished_turns_explanation(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    assert await orchestrator.explain(BOB, turn.conversation_id, turn.reply_id) is None
    assert await orchestrator.explain(ALICE, turn.conversation_id, "nope") is None
    [question, _] = await store.messages(ALICE, turn.conversation_id)
    assert await orchestrator.explain(ALICE, turn.conversation_id, question.id) is None


# --- after a crash ---------------------------------------------------------------------------


async def test_a_turn_whose_process_died_before_recording_anything_is_explained_by_its_reply(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index)
    now = datetime.now(UTC)
    # A process began the turn and died: its lease ran out, nothing of the run stored.
    began = NewTurn(LEAVE_QUESTION, None, "Leave", lease_until=now - timedelta(seconds=1))
    started = await store.begin_turn(ALICE, began)
    cid, rid = started.conversation.id, started.reply.id
    assert await orchestrator.explain(ALICE, cid, rid) is None  # running, for all it knows
    assert await store.interrupt_abandoned(now) == 1

    assert await orchestrator.explain(ALICE, cid, rid) == TurnExplanation(
        turn_id=rid,
        conversation_id=cid,
        question=LEAVE_QUESTION,
        status=MessageStatus.INTERRUPTED,
        started_at=started.reply.created_at,
        duration_ms=0.0,
    )
    assert await orchestrator.explain(BOB, cid, rid) is None
    with pytest.raises(ConversationNotFound):  # nothing recorded to answer again from
        await orchestrator.replay(ALICE, cid, rid, actor=OPERATOR)


async def test_a_resumed_turn_that_died_is_explained_and_replayed_as_interrupted(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, approvals: SqliteApprovalStore
) -> None:
    orchestrator = closing_assistant(store, index, approvals)
    paused = await paused_turn(orchestrator)
    cid, rid = paused.conversation_id, paused.message_id
    closed = list(CLOSED)
    with pytest.raises(ConversationNotFound):  # waiting for a person: not finished
        await orchestrator.replay(ALICE, cid, rid, actor=OPERATOR)
    # A process claims the turn to resume it, and dies before storing anything.
    now = datetime.now(UTC)
    assert await store.resume_turn(ALICE, rid, now - timedelta(seconds=1)) is not None
    assert await store.interrupt_abandoned(now) == 1

    explanation = await orchestrator.explain(ALICE, cid, rid)
    assert explanation is not None
    # What the paused run recorded, with the reply's status now.
    assert explanation.status is MessageStatus.INTERRUPTED
    assert explanation.plan == paused.plan
    assert [(s.step_id, s.status) for s in explanation.steps] == [("s1", StepStatus.NEEDS_APPROVAL)]
    replayed = await orchestrator.replay(ALICE, cid, rid, actor=OPERATOR)
    assert replayed.original == explanation
    assert (replayed.original_answer, replayed.answer) == ("", "Account A-1 is closed.")
    assert closed == CLOSED, "a replay answers again; it runs no tool"


# --- spans -------------------------------------------------------------------------------------


@dataclass
class CurrentSpanProbe:
    """A chat model that notes which span is current when it is called, as a gateway's
    own span would take it for its parent."""

    inner: ChatModel
    seen: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> ModelCapabilities:
        return self.inner.capabilities

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        return await self.inner.complete(request, caller)

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        span = trace.get_current_span()
        self.seen.append(span.name if isinstance(span, ReadableSpan) else "")
        async for delta in self.inner.stream(request, caller):
            yield delta

    async def aclose(self) -> None:
        await self.inner.aclose()


def one(spans: Sequence[ReadableSpan], name: str, **attributes: object) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name
        and all((s.attributes or {}).get(key) == value for key, value in attributes.items())
    ]
    assert len(found) == 1, [(s.name, dict(s.attributes or {})) for s in spans]
    return found[0]


async def test_a_turn_is_one_span_tree_with_plan_and_steps_under_the_turn(
    store: SqliteConversationStore,
    index: SqliteKnowledgeIndex,
    spans: InMemorySpanExporter,
    metrics: MetricsProbe,
) -> None:
    probe = CurrentSpanProbe(extractive())
    orchestrator = assistant(store, index, chat_model=probe)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    explanation = await explained(orchestrator, turn)

    found = finished_spans()
    root = one(found, "lamina.turn")
    assert root.parent is None
    attributes = root.attributes or {}
    assert attributes["lamina.conversation.id"] == turn.conversation_id
    assert attributes["lamina.turn.id"] == turn.reply_id
    assert attributes["lamina.turn.status"] == "complete"
    assert attributes["lamina.prompt.id"] == ANSWER_PROMPT
    assert root.context is not None
    assert explanation.trace_id == trace.format_trace_id(root.context.trace_id)
    assert explanation.trace_id is not None and HEX_TRACE_ID.fullmatch(explanation.trace_id)

    under_turn = children(root, found)
    plan = one(under_turn, "lamina.plan")
    assert (plan.attributes or {})["lamina.planner"] == "deterministic"
    assert (plan.attributes or {})["lamina.plan.steps"] == 2
    search = one(under_turn, "lamina.step", **{"lamina.step.kind": "retrieve"})
    answer = one(under_turn, "lamina.step", **{"lamina.step.kind": "answer"})
    assert (search.attributes or {})["lamina.step.status"] == "ok"
    assert (answer.attributes or {})["lamina.step.id"] == "s2"
    # The knowledge layer's search span, and the model call, under their steps.
    assert [s.name for s in children(search, found)] == ["lamina.retrieve"]
    assert probe.seen == ["lamina.step"]
    assert all(s.context and s.context.trace_id == root.context.trace_id for s in found)

    amount = metrics.amount(
        "lamina.turn.time_to_first_token",
        **{"lamina.prompt.id": ANSWER_PROMPT, "lamina.planner": "deterministic"},
    )
    assert amount == 1


def every_attribute(spans: Sequence[ReadableSpan]) -> str:
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    values += [str(v) for s in spans for e in s.events for v in (e.attributes or {}).values()]
    return "\n".join(values)


async def test_the_question_is_in_no_span_unless_content_capture_is_on(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, spans: InMemorySpanExporter
) -> None:
    await ask(assistant(store, index), LEAVE_QUESTION, ALICE)
    texts = every_attribute(finished_spans())
    assert LEAVE_QUESTION not in texts
    assert "27 days" not in texts

    spans.clear()
    await ask(assistant(store, index, capture_content=True), LEAVE_QUESTION, ALICE)
    turn = one(finished_spans(), "lamina.turn")
    assert (turn.attributes or {})["lamina.turn.question"] == LEAVE_QUESTION


# --- replay ------------------------------------------------------------------------------------


async def test_replay_answers_again_from_the_same_sources(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    stored = await store.messages(ALICE, turn.conversation_id)

    replayed = await orchestrator.replay(
        ALICE, turn.conversation_id, turn.reply_id, actor=OPERATOR, correlation_id="c-replay"
    )
    assert replayed.original == await explained(orchestrator, turn)
    assert (replayed.original_answer, replayed.original_citations) == (
        stored[-1].content,
        stored[-1].citations,
    )
    assert replayed.answer == replayed.original_answer
    assert replayed.citations == replayed.original_citations
    assert replayed.missing_sources == ()
    assert replayed.model_call is not None and replayed.model_call.purpose == "replay"

    with pytest.raises(ConversationNotFound):
        await orchestrator.replay(BOB, turn.conversation_id, turn.reply_id, actor=OPERATOR)


async def test_a_replay_is_audited_as_done_by_the_operator_for_the_owner(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    audit = InMemoryAuditLog()
    orchestrator = assistant(store, index, audit=audit)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    await orchestrator.replay(
        ALICE, turn.conversation_id, turn.reply_id, actor=OPERATOR, correlation_id="c-replay"
    )
    [record] = [r for r in audit.records if r.event == "chat.replay"]
    assert (record.tenant_id, record.user_id, record.correlation_id) == (
        "contoso",
        OPERATOR,
        "c-replay",
    )
    assert record.data["owner"] == "alice"
    assert (record.data["conversation_id"], record.data["message_id"]) == (
        turn.conversation_id,
        turn.reply_id,
    )
    assert (record.data["prompt"], record.data["sources"]) == (ANSWER_PROMPT, ["leave-0"])


async def test_replay_reports_a_source_the_owner_can_no_longer_see_as_missing(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex
) -> None:
    orchestrator = assistant(store, index)
    turn = await ask(orchestrator, LEAVE_QUESTION, ALICE)
    await index.replace_document(
        "leave",
        make_chunks("leave", LEAVE_TEXT, acl=access(groups=["finance"]), title="Leave"),
        content_hash="test",
    )

    replayed = await orchestrator.replay(ALICE, turn.conversation_id, turn.reply_id, actor=OPERATOR)
    assert replayed.missing_sources == ("leave-0",)
    assert replayed.citations == ()
    assert replayed.answer == NOTHING_FOUND
    assert "27 days" in replayed.original_answer


async def test_replay_refuses_when_the_recorded_prompt_version_is_gone(
    store: SqliteConversationStore, index: SqliteKnowledgeIndex, tmp_path: Path
) -> None:
    turn = await ask(assistant(store, index), LEAVE_QUESTION, ALICE)
    # The deployment now ships version 2 only.
    prompts = tmp_path / "prompts"
    shutil.copytree(PromptLibrary.bundled_directory(), prompts)
    v1 = (prompts / "grounded_answer.v1.yaml").read_text()
    (prompts / "grounded_answer.v2.yaml").write_text(v1.replace("version: 1", "version: 2"))
    (prompts / "grounded_answer.v1.yaml").unlink()
    upgraded = assistant(store, index, prompts=PromptLibrary(prompts))

    with pytest.raises(ReplayUnavailable, match="grounded_answer@v1"):
        await upgraded.replay(ALICE, turn.conversation_id, turn.reply_id, actor=OPERATOR)
