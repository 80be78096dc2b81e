"""Request and response bodies of the chat REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from inferencing.contracts import RouteInfo, Usage
from intelligence.contracts import (
    ApprovalRequiredEvent,
    CacheOutcome,
    Citation,
    Conversation,
    ConversationMessage,
    ExplainedSource,
    FeedbackRating,
    MessageStatus,
    ModelCallRecord,
    Plan,
    PolicyDecision,
    RetrievalCounts,
    StepOutcome,
    StepTiming,
    TurnExplanation,
)
from tools.contracts import ApprovalDecision, ApprovalRequest, ApprovalStatus

# A hard ceiling on what the edge parses; the configurable limit is enforced by
# the intelligence layer (LAMINA_INTELLIGENCE__MAX_MESSAGE_CHARS).
MESSAGE_CEILING = 100_000


class ChatRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=MESSAGE_CEILING, description="The question")
    conversation_id: str | None = Field(
        default=None, max_length=64, description="Continue this conversation; omit to start one"
    )


class ChatAnswer(BaseModel):
    conversation_id: str
    message_id: str
    answer: str
    citations: list[Citation]
    plan: Plan
    steps: list[StepOutcome]
    usage: Usage | None = None
    route: RouteInfo | None = Field(
        default=None, description="The model deployment that answered, and why"
    )
    cache: CacheOutcome | None = Field(
        default=None,
        description="hit, miss or skipped, with the similarity; null when the answer cache is off",
    )
    approval: ApprovalRequiredEvent | None = Field(
        default=None,
        description="Set when the turn paused before a high-risk action: decide it with "
        "POST /v1/approvals/{approval_id}; `answer` is then empty",
    )


class ConversationSummary(BaseModel):
    id: str
    title: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, conversation: Conversation) -> ConversationSummary:
        return cls(
            id=conversation.id,
            title=conversation.title,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
        )


class ConversationList(BaseModel):
    items: list[ConversationSummary]
    next_cursor: str | None = None


class RenameConversationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"\S",
        description="The new title (at least one non-blank character)",
    )


class PassageView(BaseModel):
    """A cited passage, as the caller may read it."""

    chunk_id: str
    document_id: str
    title: str
    source: str = Field(description="Path of the source document within the ingested corpus")
    text: str
    page: int | None = None
    section: str | None = None


class MessageView(BaseModel):
    id: str
    role: str
    content: str
    status: MessageStatus
    created_at: datetime
    citations: list[Citation] = []
    plan: Plan | None = None

    @classmethod
    def of(cls, message: ConversationMessage) -> MessageView:
        return cls(
            id=message.id,
            role=message.role,
            content=message.content,
            status=message.status,
            created_at=message.created_at,
            citations=list(message.citations),
            plan=message.plan,
        )


class ConversationDetail(ConversationSummary):
    messages: list[MessageView]


class RetrievalView(BaseModel):
    """The turn's searches as the caller may see them. How many candidates the access
    rules trimmed is deliberately absent: told to the asker, that count would let them
    probe, query by query, for documents they may not read (auditors find it in the
    audit log's ``chat.turn`` entries)."""

    searches: int
    returned: int
    indexes: list[str]

    @classmethod
    def of(cls, counts: RetrievalCounts) -> RetrievalView:
        return cls(searches=counts.searches, returned=counts.returned, indexes=list(counts.indexes))


class TurnExplanationView(BaseModel):
    """How one answer was produced, as recorded while its turn ran."""

    turn_id: str = Field(description="The answer's message id")
    conversation_id: str
    question: str
    status: MessageStatus
    started_at: datetime
    duration_ms: float = Field(description="Running time (a wait for an approval excluded)")
    trace_id: str | None = Field(description="The turn's trace (32 hex digits), when traced")
    plan: Plan | None = Field(description="The plan that ran, as streamed, round by round")
    steps: list[StepTiming] = Field(description="Each step as it ran: start, duration, status")
    sources: list[ExplainedSource] = Field(
        description="The passages retrieval returned, with scores, [n] refs and whether cited"
    )
    retrieval: RetrievalView = Field(description="Searches and the passages they returned")
    model_calls: list[ModelCallRecord] = Field(
        description="Planning and answer calls: deployment, model version, tokens, timing"
    )
    prompts: dict[str, str] = Field(description='Prompt versions used, e.g. {"answer": ...}')
    policy: list[PolicyDecision] = Field(description="Policy checks and outcomes, in order")
    time_to_first_token_ms: float | None
    error: str | None = Field(description="The error code the turn ended with, if any")

    @classmethod
    def of(cls, explanation: TurnExplanation) -> TurnExplanationView:
        return cls(
            turn_id=explanation.turn_id,
            conversation_id=explanation.conversation_id,
            question=explanation.question,
            status=explanation.status,
            started_at=explanation.started_at,
            duration_ms=explanation.duration_ms,
            trace_id=explanation.trace_id,
            plan=explanation.plan,
            steps=list(explanation.steps),
            sources=list(explanation.sources),
            retrieval=RetrievalView.of(explanation.retrieval),
            model_calls=list(explanation.model_calls),
            prompts=dict(explanation.prompts),
            policy=list(explanation.policy),
            time_to_first_token_ms=explanation.time_to_first_token_ms,
            error=explanation.error,
        )


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: FeedbackRating = Field(description="positive or negative")
    comment: str | None = Field(
        default=None, max_length=1000, description="What was good or wrong about the answer"
    )


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


class UsageReportRow(BaseModel):
    key: str = Field(description="The tenant, tenant/user, model@version or deployment")
    calls: int
    input_tokens: int
    output_tokens: int
    cost: float = Field(description="In the currency of the registry's prices")


class UsageReport(BaseModel):
    tenant_id: str
    by: str
    since: datetime
    rows: list[UsageReportRow]


class ApprovalView(BaseModel):
    """A high-risk tool call waiting for, or past, a person's decision."""

    id: str
    tool: str
    arguments: dict[str, Any] = Field(description="What the tool runs with, after any edit")
    summary: str
    status: ApprovalStatus
    requested_by: str
    created_at: datetime
    expires_at: datetime
    requested_arguments: dict[str, Any] | None = Field(
        default=None, description="What was asked for, when a decider edited the arguments"
    )
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None

    @classmethod
    def of(cls, approval: ApprovalRequest) -> ApprovalView:
        return cls(
            id=approval.id,
            tool=approval.tool,
            arguments=dict(approval.arguments),
            summary=approval.summary,
            status=approval.status,
            requested_by=approval.requested_by,
            created_at=approval.created_at,
            expires_at=approval.expires_at,
            requested_arguments=(
                dict(approval.requested_arguments)
                if approval.requested_arguments is not None
                else None
            ),
            decided_by=approval.decided_by,
            decided_at=approval.decided_at,
            reason=approval.reason,
        )


class ApprovalList(BaseModel):
    items: list[ApprovalView]


class ApprovalDecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: ApprovalDecision = Field(
        description="approve, edit (approve these arguments), reject"
    )
    arguments: dict[str, Any] | None = Field(
        default=None, description="With edit: the arguments to run the tool with instead"
    )
    reason: str | None = Field(default=None, max_length=1000, description="Shown to the model")


class ApprovalOutcome(BaseModel):
    approval: ApprovalView
    answer: ChatAnswer | None = Field(
        default=None,
        description="The resumed turn's answer, for the requester; null when an approver "
        "decided for someone else (the answer is in the requester's conversation)",
    )
