"""The research agent: iterative retrieval with query reformulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from inferencing.contracts import ChatModel
from intelligence.agents.base import AgentPlanner, without_steps
from intelligence.contracts import Plan, StepKind
from intelligence.prompts import PromptLibrary
from tools.contracts import ToolCaller, ToolResult, ToolSpec, UnknownTool

RESEARCH_AGENT: Final = "agent:research"


class _SearchOnly:
    """A toolset that lists nothing: the model is offered ``search_knowledge`` alone."""

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return ()

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        raise UnknownTool(name, "The research agent may only search.")


class ResearchAgent(AgentPlanner):
    """Searches, reads what came back, and searches again with a reformulated query
    until the results cover the question (prompt ``research_agent``).

    It may only search: a call the model makes to any other function is dropped from
    the plan (noted in its rationale), even a tool the caller could use, because the
    orchestrator's toolset would otherwise run it. ``max_steps`` bounds each round
    (searches plus the answer); the turn's budget bounds the whole loop.
    """

    def __init__(
        self,
        chat_model: ChatModel,
        prompts: PromptLibrary,
        *,
        prompt: str = "research_agent",
        max_steps: int = 4,
    ) -> None:
        super().__init__(
            RESEARCH_AGENT, chat_model, _SearchOnly(), prompts, prompt, max_steps=max_steps
        )

    def restrict(self, plan: Plan) -> Plan:
        calls = [step for step in plan.steps if step.kind is StepKind.CALL_TOOL]
        names = ", ".join(sorted({step.tool or "" for step in calls}))
        note = f"Not run: the research agent may only search (it asked for {names})."
        return without_steps(plan, [step.id for step in calls], note)
