"""A turn's working state: what its steps produced, what it may still spend, and how a
turn that paused for a person's approval is written down and read back to resume.

The written form (:class:`Suspension`) travels as the approval's opaque ``resume``
data, so the approval and everything needed to continue are stored in one write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from inferencing.contracts import ChatMessage, Role, RouteInfo, ToolCall, Usage
from intelligence.contracts import (
    SEARCH_KNOWLEDGE,
    ApprovalRequiredEvent,
    CacheOutcome,
    Citation,
    ConversationMessage,
    ErrorEvent,
    MessageStatus,
    Plan,
    PlanStep,
    Principal,
    StepKind,
    StepOutcome,
    StepResult,
)
from intelligence.explanations import TurnRecorder
from intelligence.memory import TurnContext
from intelligence.settings import IntelligenceSettings
from knowledge.contracts import RetrievedPassage


@dataclass
class Execution:
    """What the steps of a turn produced, round by round, gathered for the answer."""

    passages: list[RetrievedPassage] = field(default_factory=list)
    rounds: list[list[StepResult]] = field(default_factory=list)
    outcomes: list[StepOutcome] = field(default_factory=list)
    trimmed: int = 0
    indexes: set[str] = field(default_factory=set)
    steps_run: int = 0
    tool_calls_run: int = 0
    screened: int = 0
    """How many model-planned results (in order) the safety screen has seen."""

    def record(self, step: PlanStep, outcome: StepOutcome, content: str) -> None:
        """Keep a finished step of the current round."""
        self.outcomes.append(outcome)
        self.rounds[-1].append(StepResult(step, outcome, content))

    def round_trips(self) -> list[tuple[ToolCall, ChatMessage]]:
        """The model-planned calls of every round, with their results, in order."""
        return [
            (_as_tool_call(result.step), _as_tool_message(result))
            for results in self.rounds
            for result in results
            if result.step.tool_call_id
        ]


def _as_tool_call(step: PlanStep) -> ToolCall:
    assert step.tool_call_id is not None
    if step.kind is StepKind.RETRIEVE:
        return ToolCall(step.tool_call_id, SEARCH_KNOWLEDGE, json.dumps({"query": step.query}))
    return ToolCall(step.tool_call_id, step.tool or "", json.dumps(dict(step.arguments or {})))


def _as_tool_message(result: StepResult) -> ChatMessage:
    return ChatMessage(Role.TOOL, content=result.content, tool_call_id=result.step.tool_call_id)


def tool_messages(
    rounds: Sequence[Sequence[StepResult]], results: Sequence[ChatMessage]
) -> list[ChatMessage]:
    """The model's calls and ``results`` (one per model-planned step, in order, possibly
    screened) as chat messages: per round, one assistant message then its tool results."""
    messages: list[ChatMessage] = []
    remaining = iter(results)
    for round_results in rounds:
        planned = [result.step for result in round_results if result.step.tool_call_id]
        if not planned:
            continue
        messages.append(
            ChatMessage(Role.ASSISTANT, tool_calls=tuple(_as_tool_call(s) for s in planned))
        )
        messages.extend(next(remaining) for _ in planned)
    return messages


class TurnSuperseded(Exception):
    """A retry took the turn over while this run was still going (its lease had run
    out): this run's answer is not stored."""


class BudgetExceeded(Exception):
    """The turn would spend more steps, tool calls, rounds, planning tokens or time than
    it may."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TurnBudget:
    """What one turn may spend on planning and steps (``LAMINA_INTELLIGENCE__MAX_*``).

    Time spent waiting for a person's approval does not count: a resumed turn starts
    from the time it had used when it paused."""

    def __init__(self, settings: IntelligenceSettings, elapsed_s: float = 0.0) -> None:
        self._settings = settings
        self._started = time.monotonic() - elapsed_s

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def remaining_s(self) -> float:
        remaining = self._settings.max_turn_s - self.elapsed_s()
        if remaining <= 0:
            raise self.out_of_time()
        return remaining

    def out_of_time(self) -> BudgetExceeded:
        return BudgetExceeded(
            f"This question needed more than {self._settings.max_turn_s:g} seconds of "
            "searching and tool calls, the most one answer may use. Try a narrower question."
        )

    def admit(self, execution: Execution, steps: Sequence[PlanStep]) -> None:
        """Raise :class:`BudgetExceeded` unless another round of ``steps`` fits."""
        settings = self._settings
        if len(execution.rounds) >= settings.max_rounds:
            raise BudgetExceeded(
                f"This question needed more than {settings.max_rounds} rounds of searching "
                "and tool calls, the most one answer may use. Try a narrower question, or "
                "ask in parts."
            )
        if execution.steps_run + len(steps) > settings.max_steps:
            raise BudgetExceeded(
                f"This question needed more than {settings.max_steps} searches and tool "
                "calls, the most one answer may use. Try a narrower question, or ask in parts."
            )
        tool_calls = sum(step.kind is StepKind.CALL_TOOL for step in steps)
        if execution.tool_calls_run + tool_calls > settings.max_tool_calls:
            raise BudgetExceeded(
                f"This question needed more than {settings.max_tool_calls} tool calls, the "
                "most one answer may use. Ask for fewer actions at once."
            )
        self.remaining_s()
        execution.steps_run += len(steps)
        execution.tool_calls_run += tool_calls

    def admit_tokens(self, spent: Usage | None) -> None:
        """Raise :class:`BudgetExceeded` when the turn's planning and agent calls together
        (``spent``: the recorded plan's usage, which survives a pause for approval) used
        more model tokens than ``max_agent_tokens``. Checked after each planning call: a
        call's size is known only once it returns, so the call that crosses the limit is
        the turn's last."""
        if spent is None:
            return
        limit = self._settings.max_agent_tokens
        used = spent.input_tokens + spent.output_tokens
        if used > limit:
            raise BudgetExceeded(
                f"This question needed more than {limit} model tokens of planning "
                f"({used} spent), the most one answer may use. Try a narrower question, "
                "or ask in parts."
            )


@dataclass
class Turn:
    """One turn's state, from the stored user message to the stored reply."""

    conversation_id: str
    reply_id: str
    question: str
    history: Sequence[ConversationMessage]
    principal: Principal
    correlation_id: str | None
    budget: TurnBudget
    recorder: TurnRecorder
    """Records what this run does, for the turn's explanation and its spans."""
    answer: list[str] = field(default_factory=list)
    plan: Plan | None = None
    citations: tuple[Citation, ...] = ()
    execution: Execution = field(default_factory=Execution)
    status: MessageStatus = MessageStatus.FAILED
    error: ErrorEvent | None = None
    stored: bool = False
    route: RouteInfo | None = None
    cache: CacheOutcome | None = None
    waiting: list[PlanStep] = field(default_factory=list)
    """High-risk steps of the current round not yet put to a person, in plan order."""
    replan: bool = False
    """Whether the planner is asked again after the current round (model-planned calls)."""
    pending: ApprovalRequiredEvent | None = None
    """Set when the turn paused for approval."""
    attempt: str | None = None
    """This run of the turn (from the store): its answer is stored only while the run
    still owns the turn, never over a retry's."""
    context: TurnContext | None = None
    """The budgeted history, running summary and search query its models see (from
    :class:`~intelligence.memory.ConversationMemory`); ``None``: the history as loaded."""
    tools: bool = True
    """False: planned by rules alone, no tool offered (:attr:`TurnRequest.tools`)."""

    def fail(self, error: ErrorEvent) -> None:
        self.error = error
        self.status = MessageStatus.INTERRUPTED if self.answer else MessageStatus.FAILED


# --- pausing and resuming ------------------------------------------------------------

SUSPENSION_VERSION = 1


@dataclass(frozen=True, slots=True)
class Suspension:
    """Everything a paused turn needs to continue, as stored with its approval."""

    conversation_id: str
    reply_id: str
    question: str
    correlation_id: str | None
    principal: Principal
    """The requester, as they were when the turn paused: the turn resumes as them when
    someone else (an approver) decides."""
    plan: Plan
    rounds: tuple[tuple[StepResult, ...], ...]
    step: PlanStep
    """The step waiting for the decision."""
    waiting: tuple[PlanStep, ...]
    replan: bool
    steps_run: int
    tool_calls_run: int
    screened: int
    elapsed_s: float
    version: int = SUSPENSION_VERSION


_SUSPENSION: TypeAdapter[Suspension] = TypeAdapter(Suspension)


def suspend(turn: Turn, step: PlanStep) -> dict[str, Any]:
    """``turn``, paused before ``step``, as JSON-ready data."""
    assert turn.plan is not None
    execution = turn.execution
    suspension = Suspension(
        conversation_id=turn.conversation_id,
        reply_id=turn.reply_id,
        question=turn.question,
        correlation_id=turn.correlation_id,
        principal=turn.principal,
        plan=turn.plan,
        rounds=tuple(tuple(results) for results in execution.rounds),
        step=step,
        waiting=tuple(turn.waiting),
        replan=turn.replan,
        steps_run=execution.steps_run,
        tool_calls_run=execution.tool_calls_run,
        screened=execution.screened,
        elapsed_s=turn.budget.elapsed_s(),
    )
    data: dict[str, Any] = _SUSPENSION.dump_python(suspension, mode="json")
    return data


def read_suspension(data: Mapping[str, Any]) -> Suspension:
    """The suspension written by :func:`suspend`; ``ValueError`` if it cannot be read."""
    if data.get("version") != SUSPENSION_VERSION:
        raise ValueError(f"unknown suspended-turn version {data.get('version')!r}")
    return _SUSPENSION.validate_python(data)
