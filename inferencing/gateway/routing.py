"""Choosing deployments: capability, context length, retirement, complexity and cost.

The router turns a request into an ordered chain of deployments to try, with the
reasons for the order in words. It reads nothing but the request and the
registry; breakers and retries are the gateway's concern.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Protocol

from inferencing.contracts import ChatModel, ChatRequest, Role
from inferencing.settings import DeploymentSettings

log = logging.getLogger(__name__)


class Complexity(StrEnum):
    SIMPLE = "simple"
    COMPLEX = "complex"


@dataclass(frozen=True, slots=True)
class Assessment:
    complexity: Complexity
    reason: str


class ComplexityClassifier(Protocol):
    """Says whether a turn needs a strong model. Pluggable: pass another to the gateway."""

    def assess(self, request: ChatRequest, prompt_tokens: int) -> Assessment: ...


_REASONING = re.compile(
    r"\b(why|explain|compare|analy[sz]e|plan|design|derive|prove|step[- ]by[- ]step|"
    r"trade-?offs?|evaluate|calculate)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class HeuristicClassifier:
    """The default classifier, explainable by construction: a turn is complex when it
    offers tools, asks for structured output, has a long prompt, a long conversation,
    or a question that asks for reasoning; otherwise simple. The reason names the rule
    that decided."""

    long_prompt_tokens: int = 2_000
    long_conversation_turns: int = 6

    def assess(self, request: ChatRequest, prompt_tokens: int) -> Assessment:
        if request.tools:
            return Assessment(Complexity.COMPLEX, f"{len(request.tools)} tool(s) offered")
        if request.response_format is not None:
            return Assessment(Complexity.COMPLEX, "structured output requested")
        if prompt_tokens >= self.long_prompt_tokens:
            return Assessment(Complexity.COMPLEX, f"prompt of {prompt_tokens} tokens")
        turns = sum(1 for m in request.messages if m.role is Role.USER)
        if turns >= self.long_conversation_turns:
            return Assessment(Complexity.COMPLEX, f"conversation of {turns} turns")
        question = next(
            (m.content or "" for m in reversed(request.messages) if m.role is Role.USER), ""
        )
        if match := _REASONING.search(question):
            return Assessment(Complexity.COMPLEX, f"question asks to {match.group(0).lower()!r}")
        return Assessment(Complexity.SIMPLE, "short single question without tools")


@dataclass(frozen=True, slots=True)
class Deployment:
    """A registry entry and the model that serves it."""

    settings: DeploymentSettings
    model: ChatModel

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True, slots=True)
class RoutePlan:
    chain: tuple[Deployment, ...]
    reasons: tuple[str, ...]
    prompt_tokens: int


_TIER_ORDER = {
    Complexity.SIMPLE: {"cheap": 0, "any": 1, "strong": 2},
    Complexity.COMPLEX: {"strong": 0, "any": 1, "cheap": 2},
}


class Router:
    def __init__(
        self,
        deployments: Sequence[Deployment],
        classifier: ComplexityClassifier | None = None,
    ) -> None:
        self._deployments = {d.name: d for d in deployments}
        self._classifier = classifier or HeuristicClassifier()
        self._retirement_logged: set[str] = set()

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def plan(self, request: ChatRequest, prompt_tokens: int, today: date) -> RoutePlan:
        """The deployments to try, in order. Raises ``KeyError`` for an unknown pinned
        deployment; returns an empty chain when none can serve the request."""
        reasons: list[str] = []
        needed = prompt_tokens + (request.max_tokens or 0)
        if request.deployment is not None:
            pinned = self._deployments[request.deployment]
            candidates = [pinned, *(self._deployments[f] for f in pinned.settings.fallbacks)]
            reasons.append(f"pinned to {pinned.name}")
        else:
            candidates = list(self._deployments.values())
        usable: list[Deployment] = []
        for deployment in candidates:
            if why := self._unfit(deployment, request, needed, today):
                reasons.append(f"{deployment.name} skipped: {why}")
            else:
                usable.append(deployment)
        if request.deployment is None and len(usable) > 1:
            assessment = self._classifier.assess(request, prompt_tokens)
            reasons.append(f"{assessment.complexity.value} turn: {assessment.reason}")
            tiers = _TIER_ORDER[assessment.complexity]
            usable.sort(
                key=lambda d: (
                    tiers[d.settings.tier],
                    d.settings.priority,
                    _estimated_cost(d.settings, prompt_tokens, request.max_tokens or 0),
                )
            )
            reasons.append("order: tier, then priority, then estimated cost")
        return RoutePlan(tuple(usable), tuple(reasons), prompt_tokens)

    def _unfit(
        self, deployment: Deployment, request: ChatRequest, needed: int, today: date
    ) -> str | None:
        settings = deployment.settings
        if settings.retires_on is not None and today >= settings.retires_on:
            if settings.name not in self._retirement_logged:
                self._retirement_logged.add(settings.name)
                log.warning(
                    "deployment %s retired on %s: skipped, traffic moves to the next one",
                    settings.name,
                    settings.retires_on.isoformat(),
                )
            return f"retired on {settings.retires_on.isoformat()}"
        capabilities = deployment.model.capabilities
        if request.tools and not capabilities.tool_calls:
            return "cannot call tools"
        if request.response_format is not None and not capabilities.json_schema:
            return "no structured output"
        window = capabilities.context_window
        if window is not None and needed > window:
            return f"context window {window} < {needed} tokens needed"
        return None


def _estimated_cost(settings: DeploymentSettings, prompt_tokens: int, max_tokens: int) -> float:
    return (
        prompt_tokens * settings.input_price_per_1k + max_tokens * settings.output_price_per_1k
    ) / 1000
