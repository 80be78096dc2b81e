"""What a turn actually did, recorded while it runs: the :class:`TurnRecorder`.

The orchestrator tells its turn's recorder each thing as it happens (a planning call, a
step starting and ending, a search's result, the answer's model call, each policy
decision, the first answer text). The recorder keeps the timings and outcomes, opens the
turn's spans (``lamina.turn``, ``lamina.plan``, ``lamina.step``) so that the lower
layers' spans nest under them, and builds the :class:`TurnExplanation` stored with the
reply. It records outcomes and ids, never passage text; the question goes into a span
only when the operator allows content capture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from inferencing.contracts import ChatDelta, RouteInfo, Usage
from intelligence import telemetry
from intelligence.contracts import (
    Citation,
    ExplainedSource,
    MessageStatus,
    ModelCallRecord,
    Plan,
    PlanStep,
    PolicyDecision,
    RetrievalCounts,
    StepOutcome,
    StepTiming,
    TurnExplanation,
)
from knowledge.contracts import Chunk, RetrievalResult, RetrievedPassage

TurnRun = Literal["new", "retried", "resumed"]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class _Found:
    """A passage a search of this turn returned."""

    passage: RetrievedPassage
    index: str | None
    step_id: str | None


@dataclass
class StepRun:
    """One step running under its span; :meth:`finish` records how it ended."""

    span: Span
    started: float
    timing: StepTiming
    steps: dict[str, StepTiming]
    """The turn's step timings, where this one is kept."""

    def finish(self, outcome: StepOutcome) -> None:
        self.timing = replace(
            self.timing,
            duration_ms=_ms(time.monotonic() - self.started),
            status=outcome.status,
            summary=outcome.summary,
        )
        self.steps[self.timing.step_id] = self.timing
        self.span.set_attribute(telemetry.STEP_STATUS, outcome.status.value)


@dataclass
class PlanningCall:
    """One call to the planner, under its span."""

    span: Span
    plan: Plan | None = None

    def made(self, plan: Plan) -> None:
        self.plan = plan
        self.span.set_attribute(telemetry.PLANNER, plan.planner)
        self.span.set_attribute(telemetry.PLAN_STEPS, len(plan.steps))


@dataclass
class ModelCallTimer:
    """Times one streamed model call from the deltas it yields."""

    purpose: Literal["plan", "answer", "summary", "replay"]
    started: float = field(default_factory=time.monotonic)
    first_text: float | None = None
    route: RouteInfo | None = None
    usage: Usage | None = None
    finish_reason: str | None = None

    def saw(self, delta: ChatDelta) -> None:
        if delta.content and self.first_text is None:
            self.first_text = time.monotonic()
        self.route = delta.route or self.route
        self.usage = delta.usage or self.usage
        self.finish_reason = delta.finish_reason or self.finish_reason

    def record(self, model_name: str) -> ModelCallRecord:
        """The call as it ended; ``model_name`` names the model when no gateway routed it."""
        route = self.route
        return ModelCallRecord(
            purpose=self.purpose,
            deployment=route.deployment if route else None,
            model=route.model if route else model_name,
            model_version=route.model_version if route else None,
            duration_ms=_ms(time.monotonic() - self.started),
            input_tokens=self.usage.input_tokens if self.usage else None,
            output_tokens=self.usage.output_tokens if self.usage else None,
            finish_reason=self.finish_reason,
            time_to_first_token_ms=(
                _ms(self.first_text - self.started) if self.first_text is not None else None
            ),
        )


class TurnRecorder:
    """Records one run of a turn and builds its :class:`TurnExplanation`.

    A turn resumed after an approval continues the explanation its paused run stored
    (``prior``): its plan, steps, model calls and policy decisions go on, its duration
    adds up the running time of both runs (not the wait for the person), and its sources
    and retrieval counts are those of the resumed run, which searches again as the owner
    is now and answers from what it found."""

    def __init__(
        self,
        *,
        conversation_id: str,
        turn_id: str,
        question: str,
        tenant_id: str,
        prompts: Mapping[str, str],
        run: TurnRun,
        capture_content: bool = False,
        prior: TurnExplanation | None = None,
    ) -> None:
        self._conversation_id = conversation_id
        self._turn_id = turn_id
        self._question = question
        self._tenant_id = tenant_id
        self._prompts = dict(prior.prompts) if prior is not None else {}
        self._prompts.update(prompts)
        self._run = run
        self._capture = capture_content
        self._started_at = prior.started_at if prior is not None else datetime.now(UTC)
        self._earlier_ms = prior.duration_ms if prior is not None else 0.0
        self._started = time.monotonic()
        self._steps: dict[str, StepTiming] = {s.step_id: s for s in prior.steps} if prior else {}
        self._model_calls = list(prior.model_calls) if prior is not None else []
        self._policy = list(prior.policy) if prior is not None else []
        self._first_token_ms = prior.time_to_first_token_ms if prior is not None else None
        self._trace_id = prior.trace_id if prior is not None else None
        self._found: list[_Found] = []
        self._counts = RetrievalCounts()
        self._shown: dict[str, int] = {}
        self._rounds = 0
        self._span: Span | None = None

    @property
    def answer_prompt(self) -> str | None:
        return self._prompts.get("answer")

    # --- spans ---------------------------------------------------------------------------

    @contextmanager
    def running(self) -> Iterator[Span]:
        """The ``lamina.turn`` span, current for the whole run (the run's own context must
        hold it across the run's yields: the orchestrator drives the run in a context of
        its own)."""
        attributes: dict[str, str] = {
            telemetry.CONVERSATION_ID: self._conversation_id,
            telemetry.TURN_ID: self._turn_id,
            telemetry.TURN_RUN: self._run,
            telemetry.TENANT_ID: self._tenant_id,
        }
        if self.answer_prompt is not None:
            attributes[telemetry.PROMPT_ID] = self.answer_prompt
        if self._capture:
            attributes[telemetry.TURN_QUESTION] = self._question
        with telemetry.tracer.start_as_current_span(
            telemetry.TURN_SPAN, attributes=attributes
        ) as span:
            self._span = span
            self._started = time.monotonic()
            context = span.get_span_context()
            if context.is_valid:
                self._trace_id = trace.format_trace_id(context.trace_id)
            yield span

    @contextmanager
    def planning(self) -> Iterator[PlanningCall]:
        """A ``lamina.plan`` span around one call to the planner; a call that spent model
        tokens is recorded as a model call of the turn."""
        self._rounds += 1
        started = time.monotonic()
        with telemetry.tracer.start_as_current_span(
            telemetry.PLAN_SPAN, attributes={telemetry.PLAN_ROUND: self._rounds}
        ) as span:
            call = PlanningCall(span)
            yield call
        plan = call.plan
        if plan is not None and plan.usage is not None:
            self._model_calls.append(
                ModelCallRecord(
                    purpose="plan",
                    deployment=None,
                    model=None,
                    model_version=None,
                    duration_ms=_ms(time.monotonic() - started),
                    input_tokens=plan.usage.input_tokens,
                    output_tokens=plan.usage.output_tokens,
                )
            )

    @contextmanager
    def step(self, step: PlanStep) -> Iterator[StepRun]:
        """A ``lamina.step`` span, current while the step runs (searches, tool calls and
        the answer's model call nest under it), and the step's timing. A step run again
        (the high-risk call a person decided) replaces its earlier timing."""
        attributes: dict[str, str] = {
            telemetry.STEP_ID: step.id,
            telemetry.STEP_KIND: step.kind.value,
        }
        if step.tool is not None:
            attributes[telemetry.TOOL_NAME] = step.tool
        with telemetry.tracer.start_as_current_span(
            telemetry.STEP_SPAN, attributes=attributes
        ) as span:
            timing = StepTiming(
                step_id=step.id,
                kind=step.kind,
                description=step.description,
                started_at=datetime.now(UTC),
                duration_ms=None,
                query=step.query,
                tool=step.tool,
            )
            self._steps[step.id] = timing
            yield StepRun(span, time.monotonic(), timing, self._steps)

    # --- what happened ---------------------------------------------------------------------

    def retrieved(self, step_id: str | None, result: RetrievalResult) -> None:
        """A search's result (already security-trimmed: only what the caller may see)."""
        counts = self._counts
        returned = len(result.passages)
        indexes = counts.indexes
        if result.index not in indexes:
            indexes = (*indexes, result.index)
        self._counts = RetrievalCounts(
            searches=counts.searches + 1,
            candidates=counts.candidates + returned + result.trimmed_count,
            trimmed=counts.trimmed + result.trimmed_count,
            returned=counts.returned + returned,
            indexes=indexes,
        )
        self._found.extend(_Found(p, result.index, step_id) for p in result.passages)

    def searched_again(self) -> None:
        """A resumed run searches its earlier rounds' queries again: what it finds now
        replaces what the paused run had found."""
        self._found.clear()
        self._counts = RetrievalCounts()

    def cached_sources(self, chunks: Sequence[Chunk]) -> None:
        """The sources of a cached answer (fetched again with the caller's identity)."""
        self._found.extend(_Found(RetrievedPassage(c, 0.0), None, None) for c in chunks)

    def shown(self, sources: Sequence[tuple[int, RetrievedPassage]]) -> None:
        """The numbered sources the answer's model call was given."""
        self._shown = {passage.chunk.chunk_id: ref for ref, passage in sources}

    def shown_citations(self, citations: Sequence[Citation]) -> None:
        """A cached answer's sources, numbered as in its stored citations."""
        self._shown = {c.chunk_id: c.ref for c in citations}

    def model_call(self, call: ModelCallRecord) -> None:
        self._model_calls.append(call)

    def used_prompt(self, role: str, prompt_id: str) -> None:
        """A model of the turn was instructed with ``prompt_id`` (``planner`` …)."""
        self._prompts[role] = prompt_id

    def decided(self, check: str, outcome: str, detail: str = "") -> None:
        """A policy decision, in the order they happen (an outcome, never content)."""
        self._policy.append(PolicyDecision(check, outcome, detail))

    def first_text(self, planner: str) -> None:
        """The first answer text is being sent (recorded once per turn)."""
        if self._first_token_ms is not None:
            return
        elapsed = time.monotonic() - self._started
        self._first_token_ms = _ms(elapsed)
        attributes = {telemetry.PLANNER: planner}
        if self.answer_prompt is not None:
            attributes[telemetry.PROMPT_ID] = self.answer_prompt
        telemetry.turn_time_to_first_token.record(elapsed, attributes)

    @property
    def top_score(self) -> float | None:
        """The best score a search of this run returned (``None``: nothing searched)."""
        scores = [f.passage.score for f in self._found if f.index is not None]
        return max(scores) if scores else None

    # --- the explanation -------------------------------------------------------------------

    def explanation(
        self,
        *,
        status: MessageStatus,
        error: str | None,
        plan: Plan | None,
        citations: Sequence[Citation],
    ) -> TurnExplanation:
        """The turn as recorded so far, ending (for now) with ``status``."""
        if self._span is not None:
            self._span.set_attribute(telemetry.TURN_STATUS, status.value)
            if error is not None:
                self._span.set_attribute(telemetry.ERROR_TYPE, error)
                self._span.set_status(Status(StatusCode.ERROR, error))
        return TurnExplanation(
            turn_id=self._turn_id,
            conversation_id=self._conversation_id,
            question=self._question,
            status=status,
            started_at=self._started_at,
            duration_ms=round(self._earlier_ms + _ms(time.monotonic() - self._started), 3),
            trace_id=self._trace_id,
            plan=plan,
            steps=self._in_plan_order(plan),
            sources=self._sources({c.chunk_id for c in citations}),
            retrieval=self._counts,
            model_calls=tuple(self._model_calls),
            prompts=dict(self._prompts),
            policy=tuple(self._policy),
            time_to_first_token_ms=self._first_token_ms,
            error=error,
        )

    def _in_plan_order(self, plan: Plan | None) -> tuple[StepTiming, ...]:
        """The steps that ran, in the plan's order (a round's steps start concurrently)."""
        order = {step.id: position for position, step in enumerate(plan.steps if plan else ())}
        timings = list(self._steps.values())
        return tuple(sorted(timings, key=lambda t: order.get(t.step_id, len(order))))

    def _sources(self, cited: set[str]) -> tuple[ExplainedSource, ...]:
        """Each chunk once, at its best score: those the model was shown in their ``[n]``
        order, then the rest best first."""
        best: dict[str, _Found] = {}
        for found in self._found:
            seen = best.get(found.passage.chunk.chunk_id)
            if seen is None or found.passage.score > seen.passage.score:
                best[found.passage.chunk.chunk_id] = found
        sources = [
            ExplainedSource(
                chunk_id=chunk.chunk_id,
                document_id=chunk.document_id,
                source=chunk.source,
                title=chunk.title,
                score=found.passage.score if found.index is not None else None,
                index=found.index,
                page=chunk.page,
                ref=self._shown.get(chunk.chunk_id),
                cited=chunk.chunk_id in cited,
                step_id=found.step_id,
            )
            for found in best.values()
            for chunk in (found.passage.chunk,)
        ]
        unshown = float("inf")
        return tuple(
            sorted(
                sources,
                key=lambda s: (s.ref if s.ref is not None else unshown, -(s.score or 0.0)),
            )
        )
