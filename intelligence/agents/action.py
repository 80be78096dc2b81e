"""The action agent: tool use, with a person's approval where a tool demands it."""

from __future__ import annotations

from typing import Final

from inferencing.contracts import ChatModel
from intelligence.agents.base import AgentPlanner
from intelligence.prompts import PromptLibrary
from tools.contracts import Toolset

ACTION_AGENT: Final = "agent:action"


class ActionAgent(AgentPlanner):
    """Carries out a request with the caller's tools, round after round: call, see the
    result, decide the next call (prompt ``action_agent``).

    It is offered ``search_knowledge`` and exactly the tools ``toolset`` lists for the
    caller (the toolset already filters by the caller's roles and tenant), so a tool
    the caller may not use is never shown to the model. Every call still passes the
    tools' policy when it runs, and a high-risk tool pauses the turn for approval as
    any model-planned call does; a rejection is shown to the agent in the next round.
    """

    def __init__(
        self,
        chat_model: ChatModel,
        toolset: Toolset,
        prompts: PromptLibrary,
        *,
        prompt: str = "action_agent",
        max_steps: int = 6,
    ) -> None:
        super().__init__(ACTION_AGENT, chat_model, toolset, prompts, prompt, max_steps=max_steps)
