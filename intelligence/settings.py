"""Settings of the intelligence layer (``LAMINA_INTELLIGENCE__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, SecretStr

from intelligence.contracts import RetentionPolicy


class IntelligenceSettings(BaseModel):
    conversations_path: Path | None = Field(
        default=None, description="SQLite conversation store; default <data_dir>/conversations.db"
    )
    prompts_dir: Path | None = Field(
        default=None, description="Versioned prompt files; default the bundled prompts/"
    )
    planner: Literal["auto", "deterministic", "model", "escalate"] = Field(
        default="auto",
        description="auto: the model plans when it can call tools, else deterministic; "
        "escalate: rules first, an agent only when rules cannot decide",
    )
    agent: Literal["auto", "research", "action"] = Field(
        default="auto",
        description="The agent escalation hands over to; auto: action for a request to act "
        "(or naming a tool) when the caller may use tools, else research",
    )
    max_agent_tokens: int = Field(
        default=32_000,
        ge=1,
        description="Model tokens the planning and agent calls of one turn may spend "
        "(the answer not counted)",
    )
    escalation_min_score: float | None = Field(
        default=None,
        description="escalate: a search whose best passage scores below this (the index's "
        "own scale) goes to an agent; empty: only a search that found nothing",
    )
    history_turns: int = Field(default=6, ge=0, le=50, description="Past messages in the prompt")
    history_tokens: int = Field(
        default=2_000,
        ge=0,
        description="Tokens of past messages a model sees verbatim, newest first; older ones "
        "go into the running summary (extractive mode: the oldest kept is cut short)",
    )
    summarize_history: bool = Field(
        default=True,
        description="Summarise messages beyond the verbatim history with the model "
        "(generative models only)",
    )
    rewrite_followups: bool = Field(
        default=True,
        description="Rewrite a follow-up question into a standalone search query before "
        "retrieval (by the model when it is generative, else by a word heuristic)",
    )
    summary_prompt: str = Field(
        default="conversation_summary", description="Prompt name in prompts/"
    )
    rewrite_prompt: str = Field(default="followup_query", description="Prompt name in prompts/")
    summary_max_tokens: int = Field(
        default=300, ge=16, le=4_000, description="Longest running summary, in tokens"
    )
    summary_input_tokens: int = Field(
        default=4_000,
        ge=64,
        description="Most tokens of newly aged-out messages summarised in one turn (the "
        "newest first; any older ones are left out of the summary)",
    )
    rewrite_max_tokens: int = Field(
        default=64, ge=8, le=1_000, description="Longest rewritten search query, in tokens"
    )
    memory_deployment: str | None = Field(
        default=None,
        description="Deployment for summaries and rewrites (e.g. a small model); "
        "empty: routed like any other call",
    )
    memory_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="A summary or rewrite slower than this is skipped (the turn goes on)",
    )
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
    tenant_retention_days: dict[str, PositiveFloat | None] = Field(
        default_factory=dict,
        description='Per-tenant retention overriding retention_days, e.g. {"contoso": 30}; '
        "null: kept",
    )
    turn_lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="How long a running turn counts as alive without renewing its lease "
        "(it renews every third of it); a turn whose lease ran out (its process died) is "
        "marked interrupted and may be retried",
    )
    sweep_interval_s: float = Field(
        default=60.0,
        ge=1.0,
        description="How often abandoned turns are marked, and messages and finished jobs "
        "past retention purged",
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


class JobSettings(BaseModel):
    """Background jobs: ingestion uploads and long agent tasks (``LAMINA_JOBS__*``)."""

    path: Path | None = Field(
        default=None, description="SQLite job store; default <data_dir>/jobs.db"
    )
    uploads_path: Path | None = Field(
        default=None,
        description="Where uploaded files wait for their ingestion job; default "
        "<data_dir>/uploads (a volume every replica shares, when there are several)",
    )
    concurrency: int = Field(
        default=2, ge=1, le=64, description="Jobs one server runs at a time; more wait queued"
    )
    lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="A running job renews its lease three times per period; a job whose "
        "lease ran out (its server died) is queued again",
    )
    poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60.0,
        description="How often a server looks for jobs queued elsewhere or abandoned",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Runs of a job whose server died each time, before it is failed",
    )
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest upload of one ingestion job, all files together (else 413)",
    )
    max_upload_files: int = Field(
        default=500, ge=1, le=10_000, description="Most files in one ingestion upload (else 422)"
    )


class AuditCosmosSettings(CosmosSettings):
    """The audit log in Azure Cosmos DB (``LAMINA_AUDIT__COSMOS__*``): one container
    partitioned by ``/tenantId``, one hash chain per tenant."""

    container: str = Field(default="audit", min_length=1, description="Container name")


class AuditSettings(BaseModel):
    """Where the append-only, hash-chained audit log lives (``LAMINA_AUDIT__*``)."""

    backend: Literal["sqlite", "cosmos"] = Field(
        default="sqlite", description="sqlite (embedded, <data_dir>/audit.db) or cosmos"
    )
    path: Path | None = Field(
        default=None, description="SQLite audit log; default <data_dir>/audit.db"
    )
    cosmos: AuditCosmosSettings = Field(default_factory=AuditCosmosSettings)
