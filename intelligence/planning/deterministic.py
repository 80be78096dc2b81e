"""Planning without a model: retrieve, then answer."""

from __future__ import annotations

from intelligence.contracts import Plan, PlanningContext, PlanStep, StepKind


class DeterministicPlanner:
    """Used when no model that can call tools is configured (extractive mode).

    Every question is grounded: one retrieval for the question (a follow-up rewritten
    into a standalone query), then the answer.
    """

    async def plan(self, context: PlanningContext) -> Plan:
        retrieve = PlanStep(
            id="s1",
            kind=StepKind.RETRIEVE,
            description="Search the documents the user may see",
            query=context.search_query or context.question,
        )
        answer = PlanStep(
            id="s2",
            kind=StepKind.ANSWER,
            description="Answer from the retrieved passages, with citations",
            depends_on=("s1",),
        )
        return Plan(steps=(retrieve, answer), planner="deterministic")
