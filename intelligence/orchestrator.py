"""The orchestrator: plan a turn, execute its steps with the caller's identity, answer.

It sees only the lower layers' contracts: a security-trimmed ``Retriever``, a
policy-wrapped ``Toolset`` and a ``ChatModel``. The user's message is durable
before anything streams; the answer is persisted when the stream ends, as
complete, interrupted or failed, and never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatModel,
    ChatRequest,
    GroundingDocument,
    InferenceError,
    Role,
    RouteInfo,
    TokenQuotaExceeded,
    TokenRateLimited,
    ToolCall,
    Usage,
)
from intelligence.answer_cache import AnswerCache, CacheHit, CacheLookup, answer_variant
from intelligence.contracts import (
    AnswerDelta,
    AnswerFailed,
    ApprovalDecisionRequest,
    ApprovalsUnavailable,
    AuditLog,
    AuditRecord,
    CacheOutcome,
    Citation,
    CitationsEvent,
    ConversationMessage,
    ConversationNotFound,
    ConversationStore,
    DoneEvent,
    ErrorEvent,
    InputRejected,
    MessageStatus,
    Plan,
    PlanEvent,
    Planner,
    PlanStep,
    Principal,
    ResumedTurn,
    StartedTurn,
    StepEvent,
    StepKind,
    StepOutcome,
    StepStatus,
    TurnEvent,
    TurnRequest,
    TurnResult,
)
from intelligence.prompts import Prompt, PromptLibrary
from intelligence.safety import AnswerStopped, SafetyPolicy, TurnScope
from intelligence.settings import IntelligenceSettings
from knowledge.contracts import KnowledgeError, RetrievalQuery, RetrievedPassage, Retriever
from tools.contracts import (
    InvalidToolArguments,
    ToolApprovalRequired,
    ToolError,
    ToolPermissionDenied,
    Toolset,
    UnknownTool,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_CITATION = re.compile(r"\[(\d{1,3})\]")
_SNIPPET_CHARS = 280


@dataclass(frozen=True, slots=True)
class _PlanningContext:
    question: str
    history: Sequence[ConversationMessage]
    principal: Principal


@dataclass
class _Execution:
    """What the steps produced, gathered for the answer."""

    passages: list[RetrievedPassage] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ChatMessage] = field(default_factory=list)
    outcomes: list[StepOutcome] = field(default_factory=list)
    trimmed: int = 0
    indexes: set[str] = field(default_factory=set)


@dataclass
class _Turn:
    """One turn's state, from the stored user message to the stored reply."""

    conversation_id: str
    reply_id: str
    question: str
    history: Sequence[ConversationMessage]
    principal: Principal
    correlation_id: str | None
    answer: list[str] = field(default_factory=list)
    plan: Plan | None = None
    citations: tuple[Citation, ...] = ()
    execution: _Execution = field(default_factory=_Execution)
    status: MessageStatus = MessageStatus.FAILED
    error: ErrorEvent | None = None
    stored: bool = False
    route: RouteInfo | None = None
    cache: CacheOutcome | None = None

    def fail(self, error: ErrorEvent) -> None:
        self.error = error
        self.status = MessageStatus.INTERRUPTED if self.answer else MessageStatus.FAILED


@asynccontextmanager
async def _closing(stream: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Close an inner stream when we stop early, so a provider connection or running
    steps end with the turn rather than at garbage collection."""
    try:
        yield stream
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


class Orchestrator:
    """Implements :class:`intelligence.contracts.Assistant`."""

    def __init__(
        self,
        *,
        retriever: Retriever,
        toolset: Toolset,
        chat_model: ChatModel,
        planner: Planner,
        conversations: ConversationStore,
        audit: AuditLog,
        prompts: PromptLibrary,
        settings: IntelligenceSettings,
        top_k: int = 5,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        assistant_name: str = "Lamina",
        safety: SafetyPolicy | None = None,
        answer_cache: AnswerCache | None = None,
    ) -> None:
        self._retriever = retriever
        self._toolset = toolset
        self._model = chat_model
        self._planner = planner
        self._conversations = conversations
        self._audit = audit
        self._prompts = prompts
        self._settings = settings
        self._top_k = top_k
        self._max_output_tokens = max_output_tokens
        self._temperature = temperature
        self._assistant_name = assistant_name
        self._safety = safety
        self._answer_prompt: Prompt = prompts.get(settings.answer_prompt)
        self._answer_cache = answer_cache
        # Everything besides model, sources and question that shapes an answer: a change
        # to any of it (even a prompt edited without a new version) must not replay old ones.
        self._answer_variant = answer_variant(
            self._answer_prompt.id,
            self._answer_prompt.template,
            {
                "top_k": top_k,
                "max_output_tokens": max_output_tokens,
                "temperature": temperature,
                "assistant_name": assistant_name,
            },
        )

    # --- public API ----------------------------------------------------------

    async def start_turn(self, request: TurnRequest, principal: Principal) -> StartedTurn:
        question = request.message.strip()
        if not question:
            raise InputRejected("The message is empty.")
        if len(question) > self._settings.max_message_chars:
            raise InputRejected(
                f"The message is {len(question)} characters long; "
                f"the limit is {self._settings.max_message_chars}."
            )
        if self._safety is not None:
            # Before anything is stored: a refused message leaves nothing but its audit record.
            await self._safety.check_input(
                question, TurnScope(principal, request.correlation_id, request.conversation_id)
            )
        if request.conversation_id is None:
            conversation = await self._conversations.create(principal, _title_from(question))
        else:
            found = await self._conversations.get(principal, request.conversation_id)
            if found is None:
                raise ConversationNotFound("No such conversation.")
            conversation = found
        history = await self._conversations.messages(
            principal, conversation.id, last=self._settings.history_turns
        )
        try:
            user_message = await self._conversations.add_message(
                principal, conversation.id, "user", question
            )
            # The reply's row exists before anything streams, so every outcome of the
            # turn (complete, interrupted, failed) has a place to be recorded.
            reply = await self._conversations.add_message(
                principal, conversation.id, "assistant", "", status=MessageStatus.STREAMING
            )
        except LookupError:  # deleted between the check above and the insert
            raise ConversationNotFound("No such conversation.") from None
        turn = _Turn(
            conversation.id, reply.id, question, history, principal, request.correlation_id
        )
        return StartedTurn(conversation.id, user_message.id, self._run(turn))

    async def run_turn(self, request: TurnRequest, principal: Principal) -> TurnResult:
        started = await self.start_turn(request, principal)
        parts: list[str] = []
        plan: Plan | None = None
        citations: tuple[Citation, ...] = ()
        outcomes: list[StepOutcome] = []
        async with aclosing(started.events) as events:
            async for event in events:
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

    async def decide(self, request: ApprovalDecisionRequest, principal: Principal) -> ResumedTurn:
        raise ApprovalsUnavailable("High-risk tools need an approval gate; none is configured.")

    # --- the turn --------------------------------------------------------------

    async def _run(self, turn: _Turn) -> AsyncGenerator[TurnEvent, None]:
        principal, execution = turn.principal, turn.execution
        try:
            # Before planning: a hit saves the planner's and the model's calls.
            lookup = await self._look_up_answer(turn)
            if lookup is not None and lookup.hit is not None:
                async with _closing(self._replay(turn, lookup.hit)) as replayed:
                    async for event in replayed:
                        yield event
                return
            turn.plan = await self._planner.plan(
                _PlanningContext(turn.question, turn.history, principal)
            )
            yield PlanEvent(turn.plan)
            async with _closing(self._execute(turn.plan, principal, execution)) as step_events:
                async for event in step_events:
                    yield event
            sources = _number_sources(execution.passages)
            model_sources = sources
            scope = TurnScope(principal, turn.correlation_id, turn.conversation_id, turn.reply_id)
            if self._safety is not None:
                # Passages and tool outputs may carry instructions planted for the model.
                screened = await self._safety.screen_context(
                    sources, execution.tool_results, execution.tool_calls, scope
                )
                sources, model_sources = screened.citable, screened.sources
                execution.tool_results = screened.tool_results
            answer_step = next(s for s in turn.plan.steps if s.kind is StepKind.ANSWER)
            yield StepEvent(answer_step)
            usage: Usage | None = None
            request = self._answer_request(turn, model_sources)
            guard = self._safety.answer_guard(scope) if self._safety is not None else None
            async with _closing(self._model.stream(request, principal)) as deltas:
                async for delta in deltas:
                    if delta.content:
                        # The guard redacts PII and holds text back until it is safe to send.
                        for text in await guard.feed(delta.content) if guard else [delta.content]:
                            turn.answer.append(text)
                            yield AnswerDelta(text)
                    usage = _last_usage(delta, usage)
                    turn.route = delta.route or turn.route
            for text in await guard.finish() if guard else []:
                turn.answer.append(text)
                yield AnswerDelta(text)
            turn.citations = _cited("".join(turn.answer), sources)
            outcome = StepOutcome(
                answer_step.id, StepStatus.OK, f"{len(turn.citations)} citation(s)"
            )
            execution.outcomes.append(outcome)
            turn.status = MessageStatus.COMPLETE
            # "done" promises a stored answer: store it first, whatever happens to us meanwhile.
            await asyncio.shield(self._store(turn))
            yield StepEvent(answer_step, outcome)
            yield CitationsEvent(turn.citations)
            await self._remember_answer(turn, lookup)
            yield DoneEvent(turn.conversation_id, turn.reply_id, usage, turn.route, turn.cache)
            return
        except AnswerStopped as exc:
            turn.fail(exc.event)
        except TokenRateLimited as exc:
            turn.fail(ErrorEvent("rate_limited", exc.message, exc.retryable))
        except TokenQuotaExceeded as exc:
            turn.fail(ErrorEvent("quota_exceeded", exc.message, False))
        except InferenceError as exc:
            log.warning("model call failed: %s", exc, extra={"details": exc.details})
            turn.fail(ErrorEvent("model_unavailable", exc.message, exc.retryable))
        except KnowledgeError as exc:
            log.warning("retrieval failed: %s", exc)
            turn.fail(ErrorEvent("retrieval_failed", "The documents could not be searched.", True))
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: keep what was said, marked interrupted.
            if not turn.stored:
                turn.status = MessageStatus.INTERRUPTED
            raise
        except Exception:
            log.exception("turn failed")
            turn.fail(ErrorEvent("internal_error", "The answer could not be completed.", True))
        finally:
            if not turn.stored:
                try:
                    await asyncio.shield(self._store(turn))
                except Exception:
                    log.exception("could not store the outcome of turn %s", turn.reply_id)
        if turn.error is not None:
            yield turn.error

    async def _store(self, turn: _Turn) -> None:
        await self._conversations.finish_message(
            turn.principal,
            turn.reply_id,
            "".join(turn.answer),
            turn.status,
            citations=turn.citations,
            plan=turn.plan,
        )
        turn.stored = True
        try:
            await self._audit.append(self._audit_record(turn))
        except Exception:
            # The answer is stored; a failing audit sink must not turn it into an error.
            log.exception("could not append the audit record of turn %s", turn.reply_id)

    def _audit_record(self, turn: _Turn) -> AuditRecord:
        execution = turn.execution
        return AuditRecord(
            event="chat.turn",
            tenant_id=turn.principal.tenant_id,
            user_id=turn.principal.user_id,
            correlation_id=turn.correlation_id,
            at=datetime.now(UTC),
            data={
                "conversation_id": turn.conversation_id,
                "message_id": turn.reply_id,
                "question": turn.question,
                "status": turn.status.value,
                "error": turn.error.code if turn.error else None,
                "plan": _plan_summary(turn.plan),
                "steps": [
                    {"step": o.step_id, "status": o.status.value, "summary": o.summary}
                    for o in execution.outcomes
                ],
                "sources": sorted({p.chunk.chunk_id for p in execution.passages}),
                "cited": [c.chunk_id for c in turn.citations],
                "trimmed_candidates": execution.trimmed,
                "indexes": sorted(execution.indexes),
                "prompt": self._answer_prompt.id,
                "model": self._model.name,
                "route": _route_summary(turn.route),
                "cache": _cache_summary(turn.cache),
            },
        )

    # --- the answer cache ------------------------------------------------------

    async def _look_up_answer(self, turn: _Turn) -> CacheLookup | None:
        if self._answer_cache is None:
            return None
        lookup = await self._answer_cache.lookup(
            question=turn.question,
            history=turn.history,
            principal=turn.principal,
            prompt_version=self._answer_variant,
        )
        turn.cache = lookup.outcome
        return lookup

    async def _replay(self, turn: _Turn, hit: CacheHit) -> AsyncIterator[TurnEvent]:
        """A cached answer, as the same events and records as an answer from the model."""
        step = PlanStep(
            id="s1",
            kind=StepKind.ANSWER,
            description="Reuse the answer given to the same question",
        )
        turn.plan = Plan(
            steps=(step,),
            planner="cache",
            rationale=f"cosine similarity {hit.similarity:.4f} to a cached question",
        )
        # The sources were fetched again with the caller's identity: audit them as read.
        turn.execution.passages.extend(RetrievedPassage(chunk, 0.0) for chunk in hit.chunks)
        yield PlanEvent(turn.plan)
        yield StepEvent(step)
        # The output check runs on every answer sent, cached or not: its rules may have
        # changed since the answer was stored.
        scope = TurnScope(turn.principal, turn.correlation_id, turn.conversation_id, turn.reply_id)
        guard = self._safety.answer_guard(scope) if self._safety is not None else None
        texts = [*await guard.feed(hit.answer), *await guard.finish()] if guard else [hit.answer]
        for text in texts:
            turn.answer.append(text)
            yield AnswerDelta(text)
        turn.citations = hit.citations
        outcome = StepOutcome(step.id, StepStatus.OK, f"{len(hit.citations)} citation(s), cached")
        turn.execution.outcomes.append(outcome)
        turn.status = MessageStatus.COMPLETE
        await asyncio.shield(self._store(turn))
        yield StepEvent(step, outcome)
        yield CitationsEvent(turn.citations)
        yield DoneEvent(turn.conversation_id, turn.reply_id, cache=turn.cache)

    async def _remember_answer(self, turn: _Turn, lookup: CacheLookup | None) -> None:
        if self._answer_cache is None or lookup is None or turn.plan is None:
            return
        turn.cache = await self._answer_cache.remember(
            lookup,
            answer="".join(turn.answer),
            citations=turn.citations,
            plan=turn.plan,
            sources=[p.chunk for p in turn.execution.passages],
            plan_summary=_plan_summary(turn.plan),
            principal=turn.principal,
        )

    # --- steps -----------------------------------------------------------------

    async def _execute(
        self, plan: Plan, principal: Principal, execution: _Execution
    ) -> AsyncIterator[TurnEvent]:
        """Run every retrieve and tool step. They do not depend on one another, so
        they run concurrently; events report each as it starts and ends."""
        steps = [s for s in plan.steps if s.kind is not StepKind.ANSWER]
        for step in steps:
            yield StepEvent(step)
        tasks = [asyncio.create_task(self._run_step(s, principal, execution)) for s in steps]
        try:
            for finished in asyncio.as_completed(tasks):
                step, outcome = await finished
                execution.outcomes.append(outcome)
                yield StepEvent(step, outcome)
        finally:
            for task in tasks:
                task.cancel()
            # Wait for cancelled steps to unwind, so none outlives the turn unobserved.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_step(
        self, step: PlanStep, principal: Principal, execution: _Execution
    ) -> tuple[PlanStep, StepOutcome]:
        if step.kind is StepKind.RETRIEVE:
            result = await self._retriever.retrieve(
                RetrievalQuery(step.query or "", top_k=self._top_k), principal
            )
            execution.passages.extend(result.passages)
            execution.trimmed += result.trimmed_count
            execution.indexes.add(result.index)
            if step.tool_call_id:
                titles = ", ".join(sorted({p.chunk.title for p in result.passages})) or "none"
                self._record_call(step, execution, f"Found passages from: {titles}.")
            return step, StepOutcome(
                step.id, StepStatus.OK, f"{len(result.passages)} passage(s) found"
            )
        return step, await self._call_tool(step, principal, execution)

    async def _call_tool(
        self, step: PlanStep, principal: Principal, execution: _Execution
    ) -> StepOutcome:
        name = step.tool or ""
        try:
            result = await self._toolset.call(name, step.arguments or {}, principal)
        except ToolApprovalRequired as exc:
            outcome = StepOutcome(step.id, StepStatus.NEEDS_APPROVAL, exc.message)
        except (ToolPermissionDenied, UnknownTool) as exc:
            outcome = StepOutcome(step.id, StepStatus.REFUSED, exc.message)
        except InvalidToolArguments as exc:
            detail = "; ".join(exc.errors) or exc.message
            outcome = StepOutcome(step.id, StepStatus.FAILED, f"Invalid arguments: {detail}")
        except ToolError as exc:
            outcome = StepOutcome(step.id, StepStatus.FAILED, exc.message)
        else:
            self._record_call(step, execution, json.dumps(result.output, default=str))
            return StepOutcome(step.id, StepStatus.OK, f"{name} returned a result")
        self._record_call(step, execution, f"Error ({outcome.status.value}): {outcome.summary}")
        return outcome

    @staticmethod
    def _record_call(step: PlanStep, execution: _Execution, content: str) -> None:
        """Echo a model-planned call and its result back to the model, as a tool round trip."""
        if not step.tool_call_id:
            return
        name = step.tool or "search_knowledge"
        arguments = step.arguments if step.kind is StepKind.CALL_TOOL else {"query": step.query}
        execution.tool_calls.append(ToolCall(step.tool_call_id, name, json.dumps(arguments)))
        execution.tool_results.append(
            ChatMessage(Role.TOOL, content=content, tool_call_id=step.tool_call_id)
        )

    # --- the answer --------------------------------------------------------------

    def _answer_request(
        self, turn: _Turn, sources: Sequence[tuple[int, RetrievedPassage]]
    ) -> ChatRequest:
        execution = turn.execution
        system = self._prompts.render(
            self._answer_prompt,
            assistant_name=self._assistant_name,
            tenant=turn.principal.tenant_id,
            today=datetime.now(UTC).date().isoformat(),
            sources=[
                {
                    "ref": ref,
                    "title": p.chunk.title,
                    "section": p.chunk.section,
                    "page": p.chunk.page,
                    "text": p.chunk.text,
                }
                for ref, p in sources
            ],
        )
        messages = [ChatMessage(Role.SYSTEM, system)]
        messages += [
            ChatMessage(Role(m.role), m.content)
            for m in turn.history
            if m.content and m.status is MessageStatus.COMPLETE
        ]
        messages.append(ChatMessage(Role.USER, turn.question))
        if execution.tool_calls:
            messages.append(ChatMessage(Role.ASSISTANT, tool_calls=tuple(execution.tool_calls)))
            messages += execution.tool_results
        documents = [GroundingDocument(ref, p.chunk.title, p.chunk.text) for ref, p in sources]
        return ChatRequest(
            messages=messages,
            documents=documents,
            max_tokens=self._max_output_tokens,
            temperature=self._temperature,
            prompt_version=self._answer_prompt.id,
        )


def _title_from(question: str) -> str:
    line = " ".join(question.split())
    return line if len(line) <= 60 else line[:57].rstrip() + "..."


def _number_sources(passages: Sequence[RetrievedPassage]) -> list[tuple[int, RetrievedPassage]]:
    """Deduplicate by chunk, best first, numbered from 1 for ``[n]`` citations."""
    best: dict[str, RetrievedPassage] = {}
    for p in passages:
        seen = best.get(p.chunk.chunk_id)
        if seen is None or p.score > seen.score:
            best[p.chunk.chunk_id] = p
    ranked = sorted(best.values(), key=lambda p: p.score, reverse=True)
    return list(enumerate(ranked, start=1))


def _cited(text: str, sources: Sequence[tuple[int, RetrievedPassage]]) -> tuple[Citation, ...]:
    by_ref = dict(sources)
    refs = sorted({int(m) for m in _CITATION.findall(text)} & by_ref.keys())
    return tuple(_citation(ref, by_ref[ref]) for ref in refs)


def _citation(ref: int, passage: RetrievedPassage) -> Citation:
    chunk = passage.chunk
    snippet = " ".join(chunk.text.split())
    if len(snippet) > _SNIPPET_CHARS:
        snippet = snippet[: _SNIPPET_CHARS - 3].rstrip() + "..."
    return Citation(
        ref=ref,
        chunk_id=chunk.chunk_id,
        document_id=chunk.document_id,
        source=chunk.source,
        title=chunk.title,
        snippet=snippet,
        page=chunk.page,
        section=chunk.section,
    )


def _last_usage(delta: ChatDelta, previous: Usage | None) -> Usage | None:
    return delta.usage if delta.usage is not None else previous


def _plan_summary(plan: Plan | None) -> dict[str, object] | None:
    if plan is None:
        return None
    return {
        "planner": plan.planner,
        "steps": [
            {"id": s.id, "kind": s.kind.value, "query": s.query, "tool": s.tool} for s in plan.steps
        ],
    }


def _route_summary(route: RouteInfo | None) -> dict[str, object] | None:
    if route is None:
        return None
    return {
        "deployment": route.deployment,
        "model_version": route.model_version,
        "attempts": [list(attempt) for attempt in route.attempts],
    }


def _cache_summary(outcome: CacheOutcome | None) -> dict[str, object] | None:
    if outcome is None:
        return None
    return {"status": outcome.status, "similarity": outcome.similarity, "reason": outcome.reason}
