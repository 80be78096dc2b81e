"""The orchestrator against in-memory fakes of the lower layers' contracts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from inferencing.contracts import ProviderUnavailable, Role, ToolCall
from intelligence.contracts import (
    AnswerDelta,
    CitationsEvent,
    ConversationNotFound,
    DoneEvent,
    ErrorEvent,
    InputRejected,
    MessageStatus,
    Plan,
    PlanEvent,
    PlanStep,
    Principal,
    StepEvent,
    StepKind,
    StepStatus,
    TurnEvent,
    TurnRequest,
)
from intelligence.orchestrator import Orchestrator
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from tests.fakes import (
    FakeTool,
    FakeToolset,
    FixedPlanner,
    InMemoryAuditLog,
    InMemoryRetriever,
    ScriptedChatModel,
    chunk,
    text_reply,
)
from tests.intelligence.assembly import orchestrator_over_fakes
from tools.contracts import RiskLevel, ToolSpec

ALICE = Principal("contoso", "alice", groups=frozenset({"hr"}), roles=frozenset({"employee"}))
BOB = Principal("contoso", "bob", groups=frozenset({"finance"}))

CHUNKS = [
    chunk("leave", "Employees receive 27 days of annual leave.", groups=frozenset({"hr"})),
    chunk("falcon", "Project Falcon budget is 4.2 million.", groups=frozenset({"finance"})),
]


def make(
    store: SqliteConversationStore,
    model: ScriptedChatModel,
    *,
    planner: object = None,
    toolset: FakeToolset | None = None,
    audit: InMemoryAuditLog | None = None,
    retriever: InMemoryRetriever | None = None,
) -> Orchestrator:
    return orchestrator_over_fakes(
        store,
        model,
        chunks=CHUNKS,
        retriever=retriever,
        toolset=toolset,
        planner=planner,  # type: ignore[arg-type]
        audit=audit,
        settings=IntelligenceSettings(max_message_chars=200, history_turns=4),
    )


async def collect(events: AsyncIterator[TurnEvent]) -> list[TurnEvent]:
    return [e async for e in events]


async def test_grounded_turn_cites_sources_and_persists(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply("You get 27 days of leave [1].")])
    audit = InMemoryAuditLog()
    retriever = InMemoryRetriever(list(CHUNKS))
    orchestrator = make(store, model, audit=audit, retriever=retriever)

    started = await orchestrator.start_turn(TurnRequest("How many days of leave?"), ALICE)
    # The user's message, and a placeholder for the reply, are durable before a single
    # event is produced.
    stored = await store.messages(ALICE, started.conversation_id)
    assert [(m.role, m.content, m.status) for m in stored] == [
        ("user", "How many days of leave?", MessageStatus.COMPLETE),
        ("assistant", "", MessageStatus.STREAMING),
    ]

    events = await collect(started.events)
    kinds = [e.type for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done"
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == (
        "You get 27 days of leave [1]."
    )
    [cites] = [e for e in events if isinstance(e, CitationsEvent)]
    assert [c.chunk_id for c in cites.citations] == ["leave"]

    # Retrieval carried the caller's identity; the grounding documents reached the model.
    assert retriever.queries[0][1] is ALICE
    assert [d.text for d in model.requests[0].documents] == [CHUNKS[0].text]
    assert "27 days" in (model.requests[0].messages[0].content or "")

    messages = await store.messages(ALICE, started.conversation_id)
    assert messages[1].status is MessageStatus.COMPLETE
    assert messages[1].citations == cites.citations
    assert messages[1].plan is not None and messages[1].plan.planner == "deterministic"
    [record] = audit.records
    assert record.data["sources"] == ["leave"] and record.data["status"] == "complete"
    assert record.data["prompt"] == "grounded_answer@v1"


async def test_acl_trimmed_chunks_never_reach_the_model(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply("Nothing found.")])
    audit = InMemoryAuditLog()
    orchestrator = make(store, model, audit=audit)
    result = await orchestrator.run_turn(TurnRequest("Falcon budget million"), ALICE)
    request = model.requests[0]
    assert request.documents == []
    assert all("4.2 million" not in (m.content or "") for m in request.messages)
    assert result.citations == ()
    assert audit.records[0].data["trimmed_candidates"] == 1


async def test_citation_of_a_number_without_a_source_is_dropped(
    store: SqliteConversationStore,
) -> None:
    model = ScriptedChatModel([text_reply("27 days [1], see also [7].")])
    result = await make(store, model).run_turn(TurnRequest("days of leave"), ALICE)
    assert [c.ref for c in result.citations] == [1]


async def test_model_failure_mid_stream_is_a_typed_error_and_keeps_the_partial_answer(
    store: SqliteConversationStore,
) -> None:
    model = ScriptedChatModel(
        [text_reply("one two three four")],
        fail_after_chunks=ProviderUnavailable("The model is unavailable.", retryable=True),
    )
    audit = InMemoryAuditLog()
    started = await make(store, model, audit=audit).start_turn(TurnRequest("leave days"), ALICE)
    events = await collect(started.events)
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].code == "model_unavailable" and events[-1].retryable
    assert not any(isinstance(e, DoneEvent) for e in events)
    reply = (await store.messages(ALICE, started.conversation_id))[-1]
    assert reply.status is MessageStatus.INTERRUPTED and reply.content == "one two"
    assert audit.records[0].data["status"] == "interrupted"


async def test_client_disconnect_marks_the_answer_interrupted(
    store: SqliteConversationStore,
) -> None:
    model = ScriptedChatModel([text_reply("one two three four five")])
    started = await make(store, model).start_turn(TurnRequest("leave days"), ALICE)
    events = started.events
    async for event in events:  # read up to the first piece of answer, then hang up
        if isinstance(event, AnswerDelta):
            break
    await events.aclose()
    reply = (await store.messages(ALICE, started.conversation_id))[-1]
    assert reply.status is MessageStatus.INTERRUPTED
    assert reply.content == "one"


async def test_model_planned_tool_call_round_trip(store: SqliteConversationStore) -> None:
    lookup = FakeTool(
        ToolSpec("lookup_employee", "Find a colleague", {"type": "object"}),
        lambda args: {"name": args["name"], "phone": "4411"},
    )
    toolset = FakeToolset([lookup])
    plan = Plan(
        steps=(
            PlanStep(
                "s1",
                StepKind.CALL_TOOL,
                "look up",
                tool="lookup_employee",
                arguments={"name": "Ann"},
                tool_call_id="call_1",
            ),
            PlanStep("s2", StepKind.RETRIEVE, "search", query="leave days", tool_call_id="call_2"),
            PlanStep("s3", StepKind.ANSWER, "answer", depends_on=("s1", "s2")),
        ),
        planner="model:scripted",
    )
    model = ScriptedChatModel([text_reply("Ann's extension is 4411.")])
    result = await make(store, model, planner=FixedPlanner(plan), toolset=toolset).run_turn(
        TurnRequest("What is Ann's phone?"), ALICE
    )
    assert toolset.calls == [("lookup_employee", {"name": "Ann"}, ALICE)]
    messages = model.requests[0].messages
    assistant = next(m for m in messages if m.role is Role.ASSISTANT and m.tool_calls)
    assert {c.id for c in assistant.tool_calls} == {"call_1", "call_2"}
    assert assistant.tool_calls[0] == ToolCall("call_1", "lookup_employee", '{"name": "Ann"}') or (
        ToolCall("call_1", "lookup_employee", '{"name": "Ann"}') in assistant.tool_calls
    )
    tool_results = {m.tool_call_id: m.content for m in messages if m.role is Role.TOOL}
    assert json.loads(tool_results["call_1"] or "") == {"name": "Ann", "phone": "4411"}
    assert [o.status for o in result.steps] == [StepStatus.OK] * 3


async def test_refused_and_high_risk_tools_are_reported_not_run(
    store: SqliteConversationStore,
) -> None:
    admin_only = FakeTool(
        ToolSpec("reset", "Reset", {"type": "object"}, required_roles=frozenset({"admin"})),
        lambda args: "done",
    )
    toolset = FakeToolset([admin_only])
    plan = Plan(
        steps=(
            PlanStep(
                "s1", StepKind.CALL_TOOL, "reset", tool="reset", arguments={}, tool_call_id="c1"
            ),
            PlanStep(
                "s2", StepKind.CALL_TOOL, "nope", tool="nope", arguments={}, tool_call_id="c2"
            ),
            PlanStep("s3", StepKind.ANSWER, "answer", depends_on=("s1", "s2")),
        ),
        planner="model:scripted",
    )
    model = ScriptedChatModel([text_reply("I could not do that.")])
    started = await make(store, model, planner=FixedPlanner(plan), toolset=toolset).start_turn(
        TurnRequest("reset everything"), BOB
    )
    events = await collect(started.events)
    outcomes = {e.step.id: e.outcome for e in events if isinstance(e, StepEvent) and e.outcome}
    assert outcomes["s1"] is not None and outcomes["s1"].status is StepStatus.REFUSED
    assert outcomes["s2"] is not None and outcomes["s2"].status is StepStatus.REFUSED
    assert toolset.calls == []
    assert isinstance(events[-1], DoneEvent)
    assert RiskLevel.HIGH.value == "high"


async def test_history_window_reaches_the_model(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply("27 days [1]."), text_reply("Yes [1].")])
    orchestrator = make(store, model)
    first = await orchestrator.run_turn(TurnRequest("How many leave days?"), ALICE)
    await orchestrator.run_turn(
        TurnRequest("Is that per year?", conversation_id=first.conversation_id), ALICE
    )
    roles_and_text = [(m.role, m.content) for m in model.requests[1].messages[1:]]
    assert roles_and_text == [
        (Role.USER, "How many leave days?"),
        (Role.ASSISTANT, "27 days [1]."),
        (Role.USER, "Is that per year?"),
    ]


async def test_input_checks_reject_before_anything_is_stored(
    store: SqliteConversationStore,
) -> None:
    orchestrator = make(store, ScriptedChatModel())
    with pytest.raises(InputRejected):
        await orchestrator.start_turn(TurnRequest("   "), ALICE)
    with pytest.raises(InputRejected, match="limit is 200"):
        await orchestrator.start_turn(TurnRequest("x" * 201), ALICE)
    assert (await store.list_conversations(ALICE)).items == ()


async def test_another_users_conversation_cannot_be_continued(
    store: SqliteConversationStore,
) -> None:
    orchestrator = make(store, ScriptedChatModel([text_reply("ok")]))
    mine = await orchestrator.run_turn(TurnRequest("leave days"), ALICE)
    with pytest.raises(ConversationNotFound):
        await orchestrator.start_turn(TurnRequest("hi", conversation_id=mine.conversation_id), BOB)


async def test_plan_event_comes_first_and_steps_report_start_and_end(
    store: SqliteConversationStore,
) -> None:
    started = await make(store, ScriptedChatModel([text_reply("x [1]")])).start_turn(
        TurnRequest("leave days"), ALICE
    )
    events = await collect(started.events)
    assert isinstance(events[0], PlanEvent)
    step_events = [(e.step.id, e.outcome is not None) for e in events if isinstance(e, StepEvent)]
    assert step_events == [("s1", False), ("s1", True), ("s2", False), ("s2", True)]


class FailingAuditLog:
    async def append(self, record: object) -> None:
        raise OSError("audit disk full")


async def test_a_failing_audit_sink_does_not_turn_a_stored_answer_into_an_error(
    store: SqliteConversationStore,
) -> None:
    model = ScriptedChatModel([text_reply("27 days [1].")])
    orchestrator = make(store, model, audit=FailingAuditLog())  # type: ignore[arg-type]
    started = await orchestrator.start_turn(TurnRequest("leave days"), ALICE)
    events = await collect(started.events)
    assert isinstance(events[-1], DoneEvent)
    reply = (await store.messages(ALICE, started.conversation_id))[-1]
    assert reply.status is MessageStatus.COMPLETE


class SlowRetriever(InMemoryRetriever):
    async def retrieve(self, query: object, caller: object) -> object:  # type: ignore[override]
        import asyncio

        await asyncio.sleep(30)
        raise AssertionError("never reached")


async def test_hanging_up_during_the_steps_cancels_them_and_records_the_interruption(
    store: SqliteConversationStore,
) -> None:
    retriever = SlowRetriever([])
    started = await make(store, ScriptedChatModel(), retriever=retriever).start_turn(
        TurnRequest("leave days"), ALICE
    )
    events = started.events
    async for event in events:
        if isinstance(event, StepEvent):  # the retrieval has started
            break
    await events.aclose()  # returns at once: the sleeping retrieval is cancelled
    reply = (await store.messages(ALICE, started.conversation_id))[-1]
    assert reply.status is MessageStatus.INTERRUPTED
