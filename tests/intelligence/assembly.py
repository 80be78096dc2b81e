"""A real orchestrator assembled over in-memory fakes of the lower layers' contracts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from inferencing.contracts import ChatModel
from intelligence.contracts import AuditLog, ConversationStore, Planner
from intelligence.orchestrator import Orchestrator
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.settings import IntelligenceSettings
from knowledge.contracts import Chunk, Retriever
from tests.fakes import FakeToolset, InMemoryAuditLog, InMemoryRetriever
from tools.contracts import Toolset


def orchestrator_over_fakes(
    conversations: ConversationStore,
    chat_model: ChatModel,
    *,
    chunks: Iterable[Chunk] = (),
    retriever: Retriever | None = None,
    toolset: Toolset | None = None,
    planner: Planner | None = None,
    audit: AuditLog | None = None,
    prompts: PromptLibrary | None = None,
    settings: IntelligenceSettings | None = None,
    **options: Any,
) -> Orchestrator:
    """An orchestrator on ``conversations`` and ``chat_model``. What is not given is a
    fake or a default: an in-memory retriever over ``chunks``, no tools, the deterministic
    planner, a fresh in-memory audit log, the bundled prompts and default settings.
    ``options`` go to ``Orchestrator`` as they are (``turn_lease_s``, ``safety``, ...)."""
    return Orchestrator(
        retriever=retriever or InMemoryRetriever(list(chunks)),
        toolset=toolset or FakeToolset(),
        chat_model=chat_model,
        planner=planner or DeterministicPlanner(),
        conversations=conversations,
        audit=audit or InMemoryAuditLog(),
        prompts=prompts or PromptLibrary(PromptLibrary.bundled_directory()),
        settings=settings or IntelligenceSettings(),
        **options,
    )
