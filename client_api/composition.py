"""The composition root: the only module that imports concrete adapters.

It reads settings once and builds the object graph: index, retriever,
toolset, chat model, planner, stores and the orchestrator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from client_api.auth.api_keys import ApiKeyStore, open_api_key_store
from client_api.edge.caps import RequestCaps
from client_api.edge.limits import (
    InProcessLimitStore,
    LimitStore,
    RateLimiter,
    RedisLimitStore,
    ResilientLimitStore,
)
from client_api.settings import LaminaSettings
from inferencing.contracts import ChatModel
from inferencing.gateway import Gateway, build_gateway
from inferencing.gateway.breaker import BreakerStore, InProcessBreakerStore
from inferencing.gateway.metering import SqliteUsageLedger, UsageLedger
from inferencing.tokens import default_counter
from intelligence.contracts import Assistant, ConversationStore, Planner, PlanningContext
from intelligence.orchestrator import Orchestrator
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.stores.sqlite import SqliteAuditLog, SqliteConversationStore
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import Ingestor, KnowledgeIndex, Retriever
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from tools.contracts import Toolset
from tools.policy import build_toolset

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
    audit: SqliteAuditLog
    assistant: Assistant
    state: GatewayState
    limiter: RateLimiter
    caps: RequestCaps
    api_keys: ApiKeyStore
    _stack: AsyncExitStack

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
    )


def build_knowledge(settings: LaminaSettings) -> tuple[KnowledgeIndex, Ingestor, Retriever]:
    index = SqliteKnowledgeIndex(settings.knowledge_index_path())
    return index, IngestionPipeline(index, settings.knowledge), SecurityTrimmedRetriever(index)


def build_planner(
    settings: LaminaSettings, chat_model: ChatModel, toolset: Toolset, prompts: PromptLibrary
) -> Planner:
    choice = settings.intelligence.planner
    capable = chat_model.capabilities.generative and chat_model.capabilities.tool_calls
    if choice == "deterministic" or (choice == "auto" and not capable):
        return DeterministicPlanner()
    if not capable:
        raise ValueError(
            "LAMINA_INTELLIGENCE__PLANNER=model needs a model that can call tools "
            f"(provider {settings.inferencing.provider!r} cannot)"
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
        index, ingestor, retriever = build_knowledge(settings)
        await index.open()
        stack.push_async_callback(index.close)

        conversations = SqliteConversationStore(settings.conversations_path())
        await conversations.open()
        stack.push_async_callback(conversations.close)
        audit = SqliteAuditLog(settings.data_dir / "audit.db")
        await audit.open()
        stack.push_async_callback(audit.close)

        state = await build_gateway_state(settings, stack)
        limiter = RateLimiter(state.limits, settings.limits)
        counter = default_counter()
        chat_model = build_gateway(
            settings.inferencing,
            breakers=state.breakers,
            ledger=state.ledger,
            counter=counter,
            budget=limiter if settings.limits.any_token_limits else None,
        )
        stack.push_async_callback(chat_model.aclose)
        await chat_model.warm_up()
        api_keys = await open_api_key_store(settings, stack)
        toolset = build_toolset(settings.tools)
        prompts = PromptLibrary(
            settings.intelligence.prompts_dir or PromptLibrary.bundled_directory()
        )
        assistant = Orchestrator(
            retriever=retriever,
            toolset=toolset,
            chat_model=chat_model,
            planner=build_planner(settings, chat_model, toolset, prompts),
            conversations=conversations,
            audit=audit,
            prompts=prompts,
            settings=settings.intelligence,
            top_k=settings.knowledge.top_k,
            max_output_tokens=settings.inferencing.max_output_tokens,
            temperature=settings.inferencing.temperature,
        )
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
        stack,
    )
