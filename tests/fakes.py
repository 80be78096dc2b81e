"""In-memory fakes that satisfy the lower layers' contracts, for unit tests."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    InferenceCaller,
    InferenceError,
    ModelCapabilities,
    Role,
    Usage,
)
from intelligence.audit_chain import GENESIS, event_bounds, link, verify_entries
from intelligence.contracts import (
    AuditEntry,
    AuditPage,
    AuditQuery,
    AuditRecord,
    ChainVerification,
    Plan,
    PlanningContext,
    StepKind,
)
from knowledge.contracts import (
    AccessControl,
    AccessFilter,
    Chunk,
    KnowledgeCaller,
    RetrievalQuery,
    RetrievalResult,
    RetrievedPassage,
)
from tools.contracts import (
    ToolCaller,
    ToolPermissionDenied,
    ToolResult,
    ToolSpec,
    UnknownTool,
)

_WORD = re.compile(r"\w+")


def chunk(
    chunk_id: str,
    text: str,
    *,
    tenant: str = "contoso",
    groups: frozenset[str] = frozenset(),
    users: frozenset[str] = frozenset(),
    public: bool = False,
    title: str | None = None,
) -> Chunk:
    return Chunk(
        chunk_id=chunk_id,
        document_id=f"doc-{chunk_id}",
        source=f"{chunk_id}.md",
        title=title or chunk_id,
        text=text,
        ordinal=0,
        access=AccessControl(tenant, public=public, users=users, groups=groups),
    )


@dataclass
class InMemoryRetriever:
    """Term-overlap ranking with the ACL applied before ranking, as the contract demands."""

    chunks: list[Chunk]
    queries: list[tuple[str, KnowledgeCaller]] = field(default_factory=list)

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult:
        self.queries.append((query.text, caller))
        access = AccessFilter.for_caller(caller)
        terms = {w.lower() for w in _WORD.findall(query.text)}

        def score(c: Chunk) -> int:
            return len(terms & {w.lower() for w in _WORD.findall(c.text)})

        matching = [c for c in self.chunks if score(c) > 0]
        allowed = [c for c in matching if access.allows(c.access)]
        ranked = sorted(allowed, key=score, reverse=True)[: query.top_k]
        return RetrievalResult(
            passages=tuple(RetrievedPassage(c, float(score(c))) for c in ranked),
            index="in-memory",
            trimmed_count=len(matching) - len(allowed),
        )

    async def get_chunk(self, chunk_id: str, caller: KnowledgeCaller) -> Chunk | None:
        access = AccessFilter.for_caller(caller)
        return next(
            (c for c in self.chunks if c.chunk_id == chunk_id and access.allows(c.access)), None
        )


Reply = ChatResponse | InferenceError | Callable[[ChatRequest], ChatResponse]


@dataclass
class ScriptedChatModel:
    """Returns scripted replies in order and records every request (a FunctionModel)."""

    replies: list[Reply] = field(default_factory=list)
    tool_calls: bool = True
    requests: list[ChatRequest] = field(default_factory=list)
    fail_after_chunks: InferenceError | None = None
    name: str = "scripted"
    context_window: int | None = None
    json_schema: bool = False

    @property
    def capabilities(self) -> ModelCapabilities:
        return ModelCapabilities(
            streaming=True,
            tool_calls=self.tool_calls,
            json_schema=self.json_schema,
            context_window=self.context_window,
        )

    def _next(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else _text("I cannot tell.")
        if isinstance(reply, InferenceError):
            raise reply
        return reply(request) if callable(reply) else reply

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        return self._next(request)

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        response = self._next(request)
        words = (response.message.content or "").split(" ")
        for i, word in enumerate(words):
            if self.fail_after_chunks is not None and i == 2:
                raise self.fail_after_chunks
            yield ChatDelta(content=word if i == 0 else " " + word)
        if response.message.tool_calls:
            yield ChatDelta(tool_calls=response.message.tool_calls)
        yield ChatDelta(finish_reason=response.finish_reason, usage=response.usage)

    async def aclose(self) -> None:
        pass


def _text(content: str) -> ChatResponse:
    return ChatResponse(
        ChatMessage(Role.ASSISTANT, content), "stop", "scripted", Usage(10, len(content.split()))
    )


def text_reply(content: str) -> ChatResponse:
    return _text(content)


@dataclass
class FakeTool:
    spec: ToolSpec
    run: Callable[[Mapping[str, Any]], Any]


@dataclass
class FakeToolset:
    """A toolset that checks roles like the real policy and records calls."""

    tools: list[FakeTool] = field(default_factory=list)
    calls: list[tuple[str, Mapping[str, Any], ToolCaller]] = field(default_factory=list)

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return [t.spec for t in self.tools if _permitted(t.spec, caller)]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        tool = next((t for t in self.tools if t.spec.name == name), None)
        if tool is None:
            raise UnknownTool(name, "No such tool.")
        if not _permitted(tool.spec, caller):
            raise ToolPermissionDenied(name, "You may not use this tool.")
        self.calls.append((name, arguments, caller))
        return ToolResult(name, tool.run(arguments))


def _permitted(spec: ToolSpec, caller: ToolCaller) -> bool:
    return not spec.required_roles or bool(spec.required_roles & caller.roles)


@dataclass
class InMemoryAuditLog:
    """An :class:`~intelligence.contracts.AuditLog` in memory, chained as the adapters
    chain (:mod:`intelligence.audit_chain`); it passes the audit contract suite.
    ``records`` keeps each record exactly as it was appended, for assertions."""

    records: list[AuditRecord] = field(default_factory=list)
    chains: dict[str, list[AuditEntry]] = field(default_factory=dict)

    async def append(self, record: AuditRecord) -> AuditEntry:
        chain = self.chains.setdefault(record.tenant_id, [])
        entry = link(record, len(chain) + 1, chain[-1].hash if chain else GENESIS)
        chain.append(entry)
        self.records.append(record)
        return entry

    async def query(self, query: AuditQuery) -> AuditPage:
        found = [e for e in self.chains.get(query.tenant_id, []) if _audit_matches(query, e)]
        limit = max(1, query.limit)
        entries = tuple(found[:limit])
        return AuditPage(entries, entries[-1].seq if len(found) > limit else None)

    async def verify(self, tenant_id: str) -> ChainVerification:
        return verify_entries(tenant_id, self.chains.get(tenant_id, []))

    async def tenants(self) -> list[str]:
        return sorted(tenant for tenant, chain in self.chains.items() if chain)


def _audit_matches(query: AuditQuery, entry: AuditEntry) -> bool:
    record = entry.record
    bounds = event_bounds(query.event) if query.event is not None else None
    if bounds is not None and not bounds[0] <= record.event < bounds[1]:
        return False
    if bounds is None and query.event not in (None, record.event):
        return False
    return (
        entry.seq > query.after_seq
        and query.user_id in (None, record.user_id)
        and query.correlation_id in (None, record.correlation_id)
        and (query.since is None or record.at >= query.since)
        and (query.until is None or record.at < query.until)
    )


class FixedPlanner:
    """Plans ``plan`` for a turn's first round; asked again with the results of model-planned
    calls, plans only its answer step, as a model does once it has what it needs."""

    def __init__(self, plan: Plan) -> None:
        self.plan_to_return = plan
        self.contexts: list[PlanningContext] = []

    async def plan(self, context: PlanningContext) -> Plan:
        self.contexts.append(context)
        if not context.rounds:
            return self.plan_to_return
        answer = tuple(s for s in self.plan_to_return.steps if s.kind is StepKind.ANSWER)
        return Plan(steps=answer, planner=self.plan_to_return.planner)
