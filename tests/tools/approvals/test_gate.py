"""The approval gate, on both stores: who may see and decide what, and one run per approval."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field

from tests.tools.approvals.conftest import FakeClock, RecordingAuditSink, StoreBackend
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.approvals.store import ApprovalStore
from tools.audit import REDACTED
from tools.contracts import (
    ApprovalConflict,
    ApprovalDecision,
    ApprovalGate,
    ApprovalNotFound,
    ApprovalRequest,
    ApprovalStatus,
    InvalidToolArguments,
    RiskLevel,
    ToolError,
    ToolExecutionFailed,
    ToolPermissionDenied,
    UnknownTool,
)
from tools.plugins import FunctionTool, tool
from tools.policy import BuiltTools, build_tools
from tools.settings import ApprovalSettings, TenantToolSettings, ToolsSettings
from tools.testing import StaticCaller

TTL_S = 600

ADELE = StaticCaller("contoso", "adele", roles={"employee"})
"""The requester in most tests."""
ALEX = StaticCaller("contoso", "alex", roles={"employee"})
"""Same tenant, no approver role."""
MEGAN = StaticCaller("contoso", "megan", roles={"it.approver"})
"""An approver of contoso, without the tool's own role."""
OTHER_APPROVER = StaticCaller("fabrikam", "megan", roles={"it.approver"})
"""Same user id and role, another tenant."""
ADELE_ELSEWHERE = StaticCaller("fabrikam", "adele", roles={"employee"})

APPROVE = ApprovalDecision.APPROVE
EDIT = ApprovalDecision.EDIT
REJECT = ApprovalDecision.REJECT


@dataclass
class Runs:
    """What the tools' bodies did, per test."""

    wipes: list[dict[str, Any]] = field(default_factory=list)
    fail_with: str | None = None


@pytest.fixture
def runs() -> Runs:
    return Runs()


def laptop_tools(runs: Runs) -> list[FunctionTool[..., Any]]:
    @tool(risk=RiskLevel.HIGH, roles={"employee"})
    async def wipe_laptop(
        serial: Annotated[str, Field(pattern=r"^[A-Z0-9]{8}$")],
        api_token: str = "",
        keep_data: bool = False,
    ) -> dict[str, Any]:
        """Remotely wipe a laptop and reinstall it.

        Irreversible: everything on the disk is lost.
        """
        # Yield between steps, so concurrent runs would interleave if any got in.
        await asyncio.sleep(0)
        if runs.fail_with is not None:
            raise ToolExecutionFailed("wipe_laptop", runs.fail_with)
        runs.wipes.append({"serial": serial, "keep_data": keep_data})
        await asyncio.sleep(0)
        return {"wiped": serial}

    @tool(risk=RiskLevel.WRITE, roles={"employee"})
    def book_room(room: str) -> str:
        """Book a meeting room."""
        return room

    @tool(risk=RiskLevel.HIGH)
    def delete_mailbox(mailbox: str) -> str:
        """Delete a mailbox."""
        return mailbox

    return [wipe_laptop, book_room, delete_mailbox]


def build(
    store: ApprovalStore,
    runs: Runs,
    clock: FakeClock,
    audit: RecordingAuditSink | None = None,
    **settings: Any,
) -> BuiltTools:
    tools_settings = ToolsSettings(
        load_entry_points=False,
        approvals=ApprovalSettings(ttl_s=TTL_S, approver_roles=["it.approver"]),
        **settings,
    )
    return build_tools(
        tools_settings, laptop_tools(runs), audit=audit, approval_store=store, clock=clock
    )


@pytest.fixture
def built(
    store: ApprovalStore, runs: Runs, clock: FakeClock, audit: RecordingAuditSink
) -> BuiltTools:
    return build(store, runs, clock, audit)


@pytest.fixture
def gate(built: BuiltTools) -> ApprovalGate:
    assert built.approvals is not None
    return built.approvals


async def ask(
    gate: ApprovalGate, caller: StaticCaller = ADELE, **arguments: Any
) -> ApprovalRequest:
    return await gate.request(
        "wipe_laptop",
        arguments or {"serial": "PF3ABCD1"},
        caller,
        resume={"conversation_id": "c1", "step_id": "s2"},
    )


# --- request -------------------------------------------------------------------------


async def test_a_request_waits_for_a_person(
    gate: ApprovalGate, store: ApprovalStore, clock: FakeClock, runs: Runs
) -> None:
    requested = await ask(gate, serial="PF3ABCD1", keep_data=True)

    assert requested.id.startswith("apr_")
    assert requested.status is ApprovalStatus.PENDING
    assert requested.tool == "wipe_laptop"
    assert requested.arguments == {"serial": "PF3ABCD1", "keep_data": True}
    assert (requested.tenant_id, requested.requested_by) == ("contoso", "adele")
    assert requested.created_at == clock.now
    assert requested.expires_at == clock.now + timedelta(seconds=TTL_S)
    assert requested.resume == {"conversation_id": "c1", "step_id": "s2"}
    assert requested.summary == (
        'wipe_laptop: Remotely wipe a laptop and reinstall it. (serial="PF3ABCD1", keep_data=true)'
    )
    assert await store.get(requested.id) == requested
    assert runs.wipes == [], "asking runs nothing"


async def test_the_summary_hides_secrets_and_stays_one_short_line(gate: ApprovalGate) -> None:
    requested = await ask(
        gate, serial="PF3ABCD1", api_token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
    )

    assert "eyJ" not in requested.summary
    assert f'api_token="{REDACTED}"' in requested.summary
    assert requested.arguments["api_token"].startswith("eyJ"), "the call itself keeps it"

    long_one = await gate.request("delete_mailbox", {"mailbox": "x" * 1000}, ADELE, resume={})
    assert "\n" not in long_one.summary
    assert len(long_one.summary) <= 300


@pytest.mark.parametrize(
    ("tool_name", "arguments", "caller", "error"),
    [
        ("wipe_laptpo", {"serial": "PF3ABCD1"}, ADELE, UnknownTool),
        ("wipe_laptop", {"serial": "PF3ABCD1"}, MEGAN, ToolPermissionDenied),
        ("wipe_laptop", {"serial": "not a serial"}, ADELE, InvalidToolArguments),
        ("wipe_laptop", {}, ADELE, InvalidToolArguments),
    ],
)
async def test_a_call_that_could_not_run_is_never_put_to_a_person(
    gate: ApprovalGate,
    store: ApprovalStore,
    tool_name: str,
    arguments: dict[str, Any],
    caller: StaticCaller,
    error: type[ToolError],
) -> None:
    with pytest.raises(error):
        await gate.request(tool_name, arguments, caller, resume={})

    assert await store.list_pending("contoso") == []


async def test_a_tool_that_needs_no_approval_is_not_requested(
    gate: ApprovalGate, store: ApprovalStore
) -> None:
    with pytest.raises(ToolError) as caught:
        await gate.request("book_room", {"room": "Fjord"}, ADELE, resume={})

    assert caught.value.message == "this tool needs no approval; call it directly"
    assert await store.list_pending("contoso") == []


@pytest.mark.parametrize(
    "settings",
    [
        {"tenants": {"contoso": TenantToolSettings(disabled=["wipe_laptop"])}},
        {"tenants": {"contoso": TenantToolSettings(enabled=["book_room"])}},
        {"enabled": ["book_room", "delete_mailbox"]},
    ],
)
async def test_a_tool_hidden_from_the_tenant_cannot_be_requested(
    store: ApprovalStore, runs: Runs, clock: FakeClock, settings: dict[str, Any]
) -> None:
    built = build(store, runs, clock, **settings)
    assert built.approvals is not None

    with pytest.raises(UnknownTool) as caught:
        await ask(built.approvals)

    assert caught.value.message == "there is no tool named 'wipe_laptop'"
    assert await store.list_pending("contoso") == []


async def test_a_tool_hidden_from_one_tenant_is_requested_by_another(
    store: ApprovalStore, runs: Runs, clock: FakeClock
) -> None:
    built = build(
        store, runs, clock, tenants={"contoso": TenantToolSettings(disabled=["wipe_laptop"])}
    )
    assert built.approvals is not None

    requested = await ask(built.approvals, ADELE_ELSEWHERE)
    assert requested.tenant_id == "fabrikam"


# --- decide and execute --------------------------------------------------------------


async def test_approve_then_execute_runs_the_call_once_as_asked(
    gate: ApprovalGate, store: ApprovalStore, runs: Runs, clock: FakeClock
) -> None:
    requested = await ask(gate)
    clock.advance(30)

    approved = await gate.decide(requested.id, APPROVE, MEGAN, reason="owner confirmed")
    result = await gate.execute(requested.id, ADELE)

    assert approved.status is ApprovalStatus.APPROVED
    assert (approved.decided_by, approved.decided_at) == ("megan", clock.now)
    assert approved.reason == "owner confirmed"
    assert approved.requested_arguments is None
    assert result.output == {"wiped": "PF3ABCD1"}
    assert runs.wipes == [{"serial": "PF3ABCD1", "keep_data": False}]
    after = await gate.get(requested.id, ADELE)
    assert after.status is ApprovalStatus.EXECUTED
    assert after.outcome == {"ok": True, "output": {"wiped": "PF3ABCD1"}}


async def test_the_requester_may_decide_their_own_request(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)

    await gate.decide(requested.id, APPROVE, ADELE)
    await gate.execute(requested.id, ADELE)

    assert len(runs.wipes) == 1


async def test_a_rejected_call_never_runs(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)

    rejected = await gate.decide(requested.id, REJECT, MEGAN, reason="not your laptop")
    with pytest.raises(ApprovalConflict) as caught:
        await gate.execute(requested.id, ADELE)

    assert rejected.status is ApprovalStatus.REJECTED
    assert rejected.reason == "not your laptop"
    assert caught.value.status is ApprovalStatus.REJECTED
    assert caught.value.message == "this approval was rejected"
    assert runs.wipes == []


async def test_an_edit_runs_with_the_deciders_arguments_and_keeps_the_requested_ones(
    gate: ApprovalGate, runs: Runs
) -> None:
    requested = await ask(gate, serial="PF3ABCD1")

    edited = await gate.decide(
        requested.id, EDIT, MEGAN, arguments={"serial": "PF3ABCD1", "keep_data": True}
    )
    await gate.execute(requested.id, ADELE)

    assert edited.status is ApprovalStatus.APPROVED
    assert edited.arguments == {"serial": "PF3ABCD1", "keep_data": True}
    assert edited.requested_arguments == {"serial": "PF3ABCD1"}
    assert edited.summary == (
        'wipe_laptop: Remotely wipe a laptop and reinstall it. (serial="PF3ABCD1", keep_data=true)'
    ), "the summary says what now runs"
    assert runs.wipes == [{"serial": "PF3ABCD1", "keep_data": True}]


async def test_an_edit_is_checked_against_the_tools_schema(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)

    with pytest.raises(InvalidToolArguments) as caught:
        await gate.decide(requested.id, EDIT, MEGAN, arguments={"serial": "x", "force": True})

    assert set(caught.value.errors) == {
        "Additional properties are not allowed ('force' was unexpected)",
        "serial: 'x' does not match '^[A-Z0-9]{8}$'",
    }
    still = await gate.get(requested.id, ADELE)
    assert still.status is ApprovalStatus.PENDING
    assert still.arguments == {"serial": "PF3ABCD1"}
    with pytest.raises(ApprovalConflict):
        await gate.execute(requested.id, ADELE)
    assert runs.wipes == []


async def test_an_edit_needs_arguments_and_only_an_edit_takes_them(gate: ApprovalGate) -> None:
    requested = await ask(gate)

    with pytest.raises(InvalidToolArguments, match="needs the arguments"):
        await gate.decide(requested.id, EDIT, MEGAN)
    with pytest.raises(InvalidToolArguments, match="only be given with an edit"):
        await gate.decide(requested.id, APPROVE, MEGAN, arguments={"serial": "PF3ABCD2"})

    assert (await gate.get(requested.id, ADELE)).status is ApprovalStatus.PENDING


async def test_a_tool_error_in_the_run_is_stored_and_raised_and_the_run_is_spent(
    gate: ApprovalGate, runs: Runs
) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)
    runs.fail_with = "the device is offline"

    with pytest.raises(ToolExecutionFailed) as caught:
        await gate.execute(requested.id, ADELE)
    with pytest.raises(ApprovalConflict) as again:
        await gate.execute(requested.id, ADELE)

    assert caught.value.message == "the device is offline"
    assert again.value.status is ApprovalStatus.EXECUTED
    after = await gate.get(requested.id, ADELE)
    assert after.outcome == {"ok": False, "error": "the device is offline"}


async def test_a_requester_who_lost_the_role_cannot_run_it_yet_and_keeps_the_approval(
    gate: ApprovalGate, runs: Runs
) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)
    demoted = StaticCaller("contoso", "adele", roles=())

    with pytest.raises(ToolPermissionDenied):
        await gate.execute(requested.id, demoted)
    assert (await gate.get(requested.id, ADELE)).status is ApprovalStatus.APPROVED

    await gate.execute(requested.id, ADELE)
    assert len(runs.wipes) == 1


# --- retries and conflicts -----------------------------------------------------------


async def test_repeating_a_decision_returns_it_unchanged(gate: ApprovalGate) -> None:
    approved = await gate.decide((await ask(gate)).id, APPROVE, MEGAN)
    rejected = await gate.decide((await ask(gate)).id, REJECT, MEGAN)
    edit = {"serial": "PF3ABCD2"}
    edited = await gate.decide((await ask(gate)).id, EDIT, MEGAN, arguments=edit)

    assert await gate.decide(approved.id, APPROVE, MEGAN) == approved
    assert await gate.decide(rejected.id, REJECT, MEGAN, reason="retry") == rejected
    assert await gate.decide(edited.id, EDIT, MEGAN, arguments=dict(edit)) == edited


@pytest.mark.parametrize(
    ("first", "then", "then_by", "then_arguments"),
    [
        (APPROVE, REJECT, MEGAN, None),
        (REJECT, APPROVE, MEGAN, None),
        (APPROVE, APPROVE, ADELE, None),
        (APPROVE, EDIT, MEGAN, {"serial": "PF3ABCD1"}),
        (EDIT, APPROVE, MEGAN, None),
        (EDIT, EDIT, MEGAN, {"serial": "PF3ABCD3"}),
    ],
)
async def test_a_different_decision_after_the_first_is_a_conflict(
    gate: ApprovalGate,
    first: ApprovalDecision,
    then: ApprovalDecision,
    then_by: StaticCaller,
    then_arguments: dict[str, Any] | None,
) -> None:
    requested = await ask(gate)
    first_arguments = {"serial": "PF3ABCD2"} if first is EDIT else None
    decided = await gate.decide(requested.id, first, MEGAN, arguments=first_arguments)

    with pytest.raises(ApprovalConflict) as caught:
        await gate.decide(requested.id, then, then_by, arguments=then_arguments)

    assert caught.value.status is decided.status
    assert await gate.get(requested.id, ADELE) == decided


async def test_racing_deciders_get_one_decision(gate: ApprovalGate) -> None:
    requested = await ask(gate)

    outcomes = await asyncio.gather(
        gate.decide(requested.id, APPROVE, MEGAN),
        gate.decide(requested.id, REJECT, ADELE),
        return_exceptions=True,
    )

    decided = [outcome for outcome in outcomes if isinstance(outcome, ApprovalRequest)]
    conflicts = [outcome for outcome in outcomes if isinstance(outcome, ApprovalConflict)]
    assert len(decided) == 1
    assert len(conflicts) == 1
    assert conflicts[0].status is decided[0].status


async def test_execute_before_a_decision_is_a_conflict(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)

    with pytest.raises(ApprovalConflict) as caught:
        await gate.execute(requested.id, ADELE)

    assert caught.value.status is ApprovalStatus.PENDING
    assert caught.value.message == "this approval has not been decided yet"
    assert runs.wipes == []


async def test_execute_twice_runs_once(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)

    await gate.execute(requested.id, ADELE)
    with pytest.raises(ApprovalConflict) as caught:
        await gate.execute(requested.id, ADELE)

    assert caught.value.status is ApprovalStatus.EXECUTED
    assert caught.value.message == "this approved call has already run"
    assert len(runs.wipes) == 1


async def test_twenty_concurrent_executes_run_the_tool_once(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)

    outcomes = await asyncio.gather(
        *(gate.execute(requested.id, ADELE) for _ in range(20)), return_exceptions=True
    )

    conflicts = [outcome for outcome in outcomes if isinstance(outcome, ApprovalConflict)]
    assert len(conflicts) == 19
    assert {conflict.status for conflict in conflicts} == {ApprovalStatus.EXECUTED}
    assert len(runs.wipes) == 1


async def test_two_replicas_sharing_a_store_run_an_approval_once(
    backend: StoreBackend, runs: Runs, clock: FakeClock
) -> None:
    # Two gates, each with its own toolset and its own store object (a connection of
    # its own), as two processes would have.
    replicas = [build(await backend.open(), runs, clock).approvals for _ in range(2)]
    one, other = [replica for replica in replicas if replica is not None]
    requested = await ask(one)
    await other.decide(requested.id, APPROVE, MEGAN)

    outcomes = await asyncio.gather(
        *((one if i % 2 else other).execute(requested.id, ADELE) for i in range(20)),
        return_exceptions=True,
    )

    assert sum(isinstance(outcome, ApprovalConflict) for outcome in outcomes) == 19
    assert len(runs.wipes) == 1


# --- expiry --------------------------------------------------------------------------


async def test_an_expired_request_cannot_be_decided_or_run(
    gate: ApprovalGate, store: ApprovalStore, clock: FakeClock, runs: Runs
) -> None:
    requested = await ask(gate)
    clock.advance(TTL_S)

    with pytest.raises(ApprovalConflict) as caught:
        await gate.decide(requested.id, APPROVE, MEGAN)
    with pytest.raises(ApprovalConflict) as on_execute:
        await gate.execute(requested.id, ADELE)

    assert caught.value.status is ApprovalStatus.EXPIRED
    assert caught.value.message == "this approval expired before it was decided"
    assert on_execute.value.status is ApprovalStatus.EXPIRED
    stored = await store.get(requested.id)
    assert stored is not None
    assert stored.status is ApprovalStatus.EXPIRED, "stored as expired, not just reported"
    assert runs.wipes == []


async def test_get_reports_and_stores_an_overdue_request_as_expired(
    gate: ApprovalGate, store: ApprovalStore, clock: FakeClock
) -> None:
    requested = await ask(gate)
    clock.advance(TTL_S - 1)
    assert (await gate.get(requested.id, ADELE)).status is ApprovalStatus.PENDING

    clock.advance(1)
    seen = await gate.get(requested.id, MEGAN)

    assert seen.status is ApprovalStatus.EXPIRED
    assert await store.get(requested.id) == seen


async def test_an_approval_decided_in_time_still_runs_after_the_expiry(
    gate: ApprovalGate, clock: FakeClock, runs: Runs
) -> None:
    requested = await ask(gate)
    clock.advance(TTL_S - 1)
    await gate.decide(requested.id, APPROVE, MEGAN)
    clock.advance(60)

    await gate.execute(requested.id, ADELE)
    assert len(runs.wipes) == 1


# --- who may see what ----------------------------------------------------------------


async def test_only_the_requester_and_approvers_of_the_tenant_see_and_decide(
    gate: ApprovalGate,
) -> None:
    requested = await ask(gate)

    assert (await gate.get(requested.id, ADELE)).id == requested.id
    assert (await gate.get(requested.id, MEGAN)).id == requested.id
    for outsider in (ALEX, OTHER_APPROVER, ADELE_ELSEWHERE):
        with pytest.raises(ApprovalNotFound) as caught:
            await gate.get(requested.id, outsider)
        assert caught.value.message == "there is no such approval"
        with pytest.raises(ApprovalNotFound):
            await gate.decide(requested.id, APPROVE, outsider)
    assert (await gate.get(requested.id, ADELE)).status is ApprovalStatus.PENDING


async def test_a_missing_approval_looks_like_someone_elses(gate: ApprovalGate) -> None:
    requested = await ask(gate)

    with pytest.raises(ApprovalNotFound) as missing:
        await gate.get("apr_0123456789abcdef0123456789abcdef", ADELE)
    with pytest.raises(ApprovalNotFound) as hidden:
        await gate.get(requested.id, ALEX)

    assert str(missing.value) == str(hidden.value)


async def test_only_the_requester_runs_an_approved_call(gate: ApprovalGate, runs: Runs) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)

    for someone_else in (MEGAN, ALEX, ADELE_ELSEWHERE):
        with pytest.raises(ApprovalNotFound):
            await gate.execute(requested.id, someone_else)

    assert runs.wipes == []
    assert (await gate.get(requested.id, ADELE)).status is ApprovalStatus.APPROVED


async def test_pending_lists_own_requests_and_for_approvers_the_tenants(
    gate: ApprovalGate, clock: FakeClock
) -> None:
    adeles = await ask(gate, ADELE)
    clock.advance(1)
    alexs = await ask(gate, ALEX)
    clock.advance(1)
    elsewhere = await ask(gate, ADELE_ELSEWHERE)
    decided = await ask(gate, ADELE)
    await gate.decide(decided.id, REJECT, ADELE)

    def ids(found: Iterable[ApprovalRequest]) -> list[str]:
        return [approval.id for approval in found]

    assert ids(await gate.pending(ADELE)) == [adeles.id]
    assert ids(await gate.pending(ALEX)) == [alexs.id]
    assert ids(await gate.pending(MEGAN)) == [adeles.id, alexs.id]
    assert ids(await gate.pending(OTHER_APPROVER)) == [elsewhere.id]


async def test_pending_leaves_out_and_stores_overdue_requests(
    gate: ApprovalGate, store: ApprovalStore, clock: FakeClock
) -> None:
    old = await ask(gate)
    clock.advance(TTL_S / 2)
    fresh = await ask(gate)
    clock.advance(TTL_S / 2)

    assert [approval.id for approval in await gate.pending(MEGAN)] == [fresh.id]
    stored = await store.get(old.id)
    assert stored is not None
    assert stored.status is ApprovalStatus.EXPIRED


# --- restart and audit ---------------------------------------------------------------


async def test_a_restart_between_request_and_decision_loses_nothing(
    tmp_path: Path, runs: Runs, clock: FakeClock
) -> None:
    path = tmp_path / "approvals.db"
    before = SqliteApprovalStore(path)
    await before.open()
    gate = build(before, runs, clock).approvals
    assert gate is not None
    requested = await ask(gate)
    await before.close()

    after = SqliteApprovalStore(path)
    await after.open()
    try:
        restarted = build(after, runs, clock).approvals
        assert restarted is not None
        assert await restarted.get(requested.id, MEGAN) == requested
        await restarted.decide(requested.id, APPROVE, MEGAN)
        await restarted.execute(requested.id, ADELE)
        with pytest.raises(ApprovalConflict):
            await restarted.execute(requested.id, ADELE)
    finally:
        await after.close()

    assert len(runs.wipes) == 1


async def test_every_step_is_audited_with_secrets_redacted(
    gate: ApprovalGate, audit: RecordingAuditSink, clock: FakeClock
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    requested = await ask(gate, serial="PF3ABCD1", api_token=token)
    await gate.decide(requested.id, APPROVE, MEGAN)
    await gate.execute(requested.id, ADELE)

    requested_record, decided_record, call_record = audit.records
    assert requested_record.event == "tool.approval.requested"
    assert (requested_record.user_id, requested_record.outcome) == ("adele", "pending")
    assert decided_record.event == "tool.approval.decided"
    assert (decided_record.user_id, decided_record.outcome) == ("megan", "approved")
    assert call_record.event == "tool.call"
    assert (call_record.user_id, call_record.outcome) == ("adele", "ok")
    for record in audit.records:
        assert record.tool == "wipe_laptop"
        assert record.tenant_id == "contoso"
        assert record.approval_id == requested.id
        assert record.arguments == {"serial": "PF3ABCD1", "api_token": REDACTED}
        assert record.at == clock.now
    assert token not in repr(audit.records)


async def test_a_retried_decision_is_audited_once(
    gate: ApprovalGate, audit: RecordingAuditSink
) -> None:
    requested = await ask(gate)
    await gate.decide(requested.id, REJECT, MEGAN)
    await gate.decide(requested.id, REJECT, MEGAN)

    assert len(audit.events("tool.approval.decided")) == 1


async def test_a_failing_audit_sink_fails_no_step(
    store: ApprovalStore, runs: Runs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = RecordingAuditSink(fail=True)
    gate = build(store, runs, clock, broken).approvals
    assert gate is not None

    requested = await ask(gate)
    await gate.decide(requested.id, APPROVE, MEGAN)
    await gate.execute(requested.id, ADELE)

    assert len(runs.wipes) == 1
    assert "tool audit sink failed" in caplog.text


# --- a person's approvals: export and erasure ---------------------------------------------


async def test_a_persons_approvals_are_exported_and_erased_through_the_gate(
    gate: ApprovalGate,
) -> None:
    mine = await ask(gate, ADELE, serial="PF3ABCD1")
    decided_by_me = await ask(gate, ALEX, serial="PF3ABCD2")
    await gate.decide(decided_by_me.id, REJECT, ADELE_AS_APPROVER)
    elsewhere = await ask(gate, ADELE_ELSEWHERE, serial="PF3ABCD3")

    assert {a.id for a in await gate.approvals_of(ADELE)} == {mine.id, decided_by_me.id}

    assert await gate.forget_user(ADELE) == 2
    assert await gate.approvals_of(ADELE) == []
    with pytest.raises(ApprovalNotFound):
        await gate.get(mine.id, ADELE)
    kept = await gate.get(decided_by_me.id, ALEX)
    assert kept.status is ApprovalStatus.REJECTED and kept.decided_by != "adele"
    assert [a.id for a in await gate.approvals_of(ADELE_ELSEWHERE)] == [elsewhere.id]


ADELE_AS_APPROVER = StaticCaller("contoso", "adele", roles={"employee", "it.approver"})
