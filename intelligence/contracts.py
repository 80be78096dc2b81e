"""Public contract of the intelligence layer.

The client API talks to an :class:`Assistant` and a :class:`ConversationStore`
and passes a :class:`Principal` explicitly on every call. A ``Principal``
satisfies each lower layer's caller protocol (knowledge, tools, inferencing),
so the same identity travels all the way down.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

from inferencing.contracts import RouteInfo, Usage
from tools.contracts import ApprovalDecision, ApprovalRequest


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. Built at the edge, never looked up from a global."""

    tenant_id: str
    user_id: str
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    name: str | None = None
    scopes: frozenset[str] = frozenset()
    """Delegated permissions (the token's ``scp``); empty for app-only tokens and API keys."""
    auth_method: str = "jwt"
    """How the caller proved who they are: ``jwt``, ``api_key`` or ``dev``."""


# --- plans ---------------------------------------------------------------------

SEARCH_KNOWLEDGE = "search_knowledge"
"""The name under which a model calls retrieval (in planning, in tool round trips, and
on Lamina's MCP server); no tool may take it."""


class StepKind(StrEnum):
    RETRIEVE = "retrieve"
    CALL_TOOL = "call_tool"
    ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class PlanStep:
    id: str
    kind: StepKind
    description: str
    query: str | None = None
    tool: str | None = None
    arguments: Mapping[str, Any] | None = None
    tool_call_id: str | None = None
    """The model's id for this call, when a model planned it (echoed back with the result)."""
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[PlanStep, ...]
    planner: str
    """Which planner produced the plan: ``deterministic`` or ``model:<name>``."""
    rationale: str = ""


class StepStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"
    NEEDS_APPROVAL = "needs_approval"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    step_id: str
    status: StepStatus
    summary: str


@dataclass(frozen=True, slots=True)
class Citation:
    ref: int
    chunk_id: str
    document_id: str
    source: str
    title: str
    snippet: str
    page: int | None = None
    section: str | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """A search or tool call of this turn that ran (or was refused), as a model sees it."""

    step: PlanStep
    outcome: StepOutcome
    content: str
    """What the step produced (passages, a tool's JSON output, or why it did not run)."""


class PlanningContext(Protocol):
    """What a planner is given: the question, the recent history, the caller, and the
    results of the rounds planned so far in this turn (empty on the first round)."""

    @property
    def question(self) -> str: ...

    @property
    def history(self) -> Sequence[ConversationMessage]: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def rounds(self) -> Sequence[Sequence[StepResult]]: ...


class Planner(Protocol):
    async def plan(self, context: PlanningContext) -> Plan:
        """The next steps. With ``context.rounds`` empty, the whole turn's first plan; after
        a round of model-planned calls (steps with a ``tool_call_id``), the planner is asked
        again with their results and returns more steps, or only the answer step."""
        ...


# --- conversations ------------------------------------------------------------


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    STREAMING = "streaming"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    AWAITING_APPROVAL = "awaiting_approval"
    """The turn paused at a high-risk tool call; it resumes when a person decides."""


@dataclass(frozen=True, slots=True)
class ConversationMessage:
    id: str
    conversation_id: str
    role: Literal["user", "assistant"]
    content: str
    created_at: datetime
    status: MessageStatus = MessageStatus.COMPLETE
    citations: tuple[Citation, ...] = ()
    plan: Plan | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    tenant_id: str
    user_id: str
    title: str
    created_at: datetime
    updated_at: datetime
    summary: str = ""
    """A running summary of the turns older than those a model sees verbatim."""
    summary_through: str | None = None
    """The id of the last message the summary covers (``None``: no summary yet)."""


@dataclass(frozen=True, slots=True)
class ConversationPage:
    items: tuple[Conversation, ...]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class NewTurn:
    """What :meth:`ConversationStore.begin_turn` writes at once."""

    question: str
    conversation_id: str | None
    """Continue this conversation; ``None`` starts one titled ``title``."""
    title: str
    lease_until: datetime
    """The reply is running until then unless its turn renews the lease (a heartbeat);
    after it, the turn counts as abandoned (its process died) and may be retried."""
    idempotency_key: str | None = None
    request_hash: str | None = None
    """A digest of the request, kept with the key: the same key with another body is refused."""


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """A turn's durable start: the question, the reply (running, or how it ended) and the
    idempotency key it was started with."""

    conversation: Conversation
    user_message: ConversationMessage
    reply: ConversationMessage
    idempotency_key: str | None = None
    request_hash: str | None = None
    lease_until: datetime | None = None
    """While the reply is ``STREAMING``: when its lease ends."""
    created: bool = True
    """False when the idempotency key had been used already: nothing was written, and this
    is the earlier turn (whatever its request hash)."""


@dataclass(frozen=True, slots=True)
class ConversationExport:
    """One conversation with all its messages, as a data-subject export gives it."""

    conversation: Conversation
    messages: tuple[ConversationMessage, ...]


class ConversationStore(Protocol):
    """Conversations scoped to (tenant, user). A caller never reads, lists or deletes
    another user's conversation: such a lookup behaves as if it did not exist.

    Every adapter passes ``tests/intelligence/stores/conversation_contract.py``. An adapter
    is built with a :class:`RetentionPolicy`: messages older than their tenant's period
    are deleted (by :meth:`purge_expired`, or by the backend's own expiry)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, principal: Principal, title: str) -> Conversation: ...

    async def get(self, principal: Principal, conversation_id: str) -> Conversation | None: ...

    async def list_conversations(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> ConversationPage: ...

    async def delete(self, principal: Principal, conversation_id: str) -> bool: ...

    async def add_message(
        self,
        principal: Principal,
        conversation_id: str,
        role: Literal["user", "assistant"],
        content: str,
        *,
        status: MessageStatus = MessageStatus.COMPLETE,
    ) -> ConversationMessage: ...

    async def finish_message(
        self,
        principal: Principal,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        citations: Sequence[Citation] = (),
        plan: Plan | None = None,
    ) -> None: ...

    async def messages(
        self, principal: Principal, conversation_id: str, *, last: int | None = None
    ) -> list[ConversationMessage]: ...

    # --- turns: durable before the model is called, never doubled -------------------

    async def begin_turn(self, principal: Principal, turn: NewTurn) -> TurnRecord:
        """In one atomic write: the conversation when new, the user message, the reply
        (``STREAMING``, empty, leased until ``turn.lease_until``) and the idempotency key.

        When the caller already used ``turn.idempotency_key``, writes nothing and returns
        that earlier turn with ``created=False``; of two racing calls with one key exactly
        one creates. Raises ``LookupError`` when ``turn.conversation_id`` is not the
        caller's conversation."""
        ...

    async def find_turn(self, principal: Principal, idempotency_key: str) -> TurnRecord | None:
        """The caller's turn started with this key, as it is now."""
        ...

    async def renew_turn(
        self, principal: Principal, reply_id: str, content: str, lease_until: datetime
    ) -> bool:
        """A running turn's heartbeat: keep the answer so far and extend the lease. False
        (and nothing changed) when the reply is no longer ``STREAMING``."""
        ...

    async def retry_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime, *, now: datetime
    ) -> TurnRecord | None:
        """Claim a turn to run again: a reply that is ``INTERRUPTED`` or ``FAILED``, or
        ``STREAMING`` with a lease ended before ``now``, becomes ``STREAMING`` again,
        emptied, leased until ``lease_until``. Of racing claims exactly one gets the
        record; the others (and a reply in any other state) get ``None``."""
        ...

    async def interrupt_abandoned(self, now: datetime) -> int:
        """Mark every ``STREAMING`` reply whose lease ended before ``now`` ``INTERRUPTED``,
        keeping its text so far (all tenants: for start-up and a periodic sweep). Returns
        how many were marked."""
        ...

    # --- memory -------------------------------------------------------------------

    async def save_summary(
        self, principal: Principal, conversation_id: str, summary: str, through_message_id: str
    ) -> None:
        """Replace the conversation's running summary (it covers the messages up to and
        including ``through_message_id``). Does nothing for another caller's conversation."""
        ...

    # --- retention and data-subject rights ---------------------------------------------

    async def purge_expired(self, now: datetime) -> int:
        """Delete messages older than their tenant's retention period, and conversations
        left with none; returns how many messages went. Backends that expire items by
        themselves (Cosmos DB TTL) may return 0: what they expired is gone all the same."""
        ...

    async def export_user(self, principal: Principal) -> list[ConversationExport]:
        """Everything stored for the caller, conversations oldest first."""
        ...

    async def delete_user(self, principal: Principal) -> int:
        """Delete everything stored for the caller (conversations, messages, idempotency
        keys); returns how many conversations went."""
        ...


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long a tenant's conversation messages are kept (``None``: forever)."""

    default_s: float | None = None
    tenants: Mapping[str, float | None] = field(default_factory=dict)

    def seconds_for(self, tenant_id: str) -> float | None:
        return self.tenants.get(tenant_id, self.default_s)


class PersonalDataHolder(Protocol):
    """A store that keeps data about users: what ``GET /v1/me/data`` exports from it and
    ``DELETE /v1/me/data`` erases. The composition root lists every one of them."""

    @property
    def name(self) -> str: ...

    async def export_user(self, principal: Principal) -> Any:
        """The caller's data in this store, as JSON-ready values."""
        ...

    async def erase_user(self, principal: Principal) -> int:
        """Delete the caller's data in this store; returns how many items went."""
        ...


# --- audit ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    event: str
    tenant_id: str
    user_id: str
    correlation_id: str | None
    data: Mapping[str, Any]
    at: datetime


class AuditLog(Protocol):
    """Append-only record of who asked what, with which plan and sources."""

    async def append(self, record: AuditRecord) -> None: ...


# --- turns ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnRequest:
    message: str
    conversation_id: str | None = None
    correlation_id: str | None = None
    idempotency_key: str | None = None
    """The client's key for this request: sent again (a retry), it never starts a second
    turn (see :meth:`Assistant.start_turn`)."""


@dataclass(frozen=True, slots=True)
class PlanEvent:
    plan: Plan
    type: Literal["plan"] = "plan"


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: PlanStep
    outcome: StepOutcome | None = None
    """``None`` when the step starts; set when it ends."""
    type: Literal["step"] = "step"


@dataclass(frozen=True, slots=True)
class AnswerDelta:
    text: str
    type: Literal["delta"] = "delta"


@dataclass(frozen=True, slots=True)
class CitationsEvent:
    citations: tuple[Citation, ...]
    type: Literal["citations"] = "citations"


@dataclass(frozen=True, slots=True)
class CacheOutcome:
    """How the answer cache took part in a turn (shown to the client as a header and
    in the response): ``hit`` (the answer came from the cache), ``miss`` (it was looked
    up, not found, and the new answer may be stored) or ``skipped`` (not looked up, or
    not stored: ``reason`` says why, e.g. ``multi_turn`` or ``tool_steps``)."""

    status: Literal["hit", "miss", "skipped"]
    similarity: float | None = None
    """Cosine similarity of the nearest cached question, when one was compared."""
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DoneEvent:
    conversation_id: str
    message_id: str
    usage: Usage | None = None
    route: RouteInfo | None = None
    """Which model deployment answered, and why (from the inferencing gateway)."""
    cache: CacheOutcome | None = None
    """``None`` when no answer cache is configured."""
    type: Literal["done"] = "done"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str
    message: str
    retryable: bool = False
    type: Literal["error"] = "error"


@dataclass(frozen=True, slots=True)
class ApprovalRequiredEvent:
    """The turn paused before a high-risk tool call; nothing else follows on this stream.

    A person (the user, or someone with an approver role) decides with
    ``POST /v1/approvals/{approval_id}``; the turn then resumes where it stopped."""

    approval_id: str
    step_id: str
    tool: str
    arguments: Mapping[str, Any]
    summary: str
    """What will happen if it is approved, in one line."""
    expires_at: datetime
    conversation_id: str
    message_id: str
    """The paused answer, which the resumed turn completes."""
    type: Literal["approval_required"] = "approval_required"


TurnEvent = (
    PlanEvent
    | StepEvent
    | AnswerDelta
    | CitationsEvent
    | ApprovalRequiredEvent
    | DoneEvent
    | ErrorEvent
)


@dataclass(frozen=True, slots=True)
class StartedTurn:
    """A turn whose user message is already durable; ``events`` streams the answer."""

    conversation_id: str
    user_message_id: str
    events: AsyncGenerator[TurnEvent, None]
    """Close it (``aclose``) to abandon the turn; what was answered so far is kept."""


@dataclass(frozen=True, slots=True)
class TurnResult:
    conversation_id: str
    message_id: str
    answer: str
    citations: tuple[Citation, ...]
    plan: Plan
    steps: tuple[StepOutcome, ...] = field(default=())
    usage: Usage | None = None
    route: RouteInfo | None = None
    cache: CacheOutcome | None = None
    approval: ApprovalRequiredEvent | None = None
    """Set when the turn paused for approval (``answer`` is then empty)."""


@dataclass(frozen=True, slots=True)
class ApprovalDecisionRequest:
    approval_id: str
    decision: ApprovalDecision
    arguments: Mapping[str, Any] | None = None
    """With ``EDIT``: the arguments to run the tool with instead."""
    reason: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class ResumedTurn:
    """A decision recorded, and the paused turn continuing from where it stopped."""

    approval: ApprovalRequest
    """The approval after the decision (for the decider; its ``resume`` is internal)."""
    conversation_id: str
    message_id: str
    for_requester: bool
    """False when an approver decided for someone else: ``events`` carry the requester's
    answer, so drain them (the answer is stored) but never show them to the decider."""
    events: AsyncGenerator[TurnEvent, None]


class Assistant(Protocol):
    async def start_turn(self, request: TurnRequest, principal: Principal) -> StartedTurn:
        """Validate the input and persist the user message, then return the event stream.

        With an idempotency key the caller used before, for the same request: a finished
        turn's stored answer is replayed, a turn still running in this process is joined,
        and an interrupted or failed one runs again (once, whoever retries). Raises
        :class:`IdempotencyKeyReused` for another request under the key, and
        :class:`TurnInProgress` when the turn runs elsewhere or waits for an approval.

        Raises :class:`IntelligenceError` before anything streams."""
        ...

    async def run_turn(self, request: TurnRequest, principal: Principal) -> TurnResult:
        """The same turn, collected into one result."""
        ...

    async def decide(self, request: ApprovalDecisionRequest, principal: Principal) -> ResumedTurn:
        """Record a decision on a paused turn's high-risk call, then resume the turn.

        Raises the tools layer's ``ApprovalNotFound``, ``ApprovalConflict`` or
        ``InvalidToolArguments`` (for edited arguments) before anything streams, and
        :class:`ApprovalsUnavailable` when no approval gate is configured."""
        ...


async def collect_turn(events: AsyncGenerator[TurnEvent, None]) -> TurnResult:
    """A turn's events collected into one result (raises :class:`AnswerFailed` on an error)."""
    parts: list[str] = []
    plan: Plan | None = None
    citations: tuple[Citation, ...] = ()
    outcomes: list[StepOutcome] = []
    async with aclosing(events) as stream:
        async for event in stream:
            match event:
                case PlanEvent():
                    plan = event.plan
                case StepEvent(outcome=StepOutcome() as outcome):
                    outcomes.append(outcome)
                case AnswerDelta():
                    parts.append(event.text)
                case CitationsEvent():
                    citations = event.citations
                case ErrorEvent():
                    raise AnswerFailed(event.message, event.code)
                case ApprovalRequiredEvent():
                    assert plan is not None
                    return TurnResult(
                        conversation_id=event.conversation_id,
                        message_id=event.message_id,
                        answer="".join(parts),
                        citations=citations,
                        plan=plan,
                        steps=tuple(outcomes),
                        approval=event,
                    )
                case DoneEvent():
                    assert plan is not None
                    return TurnResult(
                        conversation_id=event.conversation_id,
                        message_id=event.message_id,
                        answer="".join(parts),
                        citations=citations,
                        plan=plan,
                        steps=tuple(outcomes),
                        usage=event.usage,
                        route=event.route,
                        cache=event.cache,
                    )
    raise AnswerFailed("The answer ended unexpectedly.")


# --- errors ---------------------------------------------------------------------


@dataclass
class IntelligenceError(Exception):
    """Base of intelligence failures; ``message`` is safe to show a user."""

    message: str

    def __str__(self) -> str:
        return self.message


class ConversationNotFound(IntelligenceError):
    pass


class InputRejected(IntelligenceError):
    """The message is empty, too long, or fails an input check."""


@dataclass
class UnsafeInput(InputRejected):
    """A safety check refused the message; nothing of the turn was stored.

    ``code`` says why, for clients: ``prompt_injection`` (the message looks like an
    attempt to override the assistant's instructions) or ``safety_unavailable`` (the
    check could not run and no offline fallback is configured; worth retrying)."""

    code: str = "prompt_injection"


class IdempotencyKeyReused(IntelligenceError):
    """The idempotency key was used before for a different request."""


class TurnInProgress(IntelligenceError):
    """The turn of this idempotency key is still running (elsewhere) or waits for an
    approval; retry later."""


class ApprovalsUnavailable(IntelligenceError):
    """This deployment has no approval gate: high-risk tools cannot run at all."""


@dataclass
class AnswerFailed(IntelligenceError):
    """The turn could not be answered (model or retrieval failure after retries, a
    token limit or quota, or an answer withheld by a content filter); ``code`` is the
    turn's error code, as in :class:`ErrorEvent`."""

    code: str = "answer_failed"
