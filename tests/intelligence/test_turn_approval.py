"""A turn pauses at a high-risk call and resumes on a person's decision, with the real
execution policy, approval gate and SQLite stores: a second orchestrator on the same
files plays the restarted server."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from intelligence.contracts import (
    ApprovalDecisionRequest,
    ApprovalRequiredEvent,
    MessageStatus,
    Plan,
    PlanStep,
    Principal,
    StepKind,
    StepStatus,
    TurnRequest,
    collect_turn,
)
from intelligence.orchestrator import Orchestrator
from intelligence.prompts import PromptLibrary
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from tests.fakes import FixedPlanner, InMemoryAuditLog, InMemoryRetriever, ScriptedChatModel
from tests.fakes import text_reply as reply
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.contracts import ApprovalConflict, ApprovalDecision, RiskLevel
from tools.plugins import tool
from tools.policy import build_tools
from tools.settings import ApprovalSettings, ToolsSettings

ANN = Principal(tenant_id="contoso", user_id="ann", roles=frozenset({"employee"}))
LEAD = Principal(tenant_id="contoso", user_id="lee", roles=frozenset({"employee", "lead"}))

RUNS: list[dict[str, str]] = []


@tool(risk=RiskLevel.HIGH, roles={"employee"})
def close_account(account: str) -> dict[str, str]:
    """Close a customer account. This cannot be undone."""
    RUNS.append({"account": account})
    return {"closed": account}


PLAN = Plan(
    steps=(
        PlanStep(
            "s1",
            StepKind.CALL_TOOL,
            "Close it",
            tool="close_account",
            arguments={"account": "A-1"},
            tool_call_id="c1",
        ),
        PlanStep("s2", StepKind.ANSWER, "Answer"),
    ),
    planner="model:test",
)


class Server:
    """What one server process holds; ``start()`` again is a restart on the same files."""

    def __init__(self, root: Path, model: ScriptedChatModel) -> None:
        self.root, self.model = root, model

    async def start(self, stack: AsyncExitStack) -> Orchestrator:
        conversations = SqliteConversationStore(self.root / "c.db")
        await conversations.open()
        stack.push_async_callback(conversations.close)
        store = SqliteApprovalStore(self.root / "approvals.db")
        await store.open()
        stack.push_async_callback(store.close)
        settings = ToolsSettings(
            load_entry_points=False, approvals=ApprovalSettings(approver_roles=["lead"])
        )
        built = build_tools(settings, [close_account], approval_store=store)
        return Orchestrator(
            retriever=InMemoryRetriever([]),
            toolset=built.toolset,
            chat_model=self.model,
            planner=FixedPlanner(PLAN),
            conversations=conversations,
            audit=InMemoryAuditLog(),
            prompts=PromptLibrary(PromptLibrary.bundled_directory()),
            settings=IntelligenceSettings(),
            approvals=built.approvals,
        )


@pytest.fixture
async def paused(tmp_path: Path) -> tuple[Server, ApprovalRequiredEvent]:
    RUNS.clear()
    server = Server(tmp_path, ScriptedChatModel([reply("Account A-1 is closed.")]))
    async with AsyncExitStack() as stack:
        result = await (await server.start(stack)).run_turn(TurnRequest("Close account A-1"), ANN)
    assert result.approval is not None and result.answer == ""
    assert [o.status for o in result.steps] == [StepStatus.NEEDS_APPROVAL]
    assert RUNS == []
    return server, result.approval


async def test_approval_after_a_restart_resumes_the_turn_and_runs_the_tool_once(
    paused: tuple[Server, ApprovalRequiredEvent],
) -> None:
    server, approval = paused
    async with AsyncExitStack() as stack:
        assistant = await server.start(stack)
        decision = ApprovalDecisionRequest(approval.approval_id, ApprovalDecision.APPROVE)
        resumed = await assistant.decide(decision, ANN)
        assert resumed.for_requester
        result = await collect_turn(resumed.events)
        assert result.answer == "Account A-1 is closed."
        assert RUNS == [{"account": "A-1"}]
        # The model saw the tool's real result.
        [tool_message] = [m for m in server.model.requests[-1].messages if m.tool_call_id]
        assert '"closed": "A-1"' in (tool_message.content or "")
        # The same decision again: the turn has moved on, nothing runs twice.
        with pytest.raises(ApprovalConflict):
            await assistant.decide(decision, ANN)
    assert RUNS == [{"account": "A-1"}]


async def test_an_approver_edits_for_the_requester_whose_conversation_gets_the_answer(
    paused: tuple[Server, ApprovalRequiredEvent],
) -> None:
    server, approval = paused
    async with AsyncExitStack() as stack:
        assistant = await server.start(stack)
        decision = ApprovalDecisionRequest(
            approval.approval_id, ApprovalDecision.EDIT, arguments={"account": "A-2"}
        )
        resumed = await assistant.decide(decision, LEAD)
        assert not resumed.for_requester
        await collect_turn(resumed.events)
        assert RUNS == [{"account": "A-2"}]
        conversations = SqliteConversationStore(server.root / "c.db")
        await conversations.open()
        stack.push_async_callback(conversations.close)
        stored = await conversations.messages(ANN, approval.conversation_id)
        assert (stored[-1].status, stored[-1].content) == (
            MessageStatus.COMPLETE,
            "Account A-1 is closed.",
        )


async def test_a_rejection_is_told_to_the_model_and_nothing_runs(
    paused: tuple[Server, ApprovalRequiredEvent],
) -> None:
    server, approval = paused
    async with AsyncExitStack() as stack:
        assistant = await server.start(stack)
        decision = ApprovalDecisionRequest(
            approval.approval_id, ApprovalDecision.REJECT, reason="wrong customer"
        )
        result = await collect_turn((await assistant.decide(decision, ANN)).events)
    assert RUNS == []
    assert result.steps[0].status is StepStatus.REFUSED
    assert "wrong customer" in result.steps[0].summary
    [tool_message] = [m for m in server.model.requests[-1].messages if m.tool_call_id]
    assert "rejected" in (tool_message.content or "")


async def test_a_resumed_turn_holds_a_lease_so_a_crash_shows_as_interrupted(
    paused: tuple[Server, ApprovalRequiredEvent], tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    server, approval = paused
    async with AsyncExitStack() as stack:
        assistant = await server.start(stack)
        resumed = await assistant.decide(
            ApprovalDecisionRequest(approval.approval_id, ApprovalDecision.APPROVE), ANN
        )
        # The decision claimed the paused reply: it runs again, under a lease, and no
        # second decision can resume it.
        conversations = SqliteConversationStore(tmp_path / "c.db")
        await conversations.open()
        stack.push_async_callback(conversations.close)
        reply = (await conversations.messages(ANN, resumed.conversation_id))[-1]
        assert reply.status is MessageStatus.STREAMING
        # The server dies before the turn goes on; once the lease has run out, the upkeep
        # of any server marks the turn interrupted instead of leaving it paused for good.
        await resumed.events.aclose()
        later = datetime.now(UTC) + timedelta(minutes=5)
        assert await conversations.interrupt_abandoned(later) == 1
        reply = (await conversations.messages(ANN, resumed.conversation_id))[-1]
        assert reply.status is MessageStatus.INTERRUPTED
    assert RUNS == []
