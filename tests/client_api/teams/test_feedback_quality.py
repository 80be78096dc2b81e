"""A like or dislike in Teams counts in the drift metrics of the rated answer's prompt, as
a rating through the API does."""

from __future__ import annotations

from typing import Any

from tests.client_api.teams.conftest import TeamsApp
from tests.support.telemetry import MetricsProbe


def _rating(app: TeamsApp, question: dict[str, Any], reply_to: str, reaction: str) -> Any:
    return app.activity(
        user="ana",
        conversation=question["conversation"]["id"],
        kind=question["conversation"]["conversationType"],
        type="invoke",
        name="message/submitAction",
        replyToId=reply_to,
        value={"actionName": "feedback", "actionValue": {"reaction": reaction, "feedback": ""}},
    )


def test_a_dislike_counts_against_the_answers_prompt(
    teams_app: TeamsApp, metrics: MetricsProbe
) -> None:
    teams_app.simulator.reset()
    question = teams_app.activity(kind="groupChat", text="How do I reset my password?")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202
    answer_id, _ = teams_app.wait_for(conversation, lambda c: c.body["type"] == "message")

    assert teams_app.post(_rating(teams_app, question, answer_id, "dislike")).status_code == 200
    assert teams_app.post(_rating(teams_app, question, "not-an-answer", "like")).status_code == 200

    prompt = {"lamina.prompt.id": "grounded_answer@v1"}
    negative = {"lamina.feedback.rating": "negative", **prompt}
    assert metrics.amount("lamina.quality.feedback", **negative) == 1
    # Feedback on a message that is not an answer of ours counts nowhere.
    assert metrics.amount("lamina.quality.feedback", **prompt) == 1
