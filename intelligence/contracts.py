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
    ) -> bool:
        """Store the message's final text and status. With ``attempt``, only while that run
        of its turn owns it (a retry took it over otherwise). Returns whether it was
        written."""
        ...

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
        emptied, leased until ``lease_until``, with a new ``attempt``. Of racing claims
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


@dataclass
class AnswerFailed(IntelligenceError):
    """The turn could not be answered (model or retrieval failure after retries, a
    token limit or quota, or an answer withheld by a content filter); ``code`` is the
    turn's error code, as in :class:`ErrorEvent`."""

    code: str = "answer_failed"
