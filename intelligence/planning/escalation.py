"""Rules first, an agent when rules cannot decide (``LAMINA_INTELLIGENCE__PLANNER=escalate``).

Most questions are plain: search for them, answer from what was found. Rules plan
those without a model call, which is cheaper, faster and predictable. Some turns are
beyond rules, and are handed over to an agent (a model planning round after round):

- **ambiguous intent**, seen before anything runs: the request asks for an action or
  names a tool the caller may use, or it has several parts ("compare", two questions);
- **results that need another retrieval**, seen after the rules' search ran: it found
  no passage, or none scoring at least ``min_score``. The rules' plan asks to see its
  results (:attr:`Plan.revisit`) so that this can be judged.

The planner keeps no state between calls: every round is decided again from the
planning context (which rounds ran, who planned them, what was found), so a turn that
paused for approval resumes the same way on any replica. The agent's plans are
recorded as ``deterministic>agent:<kind>``, and the round that hands over says why in
its rationale. What bounds the agent is the turn's budget (rounds, steps, tool calls,
time, and ``max_agent_tokens`` for its model calls), enforced by the orchestrator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from intelligence.contracts import Plan, Planner, PlanningContext, PlanStep, StepKind
from tools.contracts import Toolset, ToolSpec

AgentChoice = Literal["auto", "research", "action"]
AgentKind = Literal["research", "action"]

RULES: Final = "deterministic"
"""How plans made by rules are named; an agent's plans are named ``deterministic>…``."""

_ANSWER_DESCRIPTION: Final = "Answer from the retrieved passages, with citations"


@dataclass(frozen=True, slots=True)
class Escalation:
    """Why rules hand a turn over, and to which kind of agent they would."""

    agent: AgentKind
    reason: str


# Requests that start like these (after a polite opening) ask for something to be done.
_ACTION_VERBS: Final = frozenset(
    {
        "add", "approve", "assign", "book", "cancel", "change", "close", "create",
        "delete", "disable", "enable", "escalate", "file", "grant", "log", "open",
        "order", "pay", "raise", "refund", "register", "reject", "remove", "rename",
        "renew", "reopen", "request", "reserve", "reset", "restart", "revoke", "run",
        "schedule", "send", "set", "start", "stop", "submit", "transfer", "update",
    }
)  # fmt: skip
_POLITE_OPENING: Final = re.compile(
    r"^(?:(?:please|kindly|hi|hello|hey)[,!]?\s+|(?:can|could|would|will) you\s+(?:please\s+)?"
    r"|i(?:'d| would) like (?:you )?to\s+|i (?:want|need) (?:you )?to\s+|help me\s+(?:to\s+)?)+",
    re.IGNORECASE,
)
_SEVERAL_PARTS: Final = re.compile(
    r"\b(?:compare|comparison|versus|vs\.?|differences? between|and then|after that"
    r"|and (?:what|how|when|where|which|who|why))\b",
    re.IGNORECASE,
)
_WORD: Final = re.compile(r"[a-z0-9]+")
_NAME_PART: Final = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


class IntentRules:
    """Reads a request for signs that rules cannot plan it (English wording).

    - It names a tool the caller may use: every word of the tool's name (``order_status``,
      ``createTicket``: ``order``/``status``, ``create``/``ticket``) is in the request.
    - It asks for an action (``close account A-1``, ``please book a room``) and the
      caller may use tools.
    - It has several parts: two questions, ``compare``, ``versus``, ``and then``,
      ``... and how ...``.

    The first two go to the action agent, the last to the research agent. Replace it
    with a subclass for other languages or house wording.
    """

    def read(self, question: str, tools: Sequence[ToolSpec]) -> Escalation | None:
        words = set(_WORD.findall(question.lower()))
        if tools:
            for spec in tools:
                parts = _name_words(spec.name)
                if parts and parts <= words:
                    return Escalation("action", f"the request names the tool {spec.name}")
            opening = _POLITE_OPENING.sub("", question.strip())
            first = next(iter(_WORD.findall(opening.lower())), "")
            if first in _ACTION_VERBS:
                return Escalation("action", f'the request asks for an action ("{first}")')
        if question.count("?") >= 2 or _SEVERAL_PARTS.search(question):
            return Escalation("research", "the question has several parts")
        return None


def _name_words(name: str) -> set[str]:
    """The words of a tool name (``snake_case``, ``kebab-case``, ``dotted.name``,
    ``camelCase``), each longer than two letters, lower-cased."""
    parts = (part.lower() for part in _NAME_PART.findall(name))
    return {part for part in parts if len(part) > 2}


class EscalatingPlanner:
    """A :class:`~intelligence.contracts.Planner`: ``rules`` plan what they can decide,
    ``agents`` (``research``, and optionally ``action``) the rest.

    - First round: when :class:`IntentRules` finds the request ambiguous, an agent plans
      at once; otherwise the rules plan (retrieve, answer), asking to see the results.
    - After the rules' round: enough was found, the plan is the answer (no model call);
      nothing was found, or no passage scored at least ``min_score``, an agent plans on
      from what the rules did (the research agent, unless ``agent`` says otherwise).
    - After an agent's round: the same agent plans again, seeing its results.

    ``agent`` picks the agent for every hand-over (``auto``: by the reason, as above).
    ``min_score`` is on the index's own scale (BM25 for the embedded index, the search
    service's score for Azure AI Search); ``None`` escalates only on an empty result.
    ``toolset`` lists the tools the caller may use, for the intent rules.
    """

    def __init__(
        self,
        rules: Planner,
        agents: Mapping[str, Planner],
        toolset: Toolset,
        *,
        agent: AgentChoice = "auto",
        min_score: float | None = None,
        intent: IntentRules | None = None,
    ) -> None:
        needed = "research" if agent == "auto" else agent
        if needed not in agents:
            raise ValueError(
                f"escalation to the {needed} agent needs that agent; got {sorted(agents)}"
            )
        self._rules = rules
        self._agents = dict(agents)
        self._toolset = toolset
        self._agent = agent
        self._min_score = min_score
        self._intent = intent or IntentRules()

    async def plan(self, context: PlanningContext) -> Plan:
        if not context.rounds:
            escalation = self._read_intent(context)
            if escalation is not None:
                return await self._hand_over(context, escalation)
            plan = await self._rules.plan(context)
            searches = any(step.kind is StepKind.RETRIEVE for step in plan.steps)
            return replace(plan, revisit=searches)
        if not _agent_planned(context):
            reason = self._weak_results(context)
            if reason is None:
                return _answer(context)
            return await self._hand_over(context, Escalation("research", reason))
        # The agent's loop goes on. Which agent runs it is read again from the context:
        # a turn handed over after the rules' round went on weak results, else on intent.
        wanted: AgentKind = "research"
        if _agent_planned(context, first_round_only=True):
            escalation = self._read_intent(context)
            wanted = escalation.agent if escalation is not None else "research"
        return await self._agent_plan(context, self._kind(wanted))

    def _read_intent(self, context: PlanningContext) -> Escalation | None:
        return self._intent.read(context.question, self._toolset.list_tools(context.principal))

    def _weak_results(self, context: PlanningContext) -> str | None:
        """Why the rules' searches did not find enough, or None if they did."""
        searched = any(
            result.step.kind is StepKind.RETRIEVE
            for results in context.rounds
            for result in results
        )
        if not searched:
            return None
        if not context.passages:
            return "the search found no passage"
        best = max(passage.score for passage in context.passages)
        if self._min_score is not None and best < self._min_score:
            return f"no passage scored {self._min_score:g} or more (best {best:.3g})"
        return None

    def _kind(self, wanted: AgentKind) -> AgentKind:
        """The agent a hand-over for ``wanted`` goes to, as configured and available."""
        if self._agent != "auto":
            return self._agent
        return wanted if wanted in self._agents else "research"

    async def _hand_over(self, context: PlanningContext, escalation: Escalation) -> Plan:
        kind = self._kind(escalation.agent)
        plan = await self._agent_plan(context, kind)
        note = f"Escalated to the {kind} agent: {escalation.reason}."
        return replace(plan, rationale=" ".join(t for t in (note, plan.rationale) if t))

    async def _agent_plan(self, context: PlanningContext, kind: AgentKind) -> Plan:
        plan = await self._agents[kind].plan(context)
        return replace(plan, planner=f"{RULES}>{plan.planner}", revisit=False)


def _agent_planned(context: PlanningContext, *, first_round_only: bool = False) -> bool:
    """Whether a model planned any step of the turn so far (or of its first round)."""
    rounds = context.rounds[:1] if first_round_only else context.rounds
    return any(result.step.tool_call_id for results in rounds for result in results)


def _answer(context: PlanningContext) -> Plan:
    """The rules' last word: answer from what their searches found."""
    done = [result.step.id for results in context.rounds for result in results]
    step = PlanStep(
        id=f"s{len(done) + 1}",
        kind=StepKind.ANSWER,
        description=_ANSWER_DESCRIPTION,
        depends_on=tuple(done),
    )
    return Plan(steps=(step,), planner=RULES)
