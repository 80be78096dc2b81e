"""The orchestrator: plan a turn, execute its steps with the caller's identity, answer.

It sees only the lower layers' contracts: a security-trimmed ``Retriever``, a
policy-wrapped ``Toolset`` and a ``ChatModel``. The user's message is durable
before anything streams; the answer is persisted when the stream ends, as
complete, interrupted or failed, and never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from inferencing.contracts import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    GroundingDocument,
    InferenceError,
    Role,
    RouteInfo,
    TokenQuotaExceeded,
    TokenRateLimited,
    Usage,
)
from intelligence.answer_cache import AnswerCache, CacheHit, CacheLookup, answer_variant
from intelligence.contracts import (
    AnswerDelta,
    AnswerFailed,
    AnswerRating,
    ApprovalDecisionRequest,
    ApprovalRequiredEvent,
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
    IdempotencyKeyReused,
    InputRejected,
    MessageStatus,
    ModelCallRecord,
    NewTurn,
    Plan,
    PlanEvent,
    Planner,
    PlanStep,
    PolicyDecision,
    Principal,
    ReplayedTurn,
    ReplayUnavailable,
    ResumedTurn,
    StartedTurn,
    StepEvent,
    StepKind,
    StepOutcome,
    StepResult,
    StepStatus,
    TurnEvent,
    TurnExplanation,
    TurnFeedback,
    TurnInProgress,
    TurnRecord,
    TurnRequest,
    TurnResult,
    UnsafeInput,
    collect_turn,
)
from intelligence.explanations import ModelCallTimer, TurnRecorder, TurnRun
from intelligence.idempotency import RunningTurns, request_hash, stored_answer
from intelligence.memory import ConversationMemory
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import Prompt, PromptError, PromptLibrary
from intelligence.quality import QualityMonitor, TurnOutcome, turn_outcome
from intelligence.safety import AnswerGuard, AnswerStopped, SafetyPolicy, TurnScope
from intelligence.settings import IntelligenceSettings
from intelligence.turn_state import (
    BudgetExceeded,
    Suspension,
    Turn,
    TurnBudget,
    TurnSuperseded,
    read_suspension,
    suspend,
    tool_messages,
)
from knowledge.contracts import KnowledgeError, RetrievalQuery, RetrievedPassage, Retriever
from tools.contracts import (
    ApprovalConflict,
    ApprovalGate,
    ApprovalRequest,
    ApprovalStatus,
    InvalidToolArguments,
    RiskLevel,
    ToolApprovalRequired,
    ToolError,
    ToolPermissionDenied,
    Toolset,
    UnknownTool,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_CITATION = re.compile(r"\[(\d{1,3})\]")
_GROUNDED = DeterministicPlanner()
"""Plans a turn without tools (:attr:`TurnRequest.tools` false): search, then answer."""
_SNIPPET_CHARS = 280
_ANSWER_ATTEMPTS = 2
"""Answer calls per turn while the model's replies carry no text at all."""
_EMPTY_ANSWER = "The model returned no answer. Please try again."


@dataclass(frozen=True, slots=True)
class _PlanningContext:
    question: str
    history: Sequence[ConversationMessage]
    principal: Principal
    rounds: Sequence[Sequence[StepResult]] = ()
    passages: Sequence[RetrievedPassage] = ()
    search_query: str = ""


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


async def _in_own_context(events: AsyncGenerator[_T, None]) -> AsyncGenerator[_T, None]:
    """``events``, each step of it run as a task in one copy of the consumer's context.

    A turn's run keeps its spans current across its yields (so that searches, tool calls
    and model calls nest under the step that makes them). In the consumer's own context
    that would leak: a span left current while the consumer handles an event would adopt
    the consumer's work, and unwinding it out of order breaks the consumer's context. In
    a context of its own, the run's spans open and close in the order its code nests."""
    context = contextvars.copy_context()

    async def step() -> _T:
        return await anext(events)

    async def close() -> None:
        await events.aclose()

    try:
        while True:
            try:
                event = await asyncio.create_task(step(), context=context)
            except StopAsyncIteration:
                return
            yield event
    finally:
        await asyncio.create_task(close(), context=context)


class Orchestrator:
    """Implements :class:`intelligence.contracts.Assistant`.

    A turn runs in rounds: plan, run the round's searches and tool calls concurrently,
    and, when the model planned them, show it the results and plan again, until it is
    ready to answer or the turn's budget (rounds, steps, tool calls, time) runs out.
    A high-risk tool call pauses the turn: the approval gate stores the pending call
    with everything needed to continue, and :meth:`decide` resumes it.
    """

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
        approvals: ApprovalGate | None = None,
        turn_lease_s: float = 30.0,
        memory: ConversationMemory | None = None,
        quality: QualityMonitor | None = None,
        capture_content: bool = False,
    ) -> None:
        """``quality`` is fed every finished turn and rating (drift metrics);
        ``capture_content`` lets the question into the turn's span (never by default)."""
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
        self._approvals = approvals
        self._turn_lease_s = turn_lease_s
        self._memory = memory
        self._quality = quality
        self._capture_content = capture_content
        self._running = RunningTurns()
        self._answer_prompt: Prompt = prompts.get(settings.answer_prompt)
        try:
            self._planner_prompt: str | None = prompts.get(settings.planner_prompt).id
        except PromptError:  # a deployment planning by rules alone may ship no planner prompt
            self._planner_prompt = None
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
        key = request.idempotency_key
        digest = request_hash(question, request.conversation_id) if key else None
        if key is not None:
            # A retry is answered from what the first request started, before anything
            # else runs: it was checked when it was first accepted.
            earlier = await self._conversations.find_turn(principal, key)
            if earlier is not None:
                return await self._again(earlier, digest, request, principal)
        if self._safety is not None:
            # Before anything is stored: a refused message leaves nothing but its audit record.
            try:
                await self._safety.check_input(
                    question, TurnScope(principal, request.correlation_id, request.conversation_id)
                )
            except UnsafeInput as exc:
                if self._quality is not None:
                    refused = exc.code == "prompt_injection"
                    outcome: TurnOutcome = "refused" if refused else "failed"
                    self._quality.record_turn(self._answer_prompt.id, outcome, None)
                raise
        history: list[ConversationMessage] = []
        if request.conversation_id is not None:
            if await self._conversations.get(principal, request.conversation_id) is None:
                raise ConversationNotFound("No such conversation.")
            history = await self._conversations.messages(
                principal, request.conversation_id, last=self._settings.history_turns
            )
        try:
            # The question and the reply's row are durable, in one write, before any model
            # is called: every outcome of the turn (complete, interrupted, failed) has a
            # place to be recorded, and a retry with the key finds this turn.
            record = await self._conversations.begin_turn(
                principal,
                NewTurn(
                    question=question,
                    conversation_id=request.conversation_id,
                    title=_title_from(question),
                    lease_until=self._lease_until(),
                    idempotency_key=key,
                    request_hash=digest,
                ),
            )
        except LookupError:  # deleted between the check above and the write
            raise ConversationNotFound("No such conversation.") from None
        if not record.created:  # a concurrent request with the same key won
            return await self._again(record, digest, request, principal)
        turn = await self._new_turn(
            record, question, history, principal, request.correlation_id, "new"
        )
        turn.tools = request.tools
        return StartedTurn(
            record.conversation.id,
            record.user_message.id,
            self._leased(turn, key),
            "new" if key else None,
        )

    async def _again(
        self,
        record: TurnRecord,
        digest: str | None,
        request: TurnRequest,
        principal: Principal,
    ) -> StartedTurn:
        """A request whose idempotency key started a turn before."""
        key = record.idempotency_key
        assert key is not None
        if record.request_hash != digest:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used for a different request; use a new key."
            )
        conversation_id, user_message_id = record.conversation.id, record.user_message.id
        status = record.reply.status
        if status is MessageStatus.COMPLETE:
            return StartedTurn(conversation_id, user_message_id, stored_answer(record), "replayed")
        if status is MessageStatus.AWAITING_APPROVAL:
            raise TurnInProgress(
                "This turn is waiting for a person to approve an action; it continues "
                "once they decide."
            )
        now = datetime.now(UTC)
        if status is MessageStatus.STREAMING and (
            record.lease_until is None or record.lease_until > now
        ):
            channel = self._running.find(principal, key)
            if channel is None:
                raise TurnInProgress(
                    "This turn is still being answered; try again in a few seconds."
                )
            return StartedTurn(conversation_id, user_message_id, channel.subscribe(), "joined")
        # Interrupted, failed, or abandoned by a process that died: run it again, once.
        claimed = await self._conversations.retry_turn(
            principal, record.reply.id, self._lease_until(), now=now
        )
        if claimed is None:
            raise TurnInProgress("This turn is being retried already; try again in a few seconds.")
        messages = await self._conversations.messages(principal, conversation_id)
        ids = [m.id for m in messages]
        asked = ids.index(user_message_id) if user_message_id in ids else len(ids)
        earlier, last = messages[:asked], self._settings.history_turns
        turn = await self._new_turn(
            claimed,
            claimed.user_message.content,
            earlier[-last:] if last else [],
            principal,
            request.correlation_id,
            "retried",
        )
        turn.tools = request.tools
        return StartedTurn(conversation_id, user_message_id, self._leased(turn, key), "retried")

    async def _new_turn(
        self,
        record: TurnRecord,
        question: str,
        history: Sequence[ConversationMessage],
        principal: Principal,
        correlation_id: str | None,
        run: TurnRun,
    ) -> Turn:
        recorder = self._recorder(record.conversation.id, record.reply.id, question, principal, run)
        if self._safety is not None:
            # Checked in start_turn, when the request was first accepted.
            recorder.decided("input_safety", "passed")
        turn = Turn(
            record.conversation.id,
            record.reply.id,
            question,
            history,
            principal,
            correlation_id,
            TurnBudget(self._settings),
            recorder,
            attempt=record.attempt,
        )
        if self._memory is not None:
            # What the models see of the conversation: a budgeted history, the summary of
            # older turns, and the question as a standalone search query. Its model calls
            # may outlast the lease: renewed meanwhile, or the sweep takes the live turn
            # for abandoned and marks it interrupted.
            heartbeat = asyncio.create_task(self._heartbeat(turn))
            try:
                turn.context = await self._memory.prepare(
                    record.conversation, history, question, principal
                )
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
        return turn

    def _recorder(
        self,
        conversation_id: str,
        reply_id: str,
        question: str,
        principal: Principal,
        run: TurnRun,
        prior: TurnExplanation | None = None,
    ) -> TurnRecorder:
        return TurnRecorder(
            conversation_id=conversation_id,
            turn_id=reply_id,
            question=question,
            tenant_id=principal.tenant_id,
            prompts={"answer": self._answer_prompt.id},
            run=run,
            capture_content=self._capture_content,
            prior=prior,
        )

    def _lease_until(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._turn_lease_s)

    async def _leased(
        self,
        turn: Turn,
        key: str | None,
        *,
        resume: tuple[ApprovalRequest, PlanStep] | None = None,
    ) -> AsyncGenerator[TurnEvent, None]:
        """The turn, renewing its lease while it runs (so a crash shows as an abandoned
        turn once the lease ends) and, with a key, open for retries to join."""
        channel = self._running.open(turn.principal, key) if key else None
        heartbeat = asyncio.create_task(self._heartbeat(turn))
        try:
            async with _closing(_in_own_context(self._traced(turn, resume))) as events:
                async for event in events:
                    if channel is not None:
                        channel.publish(event)
                    yield event
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if channel is not None and key is not None:
                self._running.close(turn.principal, key, channel)

    async def _heartbeat(self, turn: Turn) -> None:
        """Keep the running turn's lease, with the answer so far (kept if we die): at once
        (preparing the turn took time), then every third of the lease."""
        if turn.attempt is None:  # a store that does not fence runs: nothing to renew
            return
        while not turn.stored:
            try:
                alive = await self._conversations.renew_turn(
                    turn.principal,
                    turn.reply_id,
                    "".join(turn.answer),
                    self._lease_until(),
                    attempt=turn.attempt,
                )
            except Exception:
                log.warning("could not renew the lease of turn %s", turn.reply_id, exc_info=True)
            else:
                if not alive:
                    log.warning("turn %s was marked abandoned while it ran", turn.reply_id)
                    return
            await asyncio.sleep(self._turn_lease_s / 3)

    async def run_turn(self, request: TurnRequest, principal: Principal) -> TurnResult:
        started = await self.start_turn(request, principal)
        return await collect_turn(started.events)

    async def decide(self, request: ApprovalDecisionRequest, principal: Principal) -> ResumedTurn:
        if self._approvals is None:
            raise ApprovalsUnavailable(
                "High-risk tools need an approval gate, and none is configured."
            )
        # Read first: a turn that already went on (a retried decision) must not run again.
        seen = await self._approvals.get(request.approval_id, principal)
        suspension = read_suspension(seen.resume)
        requester = (principal.tenant_id, principal.user_id) == (seen.tenant_id, seen.requested_by)
        owner = principal if requester else suspension.principal
        history, reply = await self._paused_reply(owner, suspension)
        if reply is None or reply.status is not MessageStatus.AWAITING_APPROVAL:
            raise ApprovalConflict(
                seen.tool,
                "This turn has already resumed, or its conversation is gone.",
                seen.status,
            )
        try:
            approval = await self._approvals.decide(
                request.approval_id,
                request.decision,
                principal,
                arguments=request.arguments,
                reason=request.reason,
            )
        except ApprovalConflict as exc:
            if exc.status is ApprovalStatus.EXPIRED:
                # Nobody can resume it now: the paused answer ends as failed, not waiting.
                explanation = reply.explanation
                if explanation is not None:
                    expired = PolicyDecision("approval", "expired", seen.tool)
                    explanation = replace(
                        explanation,
                        status=MessageStatus.FAILED,
                        error="approval_expired",
                        policy=(*explanation.policy, expired),
                    )
                await self._conversations.finish_message(
                    owner,
                    reply.id,
                    "",
                    MessageStatus.FAILED,
                    plan=suspension.plan,
                    explanation=explanation,
                )
            raise
        # The decision won the approval: now the turn is running again, leased like any
        # other, so a crash while it finishes shows as an interrupted turn to retry.
        claimed = await self._conversations.resume_turn(owner, reply.id, self._lease_until())
        if claimed is None:
            raise ApprovalConflict(
                seen.tool,
                "This turn has already resumed, or its conversation is gone.",
                seen.status,
            )
        turn = Turn(
            suspension.conversation_id,
            suspension.reply_id,
            suspension.question,
            history,
            owner,
            request.correlation_id or suspension.correlation_id,
            TurnBudget(self._settings, suspension.elapsed_s),
            self._recorder(
                suspension.conversation_id,
                suspension.reply_id,
                suspension.question,
                owner,
                "resumed",
                prior=reply.explanation,
            ),
            plan=suspension.plan,
            waiting=list(suspension.waiting),
            replan=suspension.replan,
            attempt=claimed.attempt,
        )
        execution = turn.execution
        execution.rounds = [list(results) for results in suspension.rounds]
        execution.outcomes = [result.outcome for r in suspension.rounds for result in r]
        execution.steps_run = suspension.steps_run
        execution.tool_calls_run = suspension.tool_calls_run
        execution.screened = suspension.screened
        events = self._leased(turn, None, resume=(approval, suspension.step))
        return ResumedTurn(approval, turn.conversation_id, turn.reply_id, requester, events)

    async def _paused_reply(
        self, owner: Principal, suspension: Suspension
    ) -> tuple[list[ConversationMessage], ConversationMessage | None]:
        """The history before the paused turn's question, and its paused reply."""
        messages = await self._conversations.messages(owner, suspension.conversation_id)
        for index, message in enumerate(messages):
            if message.id == suspension.reply_id:
                # The question sits right before its reply; history is what came before.
                earlier = messages[: max(index - 1, 0)]
                last = self._settings.history_turns
                return (earlier[-last:] if last else []), message
        return [], None

    # --- explanations, replay and feedback ---------------------------------------

    async def explain(
        self, principal: Principal, conversation_id: str, turn_id: str
    ) -> TurnExplanation | None:
        found = await self._finished_reply(principal, conversation_id, turn_id)
        if found is None:
            return None
        recorded = _as_it_is(found.reply)
        if recorded is not None:
            return recorded
        # The run died before it stored an explanation (the sweep marked it interrupted):
        # what the reply itself tells.
        reply = found.reply
        return TurnExplanation(
            turn_id=reply.id,
            conversation_id=reply.conversation_id,
            question=found.question,
            status=reply.status,
            started_at=reply.created_at,
            duration_ms=0.0,
            plan=reply.plan,
        )

    async def replay(
        self,
        principal: Principal,
        conversation_id: str,
        turn_id: str,
        *,
        actor: str,
        correlation_id: str | None = None,
    ) -> ReplayedTurn:
        found = await self._finished_reply(principal, conversation_id, turn_id)
        explanation = _as_it_is(found.reply) if found is not None else None
        if (
            found is None
            or explanation is None
            or explanation.status is MessageStatus.AWAITING_APPROVAL
        ):
            raise ConversationNotFound("No such finished turn with a recorded explanation.")
        earlier, reply = found.earlier, found.reply
        prompt = self._recorded_prompt(explanation)
        # The passages the model was shown, in their [n] order, as the owner may see them now.
        shown = sorted(
            (s for s in explanation.sources if s.ref is not None), key=lambda s: s.ref or 0
        )
        chunks = await asyncio.gather(
            *(self._retriever.get_chunk(s.chunk_id, principal) for s in shown)
        )
        sources = [
            (source.ref, RetrievedPassage(chunk, source.score or 0.0))
            for source, chunk in zip(shown, chunks, strict=True)
            if source.ref is not None and chunk is not None
        ]
        missing = tuple(s.chunk_id for s, c in zip(shown, chunks, strict=True) if c is None)
        last = self._settings.history_turns
        history = _history_messages(earlier[-last:] if last else [])
        request = self._grounded_request(
            prompt, principal, history, explanation.question, sources, ()
        )
        answer, call = await self._answer_again(request, principal, conversation_id, turn_id)
        await self._audit.append(
            AuditRecord(
                event="chat.replay",
                tenant_id=principal.tenant_id,
                user_id=actor,
                correlation_id=correlation_id,
                at=datetime.now(UTC),
                data={
                    "owner": principal.user_id,
                    "conversation_id": conversation_id,
                    "message_id": turn_id,
                    "prompt": prompt.id,
                    "sources": [passage.chunk.chunk_id for _, passage in sources],
                    "missing": list(missing),
                    "deployment": call.deployment,
                },
            )
        )
        return ReplayedTurn(
            original=explanation,
            original_answer=reply.content,
            original_citations=reply.citations,
            answer=answer,
            citations=_cited(answer, sources),
            missing_sources=missing,
            model_call=call,
        )

    async def _answer_again(
        self, request: ChatRequest, principal: Principal, conversation_id: str, turn_id: str
    ) -> tuple[str, ModelCallRecord]:
        """A replay's answer, through the same output guard as any answer."""
        scope = TurnScope(principal, None, conversation_id, turn_id)
        guard = _Guarded(self._safety.answer_guard(scope) if self._safety else None)
        timer = ModelCallTimer("replay")
        parts: list[str] = []
        try:
            async with _closing(self._model.stream(request, principal)) as deltas:
                async for delta in deltas:
                    timer.saw(delta)
                    parts += await guard.feed(delta.content)
            parts += await guard.finish()
        except AnswerStopped as exc:
            raise AnswerFailed(exc.event.message, exc.event.code) from None
        except InferenceError as exc:
            raise AnswerFailed(exc.message, "model_unavailable") from None
        return "".join(parts), timer.record(self._model.name)

    def _recorded_prompt(self, explanation: TurnExplanation) -> Prompt:
        """The answer prompt version the turn was answered with, if still installed."""
        prompt_id = explanation.prompts.get("answer", "")
        name, _, version = prompt_id.rpartition("@v")
        try:
            return self._prompts.get(name, int(version))
        except (ValueError, PromptError):
            raise ReplayUnavailable(
                f"The turn was answered with the prompt {prompt_id!r}, which is no longer "
                "installed: it cannot be replayed as it ran."
            ) from None

    async def feedback(self, feedback: TurnFeedback, principal: Principal) -> bool:
        rating = AnswerRating(feedback.rating, feedback.comment, datetime.now(UTC))
        reply = await self._conversations.rate(
            principal, feedback.conversation_id, feedback.turn_id, rating
        )
        if reply is None:
            return False
        previous = reply.feedback
        if previous is not None and (previous.rating, previous.comment) == (
            rating.rating,
            rating.comment,
        ):
            return True  # said before: one person's rating counts once per answer
        prompt = self._answer_prompt_of(reply)
        await self._audit.append(
            AuditRecord(
                event="chat.feedback",
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                correlation_id=feedback.correlation_id,
                at=datetime.now(UTC),
                data={
                    "conversation_id": feedback.conversation_id,
                    "message_id": feedback.turn_id,
                    "rating": feedback.rating,
                    "comment": feedback.comment,
                    "previous": previous.rating if previous is not None else None,
                    "prompt": prompt,
                },
            )
        )
        if self._quality is not None and (previous is None or previous.rating != rating.rating):
            self._quality.record_feedback(prompt, rating.rating, turn_id=feedback.turn_id)
        return True

    def _answer_prompt_of(self, reply: ConversationMessage) -> str:
        """The answer prompt version a reply was given with (recorded in its explanation;
        a reply stored without one: this deployment's)."""
        recorded = reply.explanation.prompts.get("answer") if reply.explanation else None
        return recorded or self._answer_prompt.id

    async def _finished_reply(
        self, principal: Principal, conversation_id: str, turn_id: str
    ) -> _FinishedReply | None:
        """The caller's reply ``turn_id`` once it is no longer running, with its question
        and the messages before it; ``None`` for anything else (another caller's included)."""
        messages = await self._conversations.messages(principal, conversation_id)
        for index, message in enumerate(messages):
            if message.id == turn_id:
                if message.role != "assistant" or message.status is MessageStatus.STREAMING:
                    return None
                asked = messages[index - 1] if index else None
                question = asked.content if asked is not None and asked.role == "user" else ""
                return _FinishedReply(messages[: max(index - 1, 0)], question, message)
        return None

    # --- the turn --------------------------------------------------------------

    async def _traced(
        self, turn: Turn, resume: tuple[ApprovalRequest, PlanStep] | None
    ) -> AsyncGenerator[TurnEvent, None]:
        """The run under its ``lamina.turn`` span."""
        with turn.recorder.running():
            async with _closing(self._run(turn, resume)) as events:
                async for event in events:
                    yield event

    async def _run(
        self, turn: Turn, resume: tuple[ApprovalRequest, PlanStep] | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        principal, execution, recorder = turn.principal, turn.execution, turn.recorder
        lookup: CacheLookup | None = None
        try:
            if resume is None:
                # Before planning: a hit saves the planner's and the model's calls.
                lookup = await self._look_up_answer(turn)
                if lookup is not None and lookup.hit is not None:
                    async with _closing(self._replay(turn, lookup.hit)) as replayed:
                        async for event in replayed:
                            yield event
                    return
            else:
                # Passages are not stored with a paused turn: search again, as the caller
                # is now (their access may have changed while the turn waited).
                await self._retrieve_again(turn)
                async with _closing(self._resume_step(turn, *resume)) as resumed:
                    async for event in resumed:
                        yield event
            if turn.pending is None:
                async with _closing(self._rounds(turn)) as rounds:
                    async for event in rounds:
                        yield event
            if turn.pending is not None:
                turn.status = MessageStatus.AWAITING_APPROVAL
                await asyncio.shield(self._store(turn))
                yield turn.pending
                return
            assert turn.plan is not None
            sources = _number_sources(execution.passages)
            model_sources = sources
            scope = TurnScope(principal, turn.correlation_id, turn.conversation_id, turn.reply_id)
            await self._screen_new_results(turn)
            if self._safety is not None:
                # Passages may carry instructions planted for the model.
                screened = await self._safety.screen_context(sources, [], [], scope)
                if screened.flagged:
                    dropped = len(sources) - len(screened.citable)
                    recorder.decided(
                        "context_safety",
                        "dropped" if dropped else "fenced",
                        f"{screened.flagged} passage(s) flagged",
                    )
                sources, model_sources = screened.citable, screened.sources
            tool_results = [message for _, message in execution.round_trips()]
            answer_step = next(s for s in turn.plan.steps if s.kind is StepKind.ANSWER)
            planner = turn.plan.planner
            yield StepEvent(answer_step)
            with recorder.step(answer_step) as answering:
                recorder.shown(model_sources)
                request = self._answer_request(
                    turn, model_sources, tool_messages(execution.rounds, tool_results)
                )
                for attempt in range(1, _ANSWER_ATTEMPTS + 1):
                    guard = _Guarded(self._safety.answer_guard(scope) if self._safety else None)
                    call = ModelCallTimer("answer")
                    try:
                        async with _closing(self._model.stream(request, principal)) as deltas:
                            async for delta in deltas:
                                call.saw(delta)
                                # The guard redacts PII and holds text back until it is safe.
                                for text in await guard.feed(delta.content):
                                    recorder.first_text(planner)
                                    turn.answer.append(text)
                                    yield AnswerDelta(text)
                        recorder.model_call(call.record(self._model.name))
                        turn.route = call.route or turn.route
                        for text in await guard.finish():
                            recorder.first_text(planner)
                            turn.answer.append(text)
                            yield AnswerDelta(text)
                    finally:
                        guard.decide(recorder)
                    if turn.answer or attempt == _ANSWER_ATTEMPTS:
                        break
                    # A reply without text (only tool calls, an empty content): nothing has
                    # reached the caller, so ask once more; the gateway routes it afresh.
                    log.warning(
                        "the model answered turn %s with no text (finish reason %s, %s); "
                        "asking again",
                        turn.reply_id,
                        call.finish_reason,
                        call.route.deployment if call.route else self._model.name,
                    )
                if not "".join(turn.answer).strip():
                    # An empty answer is never a complete one: the turn fails, retryably.
                    raise AnswerStopped(ErrorEvent("empty_answer", _EMPTY_ANSWER, True))
                turn.citations = _cited("".join(turn.answer), sources)
                outcome = StepOutcome(
                    answer_step.id, StepStatus.OK, f"{len(turn.citations)} citation(s)"
                )
                answering.finish(outcome)
                execution.outcomes.append(outcome)
                turn.status = MessageStatus.COMPLETE
                # "done" promises a stored answer: store it first, whatever happens meanwhile.
                await asyncio.shield(self._store(turn))
            yield StepEvent(answer_step, outcome)
            yield CitationsEvent(turn.citations)
            await self._remember_answer(turn, lookup)
            yield DoneEvent(turn.conversation_id, turn.reply_id, call.usage, turn.route, turn.cache)
            return
        except TurnSuperseded:
            log.warning(
                "turn %s was taken over by a retry; this run's answer is dropped", turn.reply_id
            )
            turn.error = ErrorEvent(
                "superseded",
                "This answer took too long and a retry of the request took it over; the "
                "retry's answer is the one kept.",
                False,
            )
        except BudgetExceeded as exc:
            turn.fail(ErrorEvent("turn_budget_exceeded", exc.message, False))
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
                except TurnSuperseded:
                    log.warning("turn %s was taken over by a retry", turn.reply_id)
                except Exception:
                    log.exception("could not store the outcome of turn %s", turn.reply_id)
        if turn.error is not None:
            yield turn.error

    async def _store(self, turn: Turn) -> None:
        error = turn.error.code if turn.error is not None else None
        explanation = turn.recorder.explanation(
            status=turn.status, error=error, plan=turn.plan, citations=turn.citations
        )
        written = await self._conversations.finish_message(
            turn.principal,
            turn.reply_id,
            "".join(turn.answer),
            turn.status,
            citations=turn.citations,
            plan=turn.plan,
            attempt=turn.attempt,
            explanation=explanation,
        )
        turn.stored = True
        if not written and turn.attempt is not None:
            raise TurnSuperseded(turn.reply_id)
        self._judge(turn, error)
        try:
            await self._audit.append(self._audit_record(turn))
        except Exception:
            # The answer is stored; a failing audit sink must not turn it into an error.
            log.exception("could not append the audit record of turn %s", turn.reply_id)

    def _judge(self, turn: Turn, error: str | None) -> None:
        """Feed the quality monitor a stored turn's outcome (once it has one)."""
        if self._quality is None:
            return
        tool_results = sum(
            result.step.kind is StepKind.CALL_TOOL and result.outcome.status is StepStatus.OK
            for results in turn.execution.rounds
            for result in results
        )
        outcome = turn_outcome(
            turn.status, error, "".join(turn.answer), turn.citations, tool_results=tool_results
        )
        prompt = turn.recorder.answer_prompt
        if outcome is not None and prompt is not None:
            self._quality.record_turn(prompt, outcome, turn.recorder.top_score)

    def _audit_record(self, turn: Turn) -> AuditRecord:
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
                "approval": turn.pending.approval_id if turn.pending else None,
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

    async def _look_up_answer(self, turn: Turn) -> CacheLookup | None:
        if self._answer_cache is None:
            return None
        lookup = await self._answer_cache.lookup(
            question=turn.question,
            history=turn.history,
            principal=turn.principal,
            prompt_version=self._answer_variant,
            tools=turn.tools,
        )
        turn.cache = outcome = lookup.outcome
        detail = outcome.reason or (
            f"similarity {outcome.similarity:.4f}" if outcome.similarity is not None else ""
        )
        turn.recorder.decided("answer_cache", outcome.status, detail)
        return lookup

    async def _replay(self, turn: Turn, hit: CacheHit) -> AsyncIterator[TurnEvent]:
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
        recorder = turn.recorder
        recorder.cached_sources(hit.chunks)
        recorder.shown_citations(hit.citations)
        yield PlanEvent(turn.plan)
        yield StepEvent(step)
        with recorder.step(step) as answering:
            # The output check runs on every answer sent, cached or not: its rules may have
            # changed since the answer was stored.
            scope = TurnScope(
                turn.principal, turn.correlation_id, turn.conversation_id, turn.reply_id
            )
            guard = _Guarded(self._safety.answer_guard(scope) if self._safety else None)
            try:
                texts = [*await guard.feed(hit.answer), *await guard.finish()]
            finally:
                guard.decide(recorder)
            for text in texts:
                recorder.first_text(turn.plan.planner)
                turn.answer.append(text)
                yield AnswerDelta(text)
            turn.citations = hit.citations
            outcome = StepOutcome(
                step.id, StepStatus.OK, f"{len(hit.citations)} citation(s), cached"
            )
            answering.finish(outcome)
            turn.execution.outcomes.append(outcome)
            turn.status = MessageStatus.COMPLETE
            await asyncio.shield(self._store(turn))
        yield StepEvent(step, outcome)
        yield CitationsEvent(turn.citations)
        yield DoneEvent(turn.conversation_id, turn.reply_id, cache=turn.cache)

    async def _remember_answer(self, turn: Turn, lookup: CacheLookup | None) -> None:
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

    # --- rounds ------------------------------------------------------------------

    async def _rounds(self, turn: Turn) -> AsyncIterator[TurnEvent]:
        """Plan and run rounds until the plan is only the answer, or the turn pauses."""
        execution = turn.execution
        first = turn.plan is None
        while first or turn.replan:
            await self._screen_new_results(turn)
            memory = turn.context
            context = _PlanningContext(
                turn.question,
                memory.history if memory is not None else turn.history,
                turn.principal,
                execution.rounds,
                execution.passages,
                memory.search_query if memory is not None else turn.question,
            )
            with turn.recorder.planning() as planning:
                async with asyncio.timeout(turn.budget.remaining_s()) as deadline:
                    try:
                        plan = await (self._planner if turn.tools else _GROUNDED).plan(context)
                    except TimeoutError:
                        if deadline.expired():
                            raise turn.budget.out_of_time() from None
                        raise
                planning.made(plan)
            if "model:" in plan.planner and self._planner_prompt is not None:
                turn.recorder.used_prompt("planner", self._planner_prompt)
            turn.plan = _extend(turn.plan, plan)
            yield PlanEvent(turn.plan)
            turn.budget.admit_tokens(turn.plan.usage)
            steps = [s for s in plan.steps if s.kind is not StepKind.ANSWER]
            if not steps:
                return
            turn.budget.admit(execution, steps)
            execution.rounds.append([])
            # Only what the model asked for is shown back to it for another round, or
            # what rules asked to see (a search they must judge before they can decide).
            turn.replan = any(step.tool_call_id for step in steps) or plan.revisit
            first = False
            async with _closing(self._round(turn, steps)) as events:
                async for event in events:
                    yield event
            if turn.pending is not None:
                return

    async def _screen_new_results(self, turn: Turn) -> None:
        """Screen the model-planned results not screened yet, once, before any model sees
        them: a flagged passage or tool output is fenced or withheld in place, so a planted
        instruction can steer neither the next plan nor the answer."""
        execution = turn.execution
        fresh = [
            result for results in execution.rounds for result in results if result.step.tool_call_id
        ][execution.screened :]
        if self._safety is None or not fresh:
            execution.screened += len(fresh)
            return
        round_trips = execution.round_trips()[execution.screened :]
        scope = TurnScope(turn.principal, turn.correlation_id, turn.conversation_id, turn.reply_id)
        screened = await self._safety.screen_context(
            [], [m for _, m in round_trips], [c for c, _ in round_trips], scope
        )
        if screened.flagged:
            turn.recorder.decided(
                "context_safety", "fenced", f"{screened.flagged} tool result(s) flagged"
            )
        contents = {
            result.step.tool_call_id: message.content or ""
            for result, message in zip(fresh, screened.tool_results, strict=True)
        }
        execution.rounds = [
            [
                replace(result, content=contents[result.step.tool_call_id])
                if result.step.tool_call_id in contents
                else result
                for result in results
            ]
            for results in execution.rounds
        ]
        execution.screened += len(fresh)

    async def _round(self, turn: Turn, steps: Sequence[PlanStep]) -> AsyncIterator[TurnEvent]:
        """Run a round's searches and ordinary tool calls concurrently, then put its
        high-risk calls to a person, one at a time."""
        specs = self._toolset.list_tools(turn.principal)
        high_risk = {spec.name for spec in specs if spec.risk is RiskLevel.HIGH}
        gated = [s for s in steps if s.kind is StepKind.CALL_TOOL and s.tool in high_risk]
        ordinary = [s for s in steps if s not in gated]
        async with _closing(self._execute(turn, ordinary)) as events:
            async for event in events:
                yield event
        turn.waiting = gated
        async with _closing(self._ask_for_approvals(turn)) as events:
            async for event in events:
                yield event

    async def _execute(self, turn: Turn, steps: Sequence[PlanStep]) -> AsyncIterator[TurnEvent]:
        """Run steps that do not depend on one another concurrently, within the turn's
        time budget; events report each as it starts and ends."""
        for step in steps:
            yield StepEvent(step)
        if not steps:
            return
        remaining = turn.budget.remaining_s()
        tasks = [asyncio.create_task(self._run_step(s, turn)) for s in steps]
        try:
            for finished in asyncio.as_completed(tasks, timeout=remaining):
                try:
                    step, outcome, content = await finished
                except TimeoutError:
                    raise turn.budget.out_of_time() from None
                turn.execution.record(step, outcome, content)
                yield StepEvent(step, outcome)
        finally:
            for task in tasks:
                task.cancel()
            # Wait for cancelled steps to unwind, so none outlives the turn unobserved.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_step(self, step: PlanStep, turn: Turn) -> tuple[PlanStep, StepOutcome, str]:
        # Under the step's span: the search's or the tool's own span nests under it.
        with turn.recorder.step(step) as running:
            outcome, content = await self._step_outcome(step, turn)
            running.finish(outcome)
        return step, outcome, content

    async def _step_outcome(self, step: PlanStep, turn: Turn) -> tuple[StepOutcome, str]:
        if step.kind is StepKind.RETRIEVE:
            passages = await self._retrieve(step, turn)
            outcome = StepOutcome(step.id, StepStatus.OK, f"{len(passages)} passage(s) found")
            return outcome, _passages_for_model(passages)
        name = step.tool or ""
        try:
            result = await self._toolset.call(name, step.arguments or {}, turn.principal)
        except ToolError as exc:
            turn.recorder.decided("tool_policy", _policy_outcome(exc), name)
            outcome = _refusal(step, exc)
            return outcome, _as_error(outcome)
        turn.recorder.decided("tool_policy", "allowed", name)
        outcome = StepOutcome(step.id, StepStatus.OK, f"{name} returned a result")
        return outcome, json.dumps(result.output, default=str)

    async def _retrieve(self, step: PlanStep, turn: Turn) -> list[RetrievedPassage]:
        result = await self._retriever.retrieve(
            RetrievalQuery(step.query or "", top_k=self._top_k), turn.principal
        )
        turn.recorder.retrieved(step.id, result)
        execution = turn.execution
        execution.passages.extend(result.passages)
        execution.trimmed += result.trimmed_count
        execution.indexes.add(result.index)
        return list(result.passages)

    async def _retrieve_again(self, turn: Turn) -> None:
        searches = [
            result.step
            for results in turn.execution.rounds
            for result in results
            if result.step.kind is StepKind.RETRIEVE
        ]
        turn.recorder.searched_again()
        await asyncio.gather(*(self._retrieve(step, turn) for step in searches))

    # --- approval ------------------------------------------------------------------

    async def _ask_for_approvals(self, turn: Turn) -> AsyncIterator[TurnEvent]:
        """Put the round's waiting high-risk calls to a person: the first one that a
        person must decide pauses the turn (``turn.pending``)."""
        recorder = turn.recorder
        while turn.waiting:
            step = turn.waiting.pop(0)
            tool = step.tool or ""
            yield StepEvent(step)
            if self._approvals is None:
                outcome = StepOutcome(
                    step.id,
                    StepStatus.NEEDS_APPROVAL,
                    "This action needs a person's approval, and this service has no way to "
                    "ask for one; it was not run.",
                )
                with recorder.step(step) as running:
                    recorder.decided("approval", "unavailable", tool)
                    running.finish(outcome)
                turn.execution.record(step, outcome, f"Error (not run): {outcome.summary}")
                yield StepEvent(step, outcome)
                continue
            with recorder.step(step) as running:
                approval, outcome = await self._request_approval(turn, step)
                running.finish(outcome)
            if approval is None:
                turn.execution.record(step, outcome, _as_error(outcome))
                yield StepEvent(step, outcome)
                continue
            turn.execution.outcomes.append(outcome)
            yield StepEvent(step, outcome)
            turn.pending = ApprovalRequiredEvent(
                approval_id=approval.id,
                step_id=step.id,
                tool=approval.tool,
                arguments=approval.arguments,
                summary=approval.summary,
                expires_at=approval.expires_at,
                conversation_id=turn.conversation_id,
                message_id=turn.reply_id,
            )
            return

    async def _request_approval(
        self, turn: Turn, step: PlanStep
    ) -> tuple[ApprovalRequest | None, StepOutcome]:
        """Put a high-risk call to a person: the pending approval, or none when the tools
        layer refused the call outright."""
        assert self._approvals is not None
        tool = step.tool or ""
        try:
            approval = await self._approvals.request(
                tool, step.arguments or {}, turn.principal, resume=suspend(turn, step)
            )
        except ToolError as exc:
            turn.recorder.decided("tool_policy", _policy_outcome(exc), tool)
            return None, _refusal(step, exc)
        turn.recorder.decided("approval", "requested", f"{tool}: {approval.id}")
        summary = f"Waiting for approval: {approval.summary}"
        return approval, StepOutcome(step.id, StepStatus.NEEDS_APPROVAL, summary)

    async def _resume_step(
        self, turn: Turn, approval: ApprovalRequest, step: PlanStep
    ) -> AsyncIterator[TurnEvent]:
        """Finish the step a person decided, then the rest of its round."""
        assert self._approvals is not None
        recorder = turn.recorder
        yield StepEvent(step)
        with recorder.step(step) as running:
            if approval.status is ApprovalStatus.REJECTED:
                decided = "rejected"
            else:
                decided = "edited" if approval.requested_arguments else "approved"
            recorder.decided("approval", decided, f"{approval.tool}: {approval.id}")
            outcome, content = await self._decided_call(turn, approval, step)
            running.finish(outcome)
        turn.execution.record(step, outcome, content)
        yield StepEvent(step, outcome)
        async with _closing(self._ask_for_approvals(turn)) as events:
            async for event in events:
                yield event

    async def _decided_call(
        self, turn: Turn, approval: ApprovalRequest, step: PlanStep
    ) -> tuple[StepOutcome, str]:
        """The outcome of a high-risk call a person decided, and what the model is told."""
        assert self._approvals is not None
        if approval.status is ApprovalStatus.REJECTED:
            reason = f" Their reason: {approval.reason}" if approval.reason else ""
            summary = f"A person rejected this action; it was not run.{reason}"
            return (
                StepOutcome(step.id, StepStatus.REFUSED, summary),
                f"The user rejected this call; do not retry it.{reason}",
            )
        try:
            result = await self._approvals.execute(approval.id, turn.principal)
        except ApprovalConflict as exc:
            outcome = StepOutcome(step.id, StepStatus.FAILED, exc.message)
            return outcome, f"Error (not run again): {exc.message}"
        except ToolError as exc:
            turn.recorder.decided("tool_policy", _policy_outcome(exc), approval.tool)
            outcome = _refusal(step, exc)
            return outcome, _as_error(outcome)
        edited = " with arguments a person chose" if approval.requested_arguments else ""
        outcome = StepOutcome(step.id, StepStatus.OK, f"{result.tool} ran{edited}")
        return outcome, json.dumps(result.output, default=str)

    # --- the answer --------------------------------------------------------------

    def _answer_request(
        self,
        turn: Turn,
        sources: Sequence[tuple[int, RetrievedPassage]],
        round_trips: Sequence[ChatMessage],
    ) -> ChatRequest:
        if turn.context is not None:
            # The running summary, then the recent messages within the history budget.
            history = turn.context.chat_messages()
        else:
            history = _history_messages(turn.history)
        return self._grounded_request(
            self._answer_prompt, turn.principal, history, turn.question, sources, round_trips
        )

    def _grounded_request(
        self,
        prompt: Prompt,
        principal: Principal,
        history: Sequence[ChatMessage],
        question: str,
        sources: Sequence[tuple[int, RetrievedPassage]],
        round_trips: Sequence[ChatMessage],
    ) -> ChatRequest:
        system = self._prompts.render(
            prompt,
            assistant_name=self._assistant_name,
            tenant=principal.tenant_id,
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
        messages = [ChatMessage(Role.SYSTEM, system), *history]
        messages.append(ChatMessage(Role.USER, question))
        messages += round_trips
        documents = [GroundingDocument(ref, p.chunk.title, p.chunk.text) for ref, p in sources]
        return ChatRequest(
            messages=messages,
            documents=documents,
            max_tokens=self._max_output_tokens,
            temperature=self._temperature,
            prompt_version=prompt.id,
        )


@dataclass(frozen=True, slots=True)
class _FinishedReply:
    earlier: list[ConversationMessage]
    """The conversation before the reply's question."""
    question: str
    reply: ConversationMessage


def _as_it_is(reply: ConversationMessage) -> TurnExplanation | None:
    """The reply's stored explanation with the reply's status now: the sweep marks a run
    whose process died interrupted without touching its explanation (a resumed run's
    still says ``awaiting_approval``, from the pause)."""
    recorded = reply.explanation
    if recorded is None or recorded.status is reply.status:
        return recorded
    return replace(recorded, status=reply.status)


def _extend(plan: Plan | None, following: Plan) -> Plan:
    """The turn's plan so far with a further round's steps, ending with its answer step,
    named after the latest round's planner (a hand-over, rules to agent, shows there) and
    with the planning tokens of all rounds."""
    if plan is None:
        return following
    done = tuple(step for step in plan.steps if step.kind is not StepKind.ANSWER)
    rationale = " ".join(text for text in (plan.rationale, following.rationale) if text)
    usage = plan.usage
    if following.usage is not None:
        before = usage or Usage(0, 0)
        usage = Usage(
            before.input_tokens + following.usage.input_tokens,
            before.output_tokens + following.usage.output_tokens,
        )
    return Plan(
        steps=done + following.steps,
        planner=following.planner,
        rationale=rationale,
        usage=usage,
    )


def _as_error(outcome: StepOutcome) -> str:
    """A step that did not run, as the model is told."""
    return f"Error ({outcome.status.value}): {outcome.summary}"


def _refusal(step: PlanStep, error: ToolError) -> StepOutcome:
    """A tool error as a step outcome whose summary a model can act on."""
    if isinstance(error, ToolApprovalRequired):
        return StepOutcome(step.id, StepStatus.NEEDS_APPROVAL, error.message)
    if isinstance(error, ToolPermissionDenied | UnknownTool):
        return StepOutcome(step.id, StepStatus.REFUSED, error.message)
    if isinstance(error, InvalidToolArguments):
        detail = "; ".join(error.errors) or error.message
        return StepOutcome(step.id, StepStatus.FAILED, f"Invalid arguments: {detail}")
    return StepOutcome(step.id, StepStatus.FAILED, error.message)


_PASSAGES_FOR_MODEL = 3
_PASSAGE_CHARS_FOR_MODEL = 600


def _passages_for_model(passages: Sequence[RetrievedPassage]) -> str:
    """What a model-planned search returned, as the model sees it before answering: the
    best few passages, shortened. The answer itself is grounded on all of them."""
    if not passages:
        return "No passages found."
    best = sorted(passages, key=lambda p: p.score, reverse=True)[:_PASSAGES_FOR_MODEL]
    lines = []
    for passage in best:
        text = " ".join(passage.chunk.text.split())
        if len(text) > _PASSAGE_CHARS_FOR_MODEL:
            text = text[: _PASSAGE_CHARS_FOR_MODEL - 3].rstrip() + "..."
        lines.append(f"[{passage.chunk.title}] {text}")
    more = len(passages) - len(best)
    if more > 0:
        lines.append(f"(and {more} more passage(s))")
    return "\n".join(lines)


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


def _history_messages(history: Sequence[ConversationMessage]) -> list[ChatMessage]:
    """Earlier messages as a model sees them: the finished ones with text."""
    return [
        ChatMessage(Role(m.role), m.content)
        for m in history
        if m.content and m.status is MessageStatus.COMPLETE
    ]


def _policy_outcome(error: ToolError) -> str:
    """What the tools layer's policy decided about a call that raised ``error``: a refusal
    of its own, or ``allowed`` (the call was let through and then failed)."""
    if isinstance(error, ToolPermissionDenied | UnknownTool):
        return "refused"
    if isinstance(error, InvalidToolArguments):
        return "invalid_arguments"
    if isinstance(error, ToolApprovalRequired):
        return "needs_approval"
    return "allowed"


@dataclass
class _Guarded:
    """The answer guard, when safety is on, and what it did to the answer: passed it,
    redacted it, or stopped it (for the turn's policy decisions)."""

    guard: AnswerGuard | None
    fed: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    stopped: str | None = None
    finished: bool = False

    async def feed(self, text: str) -> list[str]:
        if not text:
            return []
        self.fed.append(text)
        released = await self._through(self.guard.feed(text)) if self.guard else [text]
        self.sent.extend(released)
        return released

    async def finish(self) -> list[str]:
        released = await self._through(self.guard.finish()) if self.guard else []
        self.sent.extend(released)
        self.finished = True
        return released

    async def _through(self, released: Awaitable[list[str]]) -> list[str]:
        try:
            return await released
        except AnswerStopped as exc:
            self.stopped = exc.event.code
            raise

    def decide(self, recorder: TurnRecorder) -> None:
        if self.guard is None:
            return
        if self.stopped is not None:
            recorder.decided("output_safety", "refused", self.stopped)
        elif self.finished:
            redacted = "".join(self.sent) != "".join(self.fed)
            recorder.decided("output_safety", "redacted" if redacted else "passed")


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
