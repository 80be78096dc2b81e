"""The composition root: the only module that imports concrete adapters.

It reads settings once and builds the object graph: index, retriever,
toolset, chat model, planner, stores and the orchestrator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from asgi_correlation_id import correlation_id

from client_api.auth.api_keys import ApiKeyStore, open_api_key_store
from client_api.edge.caps import RequestCaps
from client_api.edge.limits import (
    InProcessLimitStore,
    LimitStore,
    RateLimiter,
    RedisLimitStore,
    ResilientLimitStore,
)
from client_api.knowledge_embedder import build_knowledge_embedder
from client_api.personal_data import UsageData
from client_api.settings import LaminaSettings
from inferencing.contracts import ChatModel, EmbeddingModel
from inferencing.gateway import Gateway, build_gateway
from inferencing.gateway.breaker import BreakerStore, InProcessBreakerStore
from inferencing.gateway.metering import SqliteUsageLedger, UsageLedger
from inferencing.providers import build_embedding_model
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from inferencing.safety.azure_content_safety import AzureContentSafety
from inferencing.safety.heuristic import HeuristicPromptShield
from inferencing.tokens import default_counter
from intelligence.answer_cache import AnswerCache, AnswerCacheStore, InProcessAnswerCacheStore
from intelligence.contracts import (
    Assistant,
    AuditLog,
    AuditRecord,
    ConversationStore,
    JobStore,
    PersonalDataHolder,
    Planner,
    PlanningContext,
)
from intelligence.jobs import AgentTasks, IngestJobs, JobRunner
from intelligence.memory import ConversationMemory
from intelligence.orchestrator import Orchestrator
from intelligence.personal_data import (
    AnswerCacheData,
    ApprovalData,
    ConversationData,
    PersonalData,
)
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.quality import QualityMonitor
from intelligence.safety.policy import SafetyPolicy
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.stores.sqlite_audit import SqliteAuditLog
from intelligence.stores.sqlite_jobs import SqliteJobStore
from intelligence.upkeep import Upkeep
from knowledge.backends.fusion import HybridFusion
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import Embedder, Ingestor, KnowledgeIndex, Retriever
from knowledge.ingestion.acl import AccessRules
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from tools.approvals.factory import open_approval_store
from tools.contracts import ApprovalGate, ToolAuditRecord, Toolset
from tools.policy import BuiltTools, build_tools
from tools.settings import McpServerSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from client_api.teams.conversations import TeamsConversationMap
    from intelligence.stores.cosmos import CosmosConversationStore
    from intelligence.stores.cosmos_audit import CosmosAuditLog
    from knowledge.ingestion.document_intelligence import DocumentIntelligenceParser

log = logging.getLogger(__name__)


def sample_corpus() -> Path:
    """The bundled demo corpus (``samples/corpus`` beside the packages)."""
    return Path(__file__).resolve().parent.parent / "samples" / "corpus"


@dataclass
class Services:
    settings: LaminaSettings
    index: KnowledgeIndex
    ingestor: Ingestor
    retriever: Retriever
    toolset: Toolset
    gateway: Gateway
    conversations: ConversationStore
    audit: AuditLog
    assistant: Assistant
    state: GatewayState
    limiter: RateLimiter
    caps: RequestCaps
    api_keys: ApiKeyStore
    answer_cache: AnswerCache | None
    approvals: ApprovalGate | None
    """Where high-risk tool calls wait for a person; None: they never run."""
    personal_data: PersonalData
    """Export and erasure of a person's data across every store that keeps any."""
    _stack: AsyncExitStack
    jobs: JobStore
    job_runner: JobRunner
    """Runs queued jobs in the background; the app starts it (and stops it at shutdown)."""
    ingest_jobs: IngestJobs
    agent_tasks: AgentTasks
    teams_conversations: TeamsConversationMap | None = None
    """The Teams bot's conversation map, when Teams is enabled."""

    def describe(self) -> dict[str, str]:
        """Where shared state lives and whether it is degraded, for /readyz."""
        checks = dict(self.state.describe())
        if self.answer_cache is not None:
            checks.update(self.answer_cache.describe())
        return checks

    async def aclose(self) -> None:
        await self._stack.aclose()


@dataclass
class GatewayState:
    """Where the gateway keeps breakers, usage and rate limits: in-process and SQLite,
    or Redis."""

    breakers: BreakerStore
    ledger: UsageLedger
    limits: LimitStore
    describe: Callable[[], dict[str, str]]
    redis: Redis | None = None
    """The shared client, when Redis is configured (the answer cache uses it too)."""


async def build_gateway_state(settings: LaminaSettings, stack: AsyncExitStack) -> GatewayState:
    """In-process breakers and a SQLite usage ledger, or both in Redis when
    ``LAMINA_REDIS__URL`` is set, falling back to the embedded ones while Redis is down."""
    local_ledger = SqliteUsageLedger(settings.usage_path())
    await local_ledger.open()
    local_limits = InProcessLimitStore()
    if settings.redis.url is None:
        return GatewayState(
            InProcessBreakerStore(),
            local_ledger,
            local_limits,
            lambda: {
                "gateway_state": "in-process",
                "usage_ledger": "sqlite",
                **local_limits.describe(),
            },
        )
    # Imported here: only a shared deployment needs the Redis client.
    from inferencing.gateway.redis_state import (
        RedisBreakerStore,
        RedisUsageLedger,
        ResilientBreakerStore,
        ResilientUsageLedger,
        redis_client,
    )

    redis = redis_client(
        settings.redis.url,
        connect_timeout_s=settings.redis.connect_timeout_s,
        command_timeout_s=settings.redis.command_timeout_s,
    )
    stack.push_async_callback(redis.aclose)
    breakers = ResilientBreakerStore(
        RedisBreakerStore(redis),
        InProcessBreakerStore(),
        retry_after_s=settings.redis.retry_after_s,
    )
    ledger = ResilientUsageLedger(
        RedisUsageLedger(redis),
        local_ledger,
        retry_after_s=settings.redis.retry_after_s,
        fallback_name="sqlite",
    )
    limits = ResilientLimitStore(
        RedisLimitStore(redis), local_limits, retry_after_s=settings.redis.retry_after_s
    )
    return GatewayState(
        breakers,
        ledger,
        limits,
        lambda: {**breakers.describe(), **ledger.describe(), **limits.describe()},
        redis,
    )


def build_safety(settings: LaminaSettings, audit: AuditLog, stack: AsyncExitStack) -> SafetyPolicy:
    """The offline prompt shield, or Azure AI Content Safety (Prompt Shields and
    moderation) when an endpoint is configured, with the offline shield standing in
    while the service cannot answer."""
    offline = HeuristicPromptShield()
    if not settings.content_safety.enabled:
        return SafetyPolicy(shield=offline, settings=settings.safety, audit=audit)
    azure = AzureContentSafety(settings.content_safety)
    stack.push_async_callback(azure.aclose)
    return SafetyPolicy(
        shield=azure,
        fallback_shield=offline,
        moderator=azure,
        settings=settings.safety,
        audit=audit,
    )


def build_answer_cache(
    settings: LaminaSettings, retriever: Retriever, redis: Redis | None, stack: AsyncExitStack
) -> AnswerCache | None:
    """The answer cache, when enabled: in Redis when one is configured (``auto``) or
    asked for, else in-process; embeddings from a registry deployment or, by default,
    the offline hashing embedder."""
    config = settings.answer_cache
    if not config.enabled:
        return None
    store: AnswerCacheStore
    use_redis = config.backend == "redis" or (config.backend == "auto" and redis is not None)
    if use_redis:
        if redis is None:
            raise ValueError("LAMINA_ANSWER_CACHE__BACKEND=redis needs LAMINA_REDIS__URL to be set")
        # Imported here: only a shared deployment needs the Redis store.
        from intelligence.stores.redis_answer_cache import RedisAnswerCacheStore

        store = RedisAnswerCacheStore(
            redis, prefix=config.redis_prefix, retry_after_s=settings.redis.retry_after_s
        )
    else:
        store = InProcessAnswerCacheStore(max_scopes=config.max_scopes)
    embedder: EmbeddingModel
    if config.embedding_deployment is None:
        embedder = HashingEmbeddingModel(dimensions=config.hashing_dimensions)
    else:
        registry = {d.name: d for d in settings.inferencing.registry()}
        if config.embedding_deployment not in registry:
            raise ValueError(
                "LAMINA_ANSWER_CACHE__EMBEDDING_DEPLOYMENT names no deployment of the "
                f"registry: {config.embedding_deployment!r}"
            )
        embedder = build_embedding_model(
            registry[config.embedding_deployment], timeouts=settings.inferencing.timeouts
        )
        stack.push_async_callback(embedder.aclose)
    return AnswerCache(
        store=store,
        embedder=embedder,
        retriever=retriever,
        settings=config,
        model_version=_model_version(settings),
    )


def _model_version(settings: LaminaSettings) -> str:
    """Every deployment and the planner: any change to them starts a fresh answer cache."""
    deployments = sorted(
        f"{d.name}:{d.provider}:{d.model}:{d.model_version}"
        for d in settings.inferencing.registry()
    )
    return "|".join([*deployments, f"planner={settings.intelligence.planner}"])


async def open_conversation_store(
    settings: LaminaSettings, stack: AsyncExitStack
) -> ConversationStore:
    """SQLite in the data directory, or Azure Cosmos DB; either keeps each tenant's
    messages only as long as its retention period."""
    config = settings.conversations
    store: SqliteConversationStore | CosmosConversationStore
    if config.backend == "cosmos":
        # Imported here: only a Cosmos DB deployment needs the SDK (lamina[cosmos]).
        from intelligence.stores.cosmos import CosmosConversationStore

        store = CosmosConversationStore(config.cosmos, retention=config.retention())
    else:
        store = SqliteConversationStore(settings.conversations_path(), retention=config.retention())
    await store.open()
    stack.push_async_callback(store.close)
    return store


async def open_audit_log(settings: LaminaSettings, stack: AsyncExitStack) -> AuditLog:
    """The hash-chained audit log: SQLite (``<data_dir>/audit.db``) or Azure Cosmos DB.
    The server and the ``lamina`` commands that record or read events open it here."""
    config = settings.audit
    audit: SqliteAuditLog | CosmosAuditLog
    if config.backend == "cosmos":
        # Imported here: only a Cosmos DB deployment needs the SDK (lamina[cosmos]).
        from intelligence.stores.cosmos_audit import CosmosAuditLog

        audit = CosmosAuditLog(config.cosmos)
    else:
        audit = SqliteAuditLog(config.path or settings.data_dir / "audit.db")
    await audit.open()
    stack.push_async_callback(audit.close)
    return audit


async def build_jobs(
    settings: LaminaSettings, ingestor: Ingestor, assistant: Assistant, stack: AsyncExitStack
) -> tuple[JobStore, JobRunner, IngestJobs, AgentTasks]:
    """The job store, and the runner with its two kinds: ingestion of uploads (their
    ACL file checked by the knowledge layer's parser) and long agent tasks."""
    config = settings.jobs
    store = SqliteJobStore(
        config.path or settings.data_dir / "jobs.db",
        retention=settings.conversations.retention(),
    )
    await store.open()
    stack.push_async_callback(store.close)
    runner = JobRunner(
        store,
        concurrency=config.concurrency,
        lease_s=config.lease_s,
        poll_interval_s=config.poll_interval_s,
        max_attempts=config.max_attempts,
    )
    # Pushed after the store: at shutdown the runner gives its jobs back, then the store closes.
    stack.push_async_callback(runner.stop)
    ingest = IngestJobs(
        runner,
        ingestor,
        config.uploads_path or settings.data_dir / "uploads",
        lambda text: AccessRules.parse(text, source="ACL file").tenants,
    )
    return store, runner, ingest, AgentTasks(runner, assistant)


async def open_teams_conversations(
    settings: LaminaSettings, stack: AsyncExitStack
) -> TeamsConversationMap | None:
    """Which Lamina conversation each Teams conversation continues, when Teams is on.
    Plain SQLite (no Agents SDK import), and built here because it names users: it is
    one of the personal-data holders."""
    if not settings.teams.enabled:
        return None
    from client_api.teams.conversations import TeamsConversationMap

    conversations = TeamsConversationMap(settings.data_dir / "teams.db")
    await conversations.open()
    stack.push_async_callback(conversations.close)
    return conversations


def build_knowledge(
    settings: LaminaSettings,
    embedder: Embedder | None = None,
    stack: AsyncExitStack | None = None,
) -> tuple[KnowledgeIndex, Ingestor, Retriever]:
    """The index of ``LAMINA_KNOWLEDGE__BACKEND``, the pipeline that fills it and the
    retriever over it, all with ``embedder`` (``None``: text only). With ``stack``, what
    the pipeline holds open (the credential the PDF parser makes for Entra ID) is
    closed with it."""
    index: KnowledgeIndex
    if settings.knowledge.backend == "azure_search":
        if embedder is None:
            raise ValueError("the azure_search knowledge backend needs an embedding model")
        # Imported here: only deployments on Azure AI Search pay for its SDK.
        from knowledge.backends.azure_search import AzureSearchKnowledgeIndex

        index = AzureSearchKnowledgeIndex.from_settings(
            settings.knowledge.azure_search, embedder.identity
        )
    else:
        index = SqliteKnowledgeIndex(
            settings.knowledge_index_path(),
            fusion=HybridFusion(
                settings.knowledge.hybrid_fusion, settings.knowledge.hybrid_vector_share
            ),
        )
    retriever = SecurityTrimmedRetriever(
        index,
        embedder,
        default_mode=settings.knowledge.search_mode,
        capture_content=settings.telemetry.capture_content,
    )
    pdf_parser = build_pdf_parser(settings)
    if pdf_parser is not None and stack is not None:
        stack.push_async_callback(asyncio.to_thread, pdf_parser.close)
    pipeline = IngestionPipeline(
        index, settings.knowledge, embedder=embedder, pdf_parser=pdf_parser
    )
    return index, pipeline, retriever


def build_pdf_parser(settings: LaminaSettings) -> DocumentIntelligenceParser | None:
    """The PDF parser ``LAMINA_KNOWLEDGE__PDF_PARSER`` names; ``None``: the local one."""
    if settings.knowledge.pdf_parser != "document_intelligence":
        return None
    # Imported here: only deployments that parse with Document Intelligence pay for it
    # (the module itself defers the SDK to the first PDF).
    from knowledge.ingestion.document_intelligence import DocumentIntelligenceParser

    return DocumentIntelligenceParser.from_settings(settings.knowledge.document_intelligence)


async def open_knowledge(
    settings: LaminaSettings, stack: AsyncExitStack
) -> tuple[KnowledgeIndex, Ingestor, Retriever]:
    """:func:`build_knowledge` with the configured embedder, the index opened; both, and
    the PDF parser's credential, are closed with ``stack``. What ``lamina serve``,
    ``lamina ingest`` and ``lamina eval`` share, so the vectors a query is compared with
    were made by the same model."""
    embedder = await build_knowledge_embedder(settings, stack)
    index, ingestor, retriever = build_knowledge(settings, embedder, stack)
    await index.open()
    stack.push_async_callback(index.close)
    return index, ingestor, retriever


class AuditLogToolSink:
    """The tools layer's audit records, in the deployment's audit log."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def record(self, entry: ToolAuditRecord) -> None:
        await self._audit.append(
            AuditRecord(
                event=entry.event,
                tenant_id=entry.tenant_id,
                user_id=entry.user_id,
                correlation_id=correlation_id.get(),
                data={
                    "tool": entry.tool,
                    "outcome": entry.outcome,
                    "arguments": dict(entry.arguments),
                    "duration_ms": entry.duration_ms,
                    "approval_id": entry.approval_id,
                },
                at=entry.at or datetime.now(UTC),
            )
        )


async def build_tool_layer(
    settings: LaminaSettings, audit: AuditLog, redis: Redis | None, stack: AsyncExitStack
) -> BuiltTools:
    """Plugins, OpenAPI operations and MCP servers' tools, all behind the execution
    policy, and the approval gate for the high-risk ones. A configured source that
    cannot be loaded stops start-up with a message naming it."""
    sources: list[object] = []
    for source in settings.tools.openapi:
        # Imported here: only deployments with OpenAPI sources pay for the validator.
        from tools.openapi import load_openapi_tools

        loaded = await load_openapi_tools(source, settings.tools.http)
        stack.push_async_callback(loaded.aclose)
        sources.append(loaded)
    if settings.tools.mcp_servers:
        from tools.mcp_client import open_mcp_tools

        sources.extend(
            await open_mcp_tools(
                settings.tools.mcp_servers, stack, http_client_factory=_mcp_http_client(settings)
            )
        )
    store = await open_approval_store(
        settings.tools.approvals, data_dir=settings.data_dir, redis_client=redis, stack=stack
    )
    return build_tools(
        settings.tools,
        sources,
        audit=AuditLogToolSink(audit),
        approval_store=store,
        capture_content=settings.telemetry.capture_content,
    )


def _mcp_http_client(settings: LaminaSettings) -> Callable[[McpServerSettings], httpx.AsyncClient]:
    """MCP over HTTP through the guarded client: no private address unless the operator
    trusted that server's host. No total-time or size cap: an MCP reply may stream long;
    each call has its own timeout in the policy."""
    from tools.http import guarded_httpx_client

    def client(server: McpServerSettings) -> httpx.AsyncClient:
        host = httpx.URL(server.url or "").host
        return guarded_httpx_client(
            settings.tools.http,
            trusted_hosts=[host] if server.trusted_private_network else (),
            timeout=httpx.Timeout(30, read=300),
            cap_response_size=False,
        )

    return client


def _can_plan(chat_model: ChatModel) -> bool:
    return chat_model.capabilities.generative and chat_model.capabilities.tool_calls


def _model_plans_every_round(settings: LaminaSettings, chat_model: ChatModel) -> bool:
    choice = settings.intelligence.planner
    return choice == "model" or (choice == "auto" and _can_plan(chat_model))


def build_planner(
    settings: LaminaSettings, chat_model: ChatModel, toolset: Toolset, prompts: PromptLibrary
) -> Planner:
    choice = settings.intelligence.planner
    capable = _can_plan(chat_model)
    if choice == "deterministic" or (choice == "auto" and not capable):
        return DeterministicPlanner()
    if not capable:
        raise ValueError(
            f"LAMINA_INTELLIGENCE__PLANNER={choice} needs a model that can call tools "
            f"(provider {settings.inferencing.provider!r} cannot)"
        )
    if choice == "escalate":
        # Agents plan through the model planner; semantic-kernel loads on the first hand-over.
        from intelligence.agents import ActionAgent, ResearchAgent
        from intelligence.planning.escalation import EscalatingPlanner

        agents: dict[str, Planner] = {
            "research": ResearchAgent(chat_model, prompts),
            "action": ActionAgent(chat_model, toolset, prompts),
        }
        return EscalatingPlanner(
            DeterministicPlanner(),
            agents,
            toolset,
            agent=settings.intelligence.agent,
            min_score=settings.intelligence.escalation_min_score,
        )
    # Imported here: model planning loads semantic-kernel, which is slow to import.
    from intelligence.planning.model_planner import ModelPlanner

    planner_prompt = prompts.get(settings.intelligence.planner_prompt)

    def instructions(context: PlanningContext) -> str:
        from datetime import UTC, datetime

        return prompts.render(
            planner_prompt,
            tenant=context.principal.tenant_id,
            today=datetime.now(UTC).date().isoformat(),
        )

    return ModelPlanner(chat_model, toolset, instructions)


async def build_services(settings: LaminaSettings) -> Services:
    stack = AsyncExitStack()
    try:
        index, ingestor, retriever = await open_knowledge(settings, stack)

        conversations = await open_conversation_store(settings, stack)
        audit = await open_audit_log(settings, stack)

        state = await build_gateway_state(settings, stack)
        limiter = RateLimiter(state.limits, settings.limits)
        counter = default_counter()
        chat_model = build_gateway(
            settings.inferencing,
            breakers=state.breakers,
            ledger=state.ledger,
            counter=counter,
            budget=limiter if settings.limits.any_token_limits else None,
            capture_content=settings.telemetry.capture_content,
        )
        stack.push_async_callback(chat_model.aclose)
        await chat_model.warm_up()
        api_keys = await open_api_key_store(settings, stack, shared_redis=state.redis)
        tools = await build_tool_layer(settings, audit, state.redis, stack)
        toolset, approvals = tools.toolset, tools.approvals
        prompts = PromptLibrary(
            settings.intelligence.prompts_dir or PromptLibrary.bundled_directory()
        )
        safety = build_safety(settings, audit, stack)
        answer_cache = build_answer_cache(settings, retriever, state.redis, stack)
        planner = build_planner(settings, chat_model, toolset, prompts)
        memory = ConversationMemory(
            chat_model=chat_model,
            conversations=conversations,
            prompts=prompts,
            settings=settings.intelligence,
            counter=counter,
            # A model planning every round writes its own search queries from the history.
            model_rewrites=not _model_plans_every_round(settings, chat_model),
        )
        quality = QualityMonitor(window_s=settings.telemetry.drift_window_s)
        quality.expose()
        assistant = Orchestrator(
            retriever=retriever,
            toolset=toolset,
            chat_model=chat_model,
            planner=planner,
            memory=memory,
            conversations=conversations,
            audit=audit,
            prompts=prompts,
            safety=safety,
            answer_cache=answer_cache,
            approvals=approvals,
            turn_lease_s=settings.conversations.turn_lease_s,
            settings=settings.intelligence,
            top_k=settings.knowledge.top_k,
            max_output_tokens=settings.inferencing.max_output_tokens,
            temperature=settings.inferencing.temperature,
            quality=quality,
            capture_content=settings.telemetry.capture_content,
        )
        jobs, job_runner, ingest_jobs, agent_tasks = await build_jobs(
            settings, ingestor, assistant, stack
        )
        upkeep = Upkeep(conversations, jobs, interval_s=settings.conversations.sweep_interval_s)
        await upkeep.start()
        stack.push_async_callback(upkeep.stop)
        # Every store that keeps data about people: GET and DELETE /v1/me/data go through
        # each. A new such store must be appended here. The audit log is deliberately
        # absent: it is the append-only record of who asked what, erasures included.
        # Jobs first: a queued task erased first can no longer start a turn that would
        # write a conversation after the conversations were erased.
        holders: list[PersonalDataHolder] = [
            job_runner,
            ConversationData(conversations),
            UsageData(state.ledger, chat_model.meter),
        ]
        if answer_cache is not None:
            holders.append(AnswerCacheData(answer_cache))
        if approvals is not None:
            holders.append(ApprovalData(approvals))
        teams_conversations = await open_teams_conversations(settings, stack)
        if teams_conversations is not None:
            holders.append(teams_conversations)
        personal_data = PersonalData(holders, audit)
    except BaseException:
        await stack.aclose()
        raise
    return Services(
        settings,
        index,
        ingestor,
        retriever,
        toolset,
        chat_model,
        conversations,
        audit,
        assistant,
        state,
        limiter,
        RequestCaps(settings.caps, counter),
        api_keys,
        answer_cache,
        approvals,
        personal_data,
        stack,
        jobs=jobs,
        job_runner=job_runner,
        ingest_jobs=ingest_jobs,
        agent_tasks=agent_tasks,
        teams_conversations=teams_conversations,
    )
