"""Public contract of the tools layer.

A :class:`Toolset` is what callers see. The toolset the composition root hands
out is always wrapped in the execution policy (argument validation, roles,
risk, timeout), so no caller can run a tool without its policy check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

JsonValue = Any
"""A JSON-serialisable value (dict, list, str, int, float, bool or None)."""


class RiskLevel(StrEnum):
    READ = "read"
    WRITE = "write"
    HIGH = "high"
    """Irreversible or costly actions: never run without a human's approval."""


class ToolCaller(Protocol):
    """The identity fields tool authorization checks."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def roles(self) -> frozenset[str]: ...

    @property
    def scopes(self) -> frozenset[str]:
        """Delegated permissions (a token's ``scp``); empty for app tokens and API keys."""
        ...


DEFAULT_TOOL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    """Matches ``^[a-zA-Z0-9_-]{1,64}$``, so every model API accepts it unchanged and a
    model's call can be echoed back under the same name."""
    description: str
    parameters: Mapping[str, Any]
    """JSON schema (type ``object``) of the arguments."""
    risk: RiskLevel = RiskLevel.READ
    required_roles: frozenset[str] = frozenset()
    """The caller needs at least one of these roles; empty means any authenticated caller."""
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    idempotent: bool = True
    required_scopes: frozenset[str] = frozenset()
    """The caller needs at least one of these delegated scopes; empty means none is needed."""
    tenants: frozenset[str] = frozenset()
    """Only callers of these tenants see and may call the tool; empty means every tenant."""
    origin: str = "python"
    """Where the tool comes from: ``python``, ``semantic-kernel``, ``mcp:<server>`` or
    ``openapi:<source>`` (shown by ``lamina tools list``)."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool: str
    output: JsonValue


class Toolset(Protocol):
    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        """The tools this caller may use."""
        ...

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        """Run one tool, or raise a :class:`ToolError`."""
        ...


# --- human approval -------------------------------------------------------------


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    """Decided, not yet run."""
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"
    """Claimed for its one run; ``outcome`` is set once the run ends (``None`` if the
    process stopped while the tool ran: it is never run again)."""


class ApprovalDecision(StrEnum):
    APPROVE = "approve"
    EDIT = "edit"
    """Approve with the decider's arguments instead of the requested ones."""
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A high-risk call waiting for (or past) a person's decision. Persisted, so a
    decision and the run it allows survive a restart."""

    id: str
    tool: str
    arguments: Mapping[str, JsonValue]
    """The arguments the tool will run with (the decider's, after an edit)."""
    summary: str
    """One human-readable line: what will happen if this is approved."""
    tenant_id: str
    requested_by: str
    """The user whose turn asked for the call; the tool runs as them."""
    created_at: datetime
    expires_at: datetime
    status: ApprovalStatus = ApprovalStatus.PENDING
    requested_arguments: Mapping[str, JsonValue] | None = None
    """What was asked for, when a decider edited the arguments."""
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    resume: Mapping[str, JsonValue] = field(default_factory=dict)
    """Opaque state the requester stored to continue its work after the decision."""
    outcome: Mapping[str, JsonValue] | None = None
    """After the run: ``{"ok": true, "output": ...}`` or ``{"ok": false, "error": ...}``."""


class ApprovalGate(Protocol):
    """Where high-risk calls wait for a person. ``Toolset.call`` refuses a high-risk
    tool; :meth:`execute` is the only way one runs, once per approval."""

    async def request(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        resume: Mapping[str, JsonValue],
    ) -> ApprovalRequest:
        """Persist a pending approval for a high-risk call. The tool, the caller's right
        to use it and the arguments are checked first (``UnknownTool``,
        ``ToolPermissionDenied``, ``InvalidToolArguments``), so a person is never asked
        to approve a call that could not run."""
        ...

    async def get(self, approval_id: str, caller: ToolCaller) -> ApprovalRequest:
        """The approval, if ``caller`` requested it or may decide it (else ``ApprovalNotFound``).
        A pending approval past its expiry is reported (and stored) as expired."""
        ...

    async def pending(self, caller: ToolCaller) -> Sequence[ApprovalRequest]:
        """Pending approvals ``caller`` may decide: their own, and with an approver role
        every one of their tenant."""
        ...

    async def decide(
        self,
        approval_id: str,
        decision: ApprovalDecision,
        caller: ToolCaller,
        *,
        arguments: Mapping[str, Any] | None = None,
        reason: str | None = None,
    ) -> ApprovalRequest:
        """Record a decision, atomically: only a pending, unexpired approval can be decided.

        ``EDIT`` needs ``arguments``, checked against the tool's schema
        (``InvalidToolArguments``). Repeating the decision already recorded, by the same
        person, returns the approval unchanged, so a client can retry. Raises
        ``ApprovalNotFound`` (no such approval, or ``caller`` may not decide it) or
        ``ApprovalConflict`` (decided otherwise, executed, or expired)."""
        ...

    async def execute(self, approval_id: str, caller: ToolCaller) -> ToolResult:
        """Run an approved call once, as its requester (``caller``), through the same
        policy as every call (roles, schema, timeout, output cap, audit). The first call
        claims the approval; any later one raises ``ApprovalConflict``."""
        ...

    async def approvals_of(self, caller: ToolCaller) -> Sequence[ApprovalRequest]:
        """Every approval ``caller`` requested or decided, whatever its status, oldest
        first: their data-subject export."""
        ...

    async def forget_user(self, caller: ToolCaller) -> int:
        """Erase ``caller``'s approvals: those they requested are deleted (pending or
        decided: they hold the arguments and the paused turn), and on those they decided
        for others they are no longer named. Returns how many approvals were deleted or
        changed; an unreachable store raises."""
        ...


@dataclass(frozen=True, slots=True)
class ToolAuditRecord:
    """One audited event of the tools layer."""

    event: str
    """``tool.call``, ``tool.approval.requested`` or ``tool.approval.decided``."""
    tool: str
    tenant_id: str
    user_id: str
    outcome: str
    """``ok`` or the error's class name for calls; the status for approvals."""
    arguments: Mapping[str, JsonValue]
    """With secret-looking values replaced by ``"[redacted]"``."""
    duration_ms: float | None = None
    approval_id: str | None = None
    at: datetime | None = None


class ToolAuditSink(Protocol):
    async def record(self, entry: ToolAuditRecord) -> None: ...


# --- errors ------------------------------------------------------------------


@dataclass
class ToolError(Exception):
    """Base of tool failures. ``message`` is safe to show a user and to feed back to a model."""

    tool: str
    message: str

    def __str__(self) -> str:
        return f"{self.tool}: {self.message}"


class UnknownTool(ToolError):
    pass


@dataclass
class InvalidToolArguments(ToolError):
    errors: tuple[str, ...] = field(default=())


class ToolPermissionDenied(ToolError):
    pass


class ToolApprovalRequired(ToolError):
    """The tool is high risk: it runs only through an approval (:class:`ApprovalGate`)."""


class ToolTimeout(ToolError):
    pass


class ToolExecutionFailed(ToolError):
    pass


class ApprovalNotFound(ToolError):
    """No such approval, or the caller may neither see nor decide it."""


@dataclass
class ApprovalConflict(ToolError):
    """The approval cannot take this decision or run now; ``status`` is where it stands."""

    status: ApprovalStatus = ApprovalStatus.PENDING
