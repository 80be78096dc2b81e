"""Settings of the intelligence layer (``LAMINA_INTELLIGENCE__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from intelligence.contracts import RetentionPolicy


class IntelligenceSettings(BaseModel):
    conversations_path: Path | None = Field(
        default=None, description="SQLite conversation store; default <data_dir>/conversations.db"
    )
    prompts_dir: Path | None = Field(
        default=None, description="Versioned prompt files; default the bundled prompts/"
    )
    planner: Literal["auto", "deterministic", "model"] = Field(
        default="auto",
        description="auto: the model plans when it can call tools, else deterministic",
    )
    history_turns: int = Field(default=6, ge=0, le=50, description="Past messages in the prompt")
    max_message_chars: int = Field(default=8_000, ge=1, description="Longer user messages: 422")
    answer_prompt: str = Field(default="grounded_answer", description="Prompt name in prompts/")
    planner_prompt: str = Field(default="planner", description="Prompt name in prompts/")
    max_rounds: int = Field(
        default=4,
        ge=1,
        le=20,
        description="Planning rounds per turn (the model sees results, then may call more)",
    )
    max_steps: int = Field(
        default=12, ge=1, le=100, description="Searches and tool calls per turn, all rounds"
    )
    max_tool_calls: int = Field(default=8, ge=0, le=100, description="Tool calls per turn")
    max_turn_s: float = Field(
        default=120.0, gt=0, le=3600, description="Wall time for planning and steps of a turn"
    )


class CosmosSettings(BaseModel):
    """Azure Cosmos DB for conversations (``LAMINA_CONVERSATIONS__COSMOS__*``): one
    container, partitioned by tenant, user and conversation."""

    endpoint: str | None = Field(
        default=None, description="Account endpoint, e.g. https://<account>.documents.azure.com"
    )
    key: SecretStr | None = Field(
        default=None, description="Account key; empty: Entra ID through azure-identity"
    )
    database: str = Field(default="lamina", min_length=1, description="Database name")
    container: str = Field(default="conversations", min_length=1, description="Container name")
    create_if_missing: bool = Field(
        default=False,
        description="Create the database and container at start-up (needs control-plane "
        "rights; infra/ creates them in production)",
    )


class ConversationSettings(BaseModel):
    """Where conversations live, how long they are kept, and how a running turn proves it
    is alive (``LAMINA_CONVERSATIONS__*``)."""

    backend: Literal["sqlite", "cosmos"] = Field(
        default="sqlite", description="sqlite (embedded) or cosmos (Azure Cosmos DB)"
    )
    cosmos: CosmosSettings = Field(default_factory=CosmosSettings)
    retention_days: float | None = Field(
        default=None, gt=0, description="Messages older than this are deleted; empty: kept"
    )
    tenant_retention_days: dict[str, float | None] = Field(
        default_factory=dict,
        description='Per-tenant retention overriding retention_days, e.g. {"contoso": 30}; '
        "null: kept",
    )
    turn_lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="A running turn renews its lease this often times three; a turn whose "
        "lease ran out (its process died) is marked interrupted and may be retried",
    )
    sweep_interval_s: float = Field(
        default=60.0,
        ge=1.0,
        description="How often abandoned turns are marked and expired messages purged",
    )

    def retention(self) -> RetentionPolicy:
        day = 86_400.0
        return RetentionPolicy(
            default_s=self.retention_days * day if self.retention_days else None,
            tenants={
                tenant: days * day if days else None
                for tenant, days in self.tenant_retention_days.items()
            },
        )


class AnswerCacheSettings(BaseModel):
    """The semantic answer cache (``LAMINA_ANSWER_CACHE__*``): answers reused for the same
    question asked again in the same access scope, corpus, model, prompt and context."""

    enabled: bool = Field(default=False, description="Look answers up and store them")
    backend: Literal["auto", "in-process", "redis"] = Field(
        default="auto",
        description="auto: Redis when LAMINA_REDIS__URL is set, else in-process",
    )
    similarity_threshold: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Least cosine similarity between two questions for a hit",
    )
    ttl_s: float = Field(default=3600.0, gt=0, description="An entry is served this long at most")
    max_entries_per_scope: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Entries kept per key scope (the oldest go first); each lookup compares all",
    )
    max_scopes: int = Field(
        default=10_000, ge=1, description="Key scopes kept in-process (least recently used go)"
    )
    multi_turn: bool = Field(
        default=False,
        description="Also cache follow-up turns (keyed by the conversation so far)",
    )
    tool_turns: bool = Field(
        default=False,
        description="Also cache turns that called tools (then keyed per user and roles)",
    )
    lookup_timeout_s: float = Field(
        default=1.0, gt=0, description="A lookup slower than this is a miss"
    )
    embedding_deployment: str | None = Field(
        default=None,
        description="Deployment whose embedding model compares questions; "
        "empty: the offline hashing embedder (lexical, not semantic)",
    )
    hashing_dimensions: int = Field(
        default=512, ge=16, le=65_536, description="Vector size of the hashing embedder"
    )
    redis_prefix: str = Field(
        default="lamina:answer-cache:", min_length=1, description="Key prefix in Redis"
    )


PiiKind = Literal["email", "phone", "card", "iban"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "iban")


class SafetySettings(BaseModel):
    """Safety checks on a turn (``LAMINA_SAFETY__*``): prompt injection in the message,
    indirect injection in retrieved passages and tool outputs, PII in the answer, and
    harm categories in the answer where a content moderator is configured."""

    injection_check: bool = Field(default=True, description="Refuse messages flagged as attacks")
    indirect_check: bool = Field(
        default=True, description="Screen passages and tool outputs before the model sees them"
    )
    indirect_action: Literal["fence", "drop"] = Field(
        default="fence",
        description="fence: mark flagged content as untrusted data; drop: withhold it",
    )
    pii_redaction: bool = Field(default=True, description="Redact PII from answers as they stream")
    pii_kinds: list[PiiKind] = Field(
        default_factory=lambda: list(PII_KINDS),
        description="Which kinds of PII to redact",
    )
    phone_region: str = Field(
        default="US",
        pattern=r"^[A-Z]{2}$",
        description="Region for phone numbers written without a country code (ISO 3166 alpha-2)",
    )
    moderation: bool = Field(
        default=True, description="Moderate answers when a content moderator is configured"
    )
    moderation_chunk_chars: int = Field(
        default=400,
        ge=50,
        le=10_000,
        description="Answer text held back and moderated at a time (less: earlier first bytes)",
    )
    moderation_on_error: Literal["allow", "block"] = Field(
        default="allow",
        description="Moderator down: allow (log, answer unmoderated) or block the answer",
    )
