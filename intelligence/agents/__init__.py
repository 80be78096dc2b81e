"""Agents: a model planning a turn round after round, for work rules cannot decide.

Each agent is a :class:`~intelligence.contracts.Planner` built on
:class:`~intelligence.planning.model_planner.ModelPlanner` (semantic-kernel function
calling, auto-invocation off, behind our seam): the agent only chooses steps, the
orchestrator runs them with the caller's identity and under the tools' policy, and
the turn's budget bounds the loop. Two patterns ship as examples:

- :class:`ResearchAgent`: iterative retrieval; it may only search, and reformulates
  its query when results are weak.
- :class:`ActionAgent`: tool use; it is offered the tools the caller may use (and
  search), and a high-risk call pauses the turn for a person's approval.

:class:`~intelligence.planning.escalation.EscalatingPlanner` hands turns to them.
"""

from intelligence.agents.action import ActionAgent
from intelligence.agents.base import AgentPlanner, earlier_searches
from intelligence.agents.research import ResearchAgent

__all__ = ["ActionAgent", "AgentPlanner", "ResearchAgent", "earlier_searches"]
