"""Request and response bodies of the chat REST API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from inferencing.contracts import RouteInfo, Usage
from intelligence.contracts import (
    CacheOutcome,
    Citation,
    Conversation,
    ConversationMessage,
    MessageStatus,
    Plan,
    StepOutcome,
)

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
