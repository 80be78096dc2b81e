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
from knowledge.contracts import RetrievedPassage
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
    """Which planner produced the plan: ``deterministic``, ``model:<name>``, or a hand-over
    such as ``deterministic>agent:research`` (rules first, then an agent). A turn's
    recorded plan, extended round by round, names the planner of its latest round."""
    rationale: str = ""
    revisit: bool = False
    """Ask the planner again with this round's results even though no model planned its
    steps: rules that must see what a search found before they can decide (an empty or
    weak result hands the turn over to an agent)."""
    usage: Usage | None = None
    """Model tokens spent to make the plan (``None``: no model was asked). In a turn's
    recorded plan, the sum over its rounds: what ``max_agent_tokens`` is checked against."""


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
    """What a planner is given: the question, the recent history, the caller, the
    results of the rounds planned so far in this turn (empty on the first round), and
    the passages those rounds' searches found (security-trimmed: the caller may read
    them), so rules can judge whether a search found enough."""

    @property
    def question(self) -> str: ...

    @property
    def history(self) -> Sequence[ConversationMessage]: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def rounds(self) -> Sequence[Sequence[StepResult]]: ...

    @property
    def passages(self) -> Sequence[RetrievedPassage]: ...

    @property
    def search_query(self) -> str:
        """The question as a standalone search query: a follow-up ("what about for
        contractors?") rewritten with what it refers to in the history; else the question."""
        ...


class Planner(Protocol):
    async def plan(self, context: PlanningContext) -> Plan:
        """The next steps. With ``context.rounds`` empty, the whole turn's first plan; after
        a round of model-planned calls (steps with a ``tool_call_id``) or a plan that asked
        to ``revisit``, the planner is asked again with their results and returns more
        steps, or only the answer step."""
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
    explanation: TurnExplanation | None = None
    """For an assistant reply that finished running: how it was produced (see
    :class:`TurnExplanation`; for a reply paused for approval, what ran before the pause);
    ``None`` for user messages and running replies."""
    feedback: AnswerRating | None = None
    """For an assistant reply: its owner's rating (one per reply, the latest given)."""


FeedbackRating = Literal["positive", "negative"]


@dataclass(frozen=True, slots=True)
class AnswerRating:
    """A user's rating of one of their answers, as stored with it: a new rating of the
    same answer replaces it, so one person counts once per answer."""

    rating: FeedbackRating
    comment: str | None
    at: datetime


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
    attempt: str | None = None
    """The current run of the turn, new with :meth:`ConversationStore.begin_turn` and with
    each :meth:`~ConversationStore.retry_turn`: renewing the lease and storing the answer
    need it, so a run that lost its turn to a retry can no longer write to it."""


@dataclass(frozen=True, slots=True)
class ConversationExport:
    """One conversation with all its messages, as a data-subject export gives it."""

    conversation: Conversation
    messages: tuple[ConversationMessage, ...]


class ConversationStore(Protocol):
    """Conversations scoped to (tenant, user). A caller never reads, lists or deletes
    another user's conversation: such a lookup behaves as if it did not exist. A
    conversation and its messages are written a turn at a time: :meth:`begin_turn` starts
    the conversation with its first question.

    Every adapter passes ``tests/intelligence/stores/conversation_contract.py``. An adapter
    is built with a :class:`RetentionPolicy`: messages older than their tenant's period
    are deleted (by :meth:`purge_expired`, or by the backend's own expiry)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, principal: Principal, conversation_id: str) -> Conversation | None: ...

    async def list_conversations(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> ConversationPage: ...

    async def delete(self, principal: Principal, conversation_id: str) -> bool: ...

    async def rename(self, principal: Principal, conversation_id: str, title: str) -> bool:
        """Give the caller's conversation a new title; False when it is not theirs (or
        gone). ``updated_at`` stays: a rename is housekeeping, not activity that reorders
        the list."""
        ...

    async def finish_message(
        self,
        principal: Principal,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        citations: Sequence[Citation] = (),
        plan: Plan | None = None,
        attempt: str | None = None,
        explanation: TurnExplanation | None = None,
    ) -> bool:
        """Store the message's final text and status (and how it was produced). With
        ``attempt``, only while that run of its turn owns it (a retry took it over
        otherwise). Returns whether it was written."""
        ...

    async def messages(
        self, principal: Principal, conversation_id: str, *, last: int | None = None
    ) -> list[ConversationMessage]: ...

    async def rate(
        self, principal: Principal, conversation_id: str, message_id: str, rating: AnswerRating
    ) -> ConversationMessage | None:
        """Store the caller's rating of their reply ``message_id`` in ``conversation_id``,
        replacing an earlier one (in one atomic write: of two racing ratings, each sees
        the other's or none). Returns the reply as it was before, so its ``feedback`` is
        the rating replaced; ``None``, and nothing written, when it is not the caller's
        reply in that conversation, or when it is still running or paused for approval."""
        ...

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
        self,
        principal: Principal,
        reply_id: str,
        content: str,
        lease_until: datetime,
        *,
        attempt: str,
    ) -> bool:
        """A running turn's heartbeat: keep the answer so far and extend the lease. False
        (and nothing changed) when the reply is no longer ``STREAMING`` or ``attempt`` is no
        longer its current run."""
        ...

    async def retry_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime, *, now: datetime
    ) -> TurnRecord | None:
        """Claim a turn to run again: a reply that is ``INTERRUPTED`` or ``FAILED``, or
        ``STREAMING`` with a lease ended before ``now``, becomes ``STREAMING`` again,
        emptied (its explanation and rating go with the old answer), leased until
        ``lease_until``, with a new ``attempt``. Of racing claims
        exactly one gets the record; the others (and a reply in any other state) get
        ``None``."""
        ...

    async def resume_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime
    ) -> TurnRecord | None:
        """Claim a turn paused for approval to continue it: an ``AWAITING_APPROVAL`` reply
        becomes ``STREAMING``, leased until ``lease_until``, with a new ``attempt``. Of
        racing claims exactly one gets the record; a reply in any other state gets
        ``None``."""
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
    """One event, as a layer hands it to the audit log. Never carries secrets, passage
    text or what an ACL hid (only how many candidates it hid)."""

    event: str
    """Dotted name: ``chat.turn``, ``tool.call``, ``approval.decided``, ``privacy.erase``,
    ``admin.key_created`` … (``docs/audit.md`` lists them)."""
    tenant_id: str
    user_id: str
    correlation_id: str | None
    data: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A stored record, linked into its tenant's hash chain."""

    record: AuditRecord
    seq: int
    """Position in the tenant's chain, from 1, without gaps."""
    prev_hash: str
    """``hash`` of the tenant's previous entry (64 zeros for the first)."""
    hash: str
    """SHA-256 over ``prev_hash`` and the record's canonical JSON
    (:func:`intelligence.audit_chain.entry_hash`)."""


@dataclass(frozen=True, slots=True)
class AuditQuery:
    tenant_id: str
    """Always one tenant: an auditor sees their own tenant's log only."""
    event: str | None = None
    """An exact event name, or a prefix ending in ``.`` (``tool.``)."""
    user_id: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    """Paging: entries with a larger ``seq`` only."""
    limit: int = 100


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: tuple[AuditEntry, ...]
    next_after_seq: int | None = None
    """Pass as ``after_seq`` for the next page; ``None``: this was the last."""


@dataclass(frozen=True, slots=True)
class ChainVerification:
    tenant_id: str
    entries: int
    """How many entries were checked."""
    intact: bool
    first_bad_seq: int | None = None
    """The first entry whose hash, link or position does not check out."""
    problem: str | None = None


class AuditLog(Protocol):
    """Append-only record of who asked what, with which plan and sources; one hash chain
    per tenant, so a modified, removed or reordered entry is detected by :meth:`verify`.

    Adapters offer no update or delete. Every adapter passes
    ``tests/intelligence/stores/audit_contract.py``."""

    async def append(self, record: AuditRecord) -> AuditEntry:
        """Link the record into its tenant's chain and store it. Concurrent appends (from
        any number of processes or replicas) never fork or break the chain."""
        ...

    async def query(self, query: AuditQuery) -> AuditPage:
        """Entries matching the query, in chain order."""
        ...

    async def verify(self, tenant_id: str) -> ChainVerification:
        """Recompute the tenant's chain from its first entry."""
        ...

    async def tenants(self) -> list[str]:
        """Tenants with at least one entry (for verifying every chain)."""
        ...


# --- explanations ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step of a turn's plan as it ran."""

    step_id: str
    kind: StepKind
    description: str
    started_at: datetime
    duration_ms: float | None
    """``None``: the step never finished (the turn paused, failed or was cut off)."""
    status: StepStatus | None = None
    summary: str = ""
    query: str | None = None
    tool: str | None = None


@dataclass(frozen=True, slots=True)
class ExplainedSource:
    """A passage retrieval returned for this turn (never one the caller may not see)."""

    chunk_id: str
    document_id: str
    source: str
    title: str
    score: float | None
    """On the index's own scale; ``None`` for a cached answer's source (not searched)."""
    index: str | None
    """The index that returned it; ``None`` for a cached answer's source."""
    page: int | None = None
    ref: int | None = None
    """Its ``[n]`` number in the answer's sources; ``None``: not shown to the model."""
    cited: bool = False
    step_id: str | None = None
    """The retrieve step that found it (``None``: a cached answer's sources)."""


@dataclass(frozen=True, slots=True)
class RetrievalCounts:
    """Summed over the turn's searches."""

    searches: int = 0
    candidates: int = 0
    """Matches before the ACL filter: ``returned + trimmed`` where the index can tell."""
    trimmed: int = 0
    """Candidates the caller may not see: counted, never named."""
    returned: int = 0
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelCallRecord:
    """One model call of the turn, as the gateway routed it."""

    purpose: Literal["plan", "answer", "summary", "replay"]
    deployment: str | None
    model: str | None
    model_version: str | None
    duration_ms: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    time_to_first_token_ms: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """A check the turn passed or failed, in the order they happened."""

    check: str
    """``input_safety``, ``answer_cache``, ``tool_policy``, ``approval``,
    ``output_safety``, ``context_safety`` …"""
    outcome: str
    """``allowed``, ``refused``, ``redacted``, ``flagged``, ``hit``, ``miss`` …"""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TurnExplanation:
    """What a turn actually did, recorded as it ran and stored with its reply:
    ``GET /v1/conversations/{id}/turns/{turn}/explain`` returns it and ``lamina replay``
    replays the answer against the same sources."""

    turn_id: str
    """The reply's message id."""
    conversation_id: str
    question: str
    status: MessageStatus
    """The reply's status as it is now (a run whose process died is marked
    ``INTERRUPTED`` by the sweep, after it stored its explanation or before it stored any)."""
    started_at: datetime
    duration_ms: float
    """Running time; 0 for a run that died before it recorded anything (its explanation
    is then only what the reply itself tells: question, status, plan)."""
    trace_id: str | None = None
    """The OpenTelemetry trace of the run (also the correlation id), when traced."""
    plan: Plan | None = None
    steps: tuple[StepTiming, ...] = ()
    sources: tuple[ExplainedSource, ...] = ()
    retrieval: RetrievalCounts = field(default_factory=RetrievalCounts)
    model_calls: tuple[ModelCallRecord, ...] = ()
    prompts: Mapping[str, str] = field(default_factory=dict)
    """Prompt role to its versioned id: ``{"answer": "grounded_answer@v1", …}``."""
    policy: tuple[PolicyDecision, ...] = ()
    time_to_first_token_ms: float | None = None
    """From the start of the run to the first answer text sent."""
    error: str | None = None
    """The error code the turn ended with, if any."""


@dataclass(frozen=True, slots=True)
class ReplayedTurn:
    """A stored turn's answer produced again from the same sources (those the owner may
    still see), with the recorded answer prompt, through today's model route."""

    original: TurnExplanation
    original_answer: str
    original_citations: tuple[Citation, ...]
    answer: str
    citations: tuple[Citation, ...]
    missing_sources: tuple[str, ...]
    """Chunk ids the turn used that are gone, or no longer visible to its owner."""
    model_call: ModelCallRecord | None = None


@dataclass(frozen=True, slots=True)
class TurnFeedback:
    """A user's rating of one of their answers."""

    conversation_id: str
    turn_id: str
    """The rated reply's message id."""
    rating: FeedbackRating
    comment: str | None = None
    correlation_id: str | None = None


# --- turns ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnRequest:
    message: str
    conversation_id: str | None = None
    correlation_id: str | None = None
    idempotency_key: str | None = None
    """The client's key for this request: sent again (a retry), it never starts a second
    turn (see :meth:`Assistant.start_turn`)."""
    tools: bool = True
    """False: a grounded turn only. Rules plan it (search, then answer with citations) and
    no tool is offered or called, whatever the caller may use (``lamina-rag``)."""


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
    idempotency: Literal["new", "replayed", "joined", "retried"] | None = None
    """With an idempotency key: whether this request started the turn (``new``), plays
    back its stored answer (``replayed``), joined it while it runs (``joined``) or runs
    an interrupted or failed one again (``retried``)."""


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

    async def explain(
        self, principal: Principal, conversation_id: str, turn_id: str
    ) -> TurnExplanation | None:
        """The recorded explanation of the caller's own turn (``turn_id``: the reply's
        message id; a turn paused for approval: what ran before the pause), with the
        reply's current status; for a turn whose run died before it recorded one, what
        the reply tells (question, status, plan). ``None`` when there is no such turn, it
        is someone else's, or it is still running."""
        ...

    async def replay(
        self,
        principal: Principal,
        conversation_id: str,
        turn_id: str,
        *,
        actor: str,
        correlation_id: str | None = None,
    ) -> ReplayedTurn:
        """Answer the turn of ``principal`` (its owner) again from its recorded sources
        and prompt, and audit it (``chat.replay``) as done by ``actor``, who asked for it
        (an operator, ``cli:<login>``). Raises :class:`ConversationNotFound` when there is
        no such finished turn with a recorded explanation, and :class:`ReplayUnavailable`
        when its answer prompt version is no longer installed."""
        ...

    async def feedback(self, feedback: TurnFeedback, principal: Principal) -> bool:
        """Store the caller's rating of their own finished answer, replacing an earlier
        one. A new rating or comment is audited (``chat.feedback``), a new rating counts
        in the quality metrics of the answer's prompt; the same rating again records
        nothing. False, and nothing stored, when there is no such finished answer of the
        caller's."""
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


# --- jobs -----------------------------------------------------------------------

INGEST_JOB = "ingest"
"""A job kind: index uploaded documents under an ACL file."""
AGENT_TASK_JOB = "agent_task"
"""A job kind: one long turn of the assistant, run in the background."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobFailure:
    """Why a job failed: a stable ``code`` for clients, a ``message`` safe to show."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Job:
    """Work that runs in the background, owned by (tenant, user); its state is durable."""

    id: str
    kind: str
    tenant_id: str
    user_id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    input: Mapping[str, Any]
    """What the job works on, as JSON-ready values (never a server path)."""
    principal: Principal
    """The caller's identity when the job was created: the job runs as this principal."""
    progress: float | None = None
    """Between 0 and 1, when the job can tell; ``None`` otherwise."""
    progress_message: str | None = None
    result: Mapping[str, Any] | None = None
    """JSON-ready, once the job succeeded."""
    error: JobFailure | None = None
    cancel_requested: bool = False
    attempts: int = 0
    """How many times the job was claimed to run (more than one after a crash)."""
    worker_id: str | None = None
    lease_until: datetime | None = None
    """While ``RUNNING``: the job counts as abandoned (its process died) after this."""


@dataclass(frozen=True, slots=True)
class JobPage:
    items: tuple[Job, ...]
    next_cursor: str | None = None


class JobAlreadyFinished(Exception):
    """A cancel request for a job that has already ended; the message is safe to show."""


class JobStore(Protocol):
    """Durable jobs scoped to (tenant, user) for their owners: another user's job behaves
    as if it did not exist. Workers claim queued jobs with a lease they renew; a job whose
    lease ended is requeued. Also a :class:`PersonalDataHolder`.

    Every adapter passes ``tests/intelligence/stores/job_contract.py``. Leases are judged
    against the ``now`` a caller passes, never the adapter's own clock."""

    @property
    def name(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(
        self,
        principal: Principal,
        kind: str,
        input: Mapping[str, Any],
        *,
        job_id: str | None = None,
    ) -> Job:
        """A new ``QUEUED`` job owned by and run as ``principal`` (its id is ``job_id``
        when given, else a fresh one)."""
        ...

    async def get(self, principal: Principal, job_id: str) -> Job | None:
        """The caller's job, or ``None`` (also for another user's job)."""
        ...

    async def list_jobs(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> JobPage:
        """The caller's jobs, newest first; raises ``ValueError`` for a bad cursor."""
        ...

    async def claim(
        self, worker_id: str, lease_until: datetime, *, kinds: Sequence[str]
    ) -> Job | None:
        """The oldest ``QUEUED`` job of one of ``kinds``, now ``RUNNING`` for ``worker_id``
        until ``lease_until``, its ``attempts`` counted. Of racing claims for one job
        exactly one gets it; ``None`` when nothing is queued."""
        ...

    async def heartbeat(self, job_id: str, worker_id: str, lease_until: datetime) -> Job | None:
        """Extend the lease of a job ``worker_id`` runs, and return it (its
        ``cancel_requested`` tells the worker to stop). ``None`` when the worker no longer
        holds the job (finished, requeued after its lease ended, or erased)."""
        ...

    async def set_progress(
        self, job_id: str, worker_id: str, progress: float | None, message: str | None
    ) -> bool:
        """Record a running job's progress; False when ``worker_id`` no longer holds it."""
        ...

    async def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        result: Mapping[str, Any] | None = None,
        error: JobFailure | None = None,
    ) -> Job | None:
        """End a job ``worker_id`` holds with a finished ``status`` (progress 1 when it
        succeeded); ``None`` (and nothing changed) when the worker no longer holds it."""
        ...

    async def release(self, job_id: str, worker_id: str) -> bool:
        """Give a job back to the queue (its worker shuts down): ``QUEUED`` again, this
        attempt not counted, or ``CANCELLED`` when a cancel was requested."""
        ...

    async def request_cancel(self, principal: Principal, job_id: str) -> Job | None:
        """Cancel the caller's job: a queued one is ``CANCELLED`` at once, a running one
        gets ``cancel_requested`` (its worker stops it), a finished one is left as it was.
        Returns the job as it is now, or ``None`` when it is not the caller's."""
        ...

    async def requeue_abandoned(self, now: datetime, *, max_attempts: int) -> list[Job]:
        """Every ``RUNNING`` job whose lease ended before ``now`` (all tenants), after this
        call: ``QUEUED`` again, ``CANCELLED`` when a cancel was requested, or ``FAILED``
        (code ``abandoned``) when it was claimed ``max_attempts`` times already."""
        ...

    async def purge_expired(self, now: datetime) -> int:
        """Delete finished jobs that ended longer ago than their tenant's retention period
        (a store is built with the conversations' :class:`RetentionPolicy`: an agent task
        holds a question and its answer too); returns how many went."""
        ...

    async def export_user(self, principal: Principal) -> list[dict[str, Any]]:
        """Every job of the caller, oldest first, as JSON-ready values."""
        ...

    async def erase_user(self, principal: Principal) -> int:
        """Delete every job of the caller; returns how many went."""
        ...


# --- errors ---------------------------------------------------------------------


@dataclass
class IntelligenceError(Exception):
    """Base of intelligence failures; ``message`` is safe to show a user."""

    message: str

    def __str__(self) -> str:
        return self.message


class ConversationNotFound(IntelligenceError):
    pass


class StoreUnavailable(IntelligenceError):
    """A store cannot serve the request (unreachable, refusing credentials, misconfigured);
    worth retrying. Its ``message`` is for the operator's log: clients get a generic one."""


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


class ReplayUnavailable(IntelligenceError):
    """A stored turn cannot be replayed as it ran (its answer prompt version is gone)."""


@dataclass
class AnswerFailed(IntelligenceError):
    """The turn could not be answered (model or retrieval failure after retries, a
    token limit or quota, or an answer withheld by a content filter); ``code`` is the
    turn's error code, as in :class:`ErrorEvent`."""

    code: str = "answer_failed"
