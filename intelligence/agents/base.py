"""What every agent shares: a model planner with the agent's own instructions and
functions, whose plans are recorded under the agent's name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from inferencing.contracts import ChatModel
from intelligence.contracts import Plan, PlanningContext, StepKind
from intelligence.planning.model_planner import ModelPlanner
from intelligence.prompts import PromptLibrary
from tools.contracts import Toolset


@dataclass(frozen=True, slots=True)
class EarlierSearch:
    """A search of this turn that the agent did not plan (rules made it before handing
    over), as its instructions mention it."""

    query: str
    summary: str


def earlier_searches(context: PlanningContext) -> list[EarlierSearch]:
    """The searches of earlier rounds that no model planned, with how they went.

    Only the query and the outcome's summary (how many passages) are told: the passages
    themselves are not screened for planted instructions until they reach the answer,
    so they never go into an agent's instructions."""
    return [
        EarlierSearch(result.step.query or "", result.outcome.summary)
        for results in context.rounds
        for result in results
        if result.step.kind is StepKind.RETRIEVE and not result.step.tool_call_id
    ]


class AgentPlanner:
    """A :class:`~intelligence.contracts.Planner`: a model plans each round from the
    versioned prompt ``prompt`` (rendered with ``tenant``, ``today`` and ``searches``,
    see :func:`earlier_searches`), offered ``search_knowledge`` and what ``toolset``
    lists for the caller. Its plans are named ``name`` (e.g. ``agent:research``).

    Subclasses narrow what the agent may do with :meth:`restrict`.
    """

    def __init__(
        self,
        name: str,
        chat_model: ChatModel,
        toolset: Toolset,
        prompts: PromptLibrary,
        prompt: str,
        *,
        max_steps: int = 6,
    ) -> None:
        self.name = name
        self._prompts = prompts
        self._prompt = prompts.get(prompt)
        self._planner = ModelPlanner(chat_model, toolset, self._instructions, max_steps)

    @property
    def prompt_id(self) -> str:
        """The instructions' prompt version, e.g. ``research_agent@v1``."""
        return self._prompt.id

    async def plan(self, context: PlanningContext) -> Plan:
        plan = await self._planner.plan(context)
        return replace(self.restrict(plan), planner=self.name)

    def restrict(self, plan: Plan) -> Plan:
        """The steps of ``plan`` this agent may take (all, unless a subclass says less)."""
        return plan

    def _instructions(self, context: PlanningContext) -> str:
        return self._prompts.render(
            self._prompt,
            tenant=context.principal.tenant_id,
            today=datetime.now(UTC).date().isoformat(),
            searches=[
                {"query": search.query, "summary": search.summary}
                for search in earlier_searches(context)
            ],
        )


def without_steps(plan: Plan, dropped: Sequence[str], note: str) -> Plan:
    """``plan`` without the steps whose ids are ``dropped``; its answer no longer depends
    on them, and ``note`` says why in the rationale."""
    if not dropped:
        return plan
    steps = tuple(
        replace(step, depends_on=tuple(d for d in step.depends_on if d not in dropped))
        for step in plan.steps
        if step.id not in dropped
    )
    rationale = " ".join(text for text in (plan.rationale, note) if text)
    return replace(plan, steps=steps, rationale=rationale)
