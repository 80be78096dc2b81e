"""The model judge of groundedness, through the real gateway against the OpenAI-compatible
simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from client_api.evaluation.groundedness import JudgeError, ModelJudge, build_judge
from inferencing.settings import InferencingSettings
from inferencing.simulator import ScriptedReply, SimulatorServer
from tests.support.simulator import simulated_inferencing

PASSAGE = "Every full-time employee receives 27 days of paid annual leave per calendar year."
ANSWER = "You get 27 days of paid annual leave [1]. Unused days are paid out in December [1]."


def verdicts(*supported: bool) -> ScriptedReply:
    return ScriptedReply(
        content=json.dumps(
            {"verdicts": [{"sentence": n, "supported": s} for n, s in enumerate(supported, 1)]}
        )
    )


@pytest.fixture
async def judge(simulator: SimulatorServer) -> AsyncIterator[ModelJudge]:
    judge = build_judge(InferencingSettings(**simulated_inferencing(simulator)))
    yield judge
    await judge.aclose()


async def test_the_judges_verdicts_make_the_score(
    judge: ModelJudge, simulator: SimulatorServer
) -> None:
    simulator.script(verdicts(True, False))
    grounded = await judge.check(ANSWER, {1: PASSAGE})
    assert grounded is not None
    assert (grounded.score, grounded.checked) == (0.5, 2)
    assert grounded.unsupported == ("Unused days are paid out in December.",)
    assert judge.method == "judge:openai"

    [request] = [r for r in simulator.requests() if r.path.endswith("/chat/completions")]
    asked = request.body["messages"][-1]["content"]
    assert f"[1] {PASSAGE}" in asked
    assert "2. Unused days are paid out in December. (cites 1)" in asked


async def test_a_judge_that_finds_everything_supported_scores_one(
    judge: ModelJudge, simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(content=f"```json\n{verdicts(True, True).content}\n```")  # fenced JSON
    )
    grounded = await judge.check(ANSWER, {1: PASSAGE})
    assert grounded is not None
    assert grounded.score == 1.0


async def test_a_reply_that_is_not_a_verdict_is_an_error(
    judge: ModelJudge, simulator: SimulatorServer
) -> None:
    simulator.script(ScriptedReply(content="Looks fine to me."))
    with pytest.raises(JudgeError, match="not the JSON asked for"):
        await judge.check(ANSWER, {1: PASSAGE})


async def test_a_verdict_missing_a_sentence_is_an_error(
    judge: ModelJudge, simulator: SimulatorServer
) -> None:
    simulator.script(verdicts(True))
    with pytest.raises(JudgeError, match=r"no verdict on sentence\(s\) 2 of 2"):
        await judge.check(ANSWER, {1: PASSAGE})


def test_without_a_model_there_is_no_judge() -> None:
    with pytest.raises(JudgeError, match="--judge needs a model"):
        build_judge(InferencingSettings())


def test_an_unknown_judge_deployment_is_named(simulator: SimulatorServer) -> None:
    settings = InferencingSettings(**simulated_inferencing(simulator))
    with pytest.raises(JudgeError, match="'gpt-9' is not in the registry"):
        build_judge(settings, "gpt-9")
