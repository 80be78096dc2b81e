"""The approval gate: where high-risk tool calls wait for a person.

:class:`HumanApprovalGate` implements :class:`~tools.contracts.ApprovalGate` over
an :class:`~tools.approvals.store.ApprovalStore` and the guarded toolset the
deployment hands out, so it sees exactly the tools callers see. An approval moves

    pending ──▶ approved ──▶ executed
       │  └───▶ rejected
       └──────▶ expired

and every move is one atomic compare-and-set in the store: two deciders racing get
one decision, and N concurrent ``execute`` calls (on one replica or many) get one
run. Who may see an approval: its requester, and anyone of the same tenant with one
of ``ApprovalSettings.approver_roles``; to anyone else it does not exist.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from tools.approvals.store import ApprovalChanges, ApprovalStore, dump_json
from tools.audit import record_safely, redact_arguments, utc_now
from tools.contracts import (
    ApprovalConflict,
    ApprovalDecision,
    ApprovalNotFound,
    ApprovalRequest,
    ApprovalStatus,
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolAuditRecord,
    ToolAuditSink,
    ToolCaller,
    ToolError,
    ToolResult,
    ToolSpec,
)
from tools.settings import ApprovalSettings

if TYPE_CHECKING:
    from tools.policy import GuardedToolset

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("tools.audit")

Clock = Callable[[], datetime]

APPROVAL_ID_PREFIX = "apr_"
_MAX_SUMMARY_CHARS = 300
_MAX_SHOWN_VALUE_CHARS = 60

_CONFLICTS = {
    ApprovalStatus.PENDING: "this approval has not been decided yet",
    ApprovalStatus.APPROVED: "this approval has already been approved",
    ApprovalStatus.REJECTED: "this approval was rejected",
    ApprovalStatus.EXPIRED: "this approval expired before it was decided",
    ApprovalStatus.EXECUTED: "this approved call has already run",
}


def new_approval_id() -> str:
    """``apr_`` and 32 random hexadecimal digits."""
    return APPROVAL_ID_PREFIX + uuid.uuid4().hex


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(spec: ToolSpec, arguments: Mapping[str, Any]) -> str:
    """One line for the person deciding: the tool, the first line of its description,
    and the arguments as ``key=value`` (values shortened, secrets redacted)."""
    description = next((line.strip() for line in spec.description.splitlines() if line.strip()), "")
    shown = ", ".join(
        f"{key}={_shorten(dump_json(value), _MAX_SHOWN_VALUE_CHARS)}"
        for key, value in redact_arguments(arguments).items()
    )
    text = f"{spec.name}: {description}" if description else spec.name
    if shown:
        text += f" ({shown})"
    # JSON escapes line breaks in values; the description's first line has none.
    return _shorten(text, _MAX_SUMMARY_CHARS)


def _normalised(arguments: Mapping[str, Any]) -> JsonValue:
    """``arguments`` as they compare after a round trip through a store."""
    return json.loads(dump_json(copy.deepcopy(dict(arguments))))


@dataclass(frozen=True, slots=True)
class _Requester:
    """The requester of an approval, as far as the approval records them: enough to
    check the tool's visibility and schema for their tenant, not their roles."""

    tenant_id: str
    user_id: str
    roles: frozenset[str] = field(default=frozenset())
    scopes: frozenset[str] = field(default=frozenset())


class HumanApprovalGate:
    """The :class:`~tools.contracts.ApprovalGate` of a deployment.

    Args:
        tools: the guarded toolset callers get (:func:`tools.policy.build_tools` passes
            it); its visibility and checks apply to every approval step, and its
            :meth:`~tools.policy.GuardedToolset.call_approved` runs approved calls.
        store: where approvals are kept; shared by every replica.
        settings: ``ttl_s`` (how long a request waits) and ``approver_roles``.
        audit: receives ``tool.approval.requested`` and ``tool.approval.decided``
            records (the run itself is audited by the policy as ``tool.call``).
        clock: the current time, timezone-aware.
    """

    def __init__(
        self,
        tools: GuardedToolset,
        store: ApprovalStore,
        settings: ApprovalSettings,
        *,
        audit: ToolAuditSink | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._tools = tools
        self._store = store
        self._ttl = timedelta(seconds=settings.ttl_s)
        self._approver_roles = frozenset(settings.approver_roles)
        self._audit_sink = audit
        self._clock = clock

    # --- the ApprovalGate contract ---------------------------------------------------

    async def request(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        resume: Mapping[str, JsonValue],
    ) -> ApprovalRequest:
        spec = self._tools.check(tool, arguments, caller)
        if spec.risk in (RiskLevel.READ, RiskLevel.WRITE):
            raise ToolError(tool, "this tool needs no approval; call it directly")
        now = self._clock()
        checked = copy.deepcopy(dict(arguments))
        approval = ApprovalRequest(
            id=new_approval_id(),
            tool=spec.name,
            arguments=checked,
            summary=summarize(spec, checked),
            tenant_id=caller.tenant_id,
            requested_by=caller.user_id,
            created_at=now,
            expires_at=now + self._ttl,
            resume=copy.deepcopy(dict(resume)),
        )
        await self._store.create(approval)
        await self._audit("tool.approval.requested", approval, caller)
        return approval

    async def get(self, approval_id: str, caller: ToolCaller) -> ApprovalRequest:
        return await self._expire_if_due(await self._visible(approval_id, caller))

    async def pending(self, caller: ToolCaller) -> Sequence[ApprovalRequest]:
        mine_only = None if self._is_approver(caller) else caller.user_id
        found = await self._store.list_pending(caller.tenant_id, requested_by=mine_only)
        now = self._clock()
        waiting: list[ApprovalRequest] = []
        for approval in found:
            if now >= approval.expires_at:
                await self._store.transition(
                    approval.id, {ApprovalStatus.PENDING}, ApprovalStatus.EXPIRED
                )
            else:
                waiting.append(approval)
        return waiting

    async def decide(
        self,
        approval_id: str,
        decision: ApprovalDecision,
        caller: ToolCaller,
        *,
        arguments: Mapping[str, Any] | None = None,
        reason: str | None = None,
    ) -> ApprovalRequest:
        decision = ApprovalDecision(decision)
        approval = await self._expire_if_due(await self._visible(approval_id, caller))
        if decision is ApprovalDecision.EDIT and arguments is None:
            raise InvalidToolArguments(
                approval.tool, "an edit needs the arguments to run the tool with"
            )
        if decision is not ApprovalDecision.EDIT and arguments is not None:
            raise InvalidToolArguments(
                approval.tool, "arguments can only be given with an edit; nothing was decided"
            )
        if approval.status is not ApprovalStatus.PENDING:
            return self._repeated(approval, decision, caller, arguments)

        edited: dict[str, Any] | None = None
        summary: str | None = None
        if decision is not ApprovalDecision.REJECT:
            # Checked as the requester would run it: their tenant sees the tool and the
            # arguments fit its schema. The decider's own roles do not matter; the
            # requester's are checked again when the call runs.
            requester = _Requester(approval.tenant_id, approval.requested_by)
            to_run = approval.arguments if arguments is None else arguments
            spec = self._tools.check(approval.tool, to_run, requester, authorize=False)
            if arguments is not None:
                edited = copy.deepcopy(dict(arguments))
                summary = summarize(spec, edited)

        now = self._clock()
        decided = await self._store.transition(
            approval.id,
            {ApprovalStatus.PENDING},
            ApprovalStatus.REJECTED
            if decision is ApprovalDecision.REJECT
            else ApprovalStatus.APPROVED,
            ApprovalChanges(
                arguments=edited,
                requested_arguments=None if edited is None else approval.arguments,
                summary=summary,
                decided_by=caller.user_id,
                decided_at=now,
                reason=reason,
            ),
            unexpired_at=now,
        )
        if decided is None:
            # Someone else decided first, or it expired meanwhile.
            current = await self._store.get(approval.id)
            if current is None:
                raise _not_found()
            return self._repeated(await self._expire_if_due(current), decision, caller, arguments)
        await self._audit("tool.approval.decided", decided, caller)
        return decided

    async def execute(self, approval_id: str, caller: ToolCaller) -> ToolResult:
        approval = await self._store.get(approval_id)
        if approval is None or not self._is_requester(approval, caller):
            raise _not_found()
        if approval.status is ApprovalStatus.APPROVED:
            # Before claiming: a call that cannot run now (the requester lost the role,
            # the tool was disabled) keeps its approval for when it can.
            self._tools.check(approval.tool, approval.arguments, caller)
        claimed = await self._store.transition(
            approval.id, {ApprovalStatus.APPROVED}, ApprovalStatus.EXECUTED
        )
        if claimed is None:
            current = await self._store.get(approval.id)
            if current is None:
                raise _not_found()
            current = await self._expire_if_due(current)
            raise ApprovalConflict(current.tool, _CONFLICTS[current.status], current.status)
        try:
            result = await self._tools.call_approved(
                claimed.tool, claimed.arguments, caller, approval_id=claimed.id
            )
        except ToolError as exc:
            await self._record_outcome(claimed, {"ok": False, "error": exc.message})
            raise
        except asyncio.CancelledError:
            await self._record_outcome(claimed, {"ok": False, "error": "the run was interrupted"})
            raise
        await self._record_outcome(claimed, {"ok": True, "output": result.output})
        return result

    async def approvals_of(self, caller: ToolCaller) -> Sequence[ApprovalRequest]:
        return await self._store.of_user(caller.tenant_id, caller.user_id)

    async def forget_user(self, caller: ToolCaller) -> int:
        # Not audited here: the erasure as a whole is (privacy.erase, by the caller's layer).
        return await self._store.forget_user(caller.tenant_id, caller.user_id)

    # --- helpers ----------------------------------------------------------------------

    def _is_approver(self, caller: ToolCaller) -> bool:
        return not self._approver_roles.isdisjoint(caller.roles)

    @staticmethod
    def _is_requester(approval: ApprovalRequest, caller: ToolCaller) -> bool:
        return approval.tenant_id == caller.tenant_id and approval.requested_by == caller.user_id

    async def _visible(self, approval_id: str, caller: ToolCaller) -> ApprovalRequest:
        approval = await self._store.get(approval_id)
        if approval is None or approval.tenant_id != caller.tenant_id:
            raise _not_found()
        if not (self._is_requester(approval, caller) or self._is_approver(caller)):
            raise _not_found()
        return approval

    async def _expire_if_due(self, approval: ApprovalRequest) -> ApprovalRequest:
        if approval.status is not ApprovalStatus.PENDING or self._clock() < approval.expires_at:
            return approval
        expired = await self._store.transition(
            approval.id, {ApprovalStatus.PENDING}, ApprovalStatus.EXPIRED
        )
        if expired is not None:
            audit_logger.info("approval %s of %s expired", approval.id, approval.tool)
            return expired
        # Changed meanwhile (by another replica): report what it is now.
        return await self._store.get(approval.id) or approval

    @staticmethod
    def _repeated(
        approval: ApprovalRequest,
        decision: ApprovalDecision,
        caller: ToolCaller,
        arguments: Mapping[str, Any] | None,
    ) -> ApprovalRequest:
        """``approval`` unchanged if ``caller`` already decided it this very way (a retry),
        else the conflict with where it stands."""
        status = approval.status
        if approval.decided_by == caller.user_id:
            if decision is ApprovalDecision.REJECT:
                same = status is ApprovalStatus.REJECTED
            elif decision is ApprovalDecision.APPROVE:
                same = status is ApprovalStatus.APPROVED and approval.requested_arguments is None
            else:
                same = (
                    status is ApprovalStatus.APPROVED
                    and approval.requested_arguments is not None
                    and arguments is not None
                    and _normalised(approval.arguments) == _normalised(arguments)
                )
            if same:
                return approval
        if status is ApprovalStatus.PENDING:
            # Still pending though the decision did not apply: it expired by the
            # store's reckoning a moment before this replica's clock noticed.
            status = ApprovalStatus.EXPIRED
        raise ApprovalConflict(approval.tool, _CONFLICTS[status], status)

    async def _record_outcome(
        self, approval: ApprovalRequest, outcome: Mapping[str, JsonValue]
    ) -> None:
        # The run has happened; failing to note its result must not turn it into an
        # error the requester would retry. The approval stays executed either way.
        try:
            await self._store.set_outcome(approval.id, outcome)
        except Exception:
            logger.exception("could not store the outcome of approval %s", approval.id)

    async def _audit(self, event: str, approval: ApprovalRequest, caller: ToolCaller) -> None:
        audit_logger.info(
            "%s %s of %s by %s/%s: %s",
            event,
            approval.id,
            approval.tool,
            caller.tenant_id,
            caller.user_id,
            approval.status.value,
        )
        await record_safely(
            self._audit_sink,
            ToolAuditRecord(
                event=event,
                tool=approval.tool,
                tenant_id=caller.tenant_id,
                user_id=caller.user_id,
                outcome=approval.status.value,
                arguments=redact_arguments(approval.arguments),
                approval_id=approval.id,
                at=self._clock(),
            ),
        )


def _not_found() -> ApprovalNotFound:
    # One message whether the approval is missing or someone else's: the difference
    # would tell a prober which ids exist.
    return ApprovalNotFound("approvals", "there is no such approval")
