"""The planner setting picks the orchestration mode at the composition root."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_api.composition import build_planner
from client_api.settings import LaminaSettings
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.planning.escalation import EscalatingPlanner
from intelligence.prompts import PromptLibrary
from tests.fakes import FakeToolset, ScriptedChatModel


def settings(tmp_path: Path, **intelligence: object) -> LaminaSettings:
    return LaminaSettings(data_dir=tmp_path, intelligence=intelligence)


def test_escalate_wires_rules_first_with_both_agents(tmp_path: Path) -> None:
    prompts = PromptLibrary(PromptLibrary.bundled_directory())
    planner = build_planner(
        settings(tmp_path, planner="escalate", agent="action", escalation_min_score=0.5),
        ScriptedChatModel(),
        FakeToolset(),
        prompts,
    )
    assert isinstance(planner, EscalatingPlanner)


def test_escalate_needs_a_model_that_can_call_tools(tmp_path: Path) -> None:
    prompts = PromptLibrary(PromptLibrary.bundled_directory())
    model = ScriptedChatModel(tool_calls=False)
    with pytest.raises(ValueError, match="PLANNER=escalate needs a model that can call tools"):
        build_planner(settings(tmp_path, planner="escalate"), model, FakeToolset(), prompts)
    # auto keeps its meaning: without such a model, rules alone.
    assert isinstance(
        build_planner(settings(tmp_path), model, FakeToolset(), prompts), DeterministicPlanner
    )
