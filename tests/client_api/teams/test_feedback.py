"""Feedback buttons on every answer, and a like or dislike stored as the clicking user's
rating of the reply it rates, as a rating through the API is: once per person and answer,
audited (``chat.feedback``) when it changes; only the asker's answer is theirs to rate."""

from __future__ import annotations

import json
from typing import Any

from tests.client_api.teams.conftest import TeamsApp
from tests.support.bot_framework import TEAMS_TENANT


def _stream_id(body: dict[str, Any]) -> str | None:
    info = [e for e in body.get("entities") or [] if e.get("type") == "streaminfo"]
    return info[0].get("streamId") if info else None


def _feedback(
    app: TeamsApp, question: dict[str, Any], reply_to: str, user: str = "ana", **value: Any
) -> dict[str, Any]:
    return app.activity(
        user=user,
        conversation=question["conversation"]["id"],
        kind=question["conversation"]["conversationType"],
        type="invoke",
        name="message/submitAction",
        replyToId=reply_to,
        value={"actionName": "feedback", "actionValue": value},
    )


def test_a_dislike_on_a_group_chat_answer_is_stored_against_its_reply(teams_app: TeamsApp) -> None:
    teams_app.simulator.reset()
    question = teams_app.activity(kind="groupChat", text="How do I reset my password?")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202
    answer_id, answer = teams_app.wait_for(conversation, lambda c: c.body["type"] == "message")
    assert answer.body["channelData"] == {"feedbackLoopEnabled": True}

    response = teams_app.post(
        _feedback(
            teams_app,
            question,
            answer_id,
            reaction="dislike",
            feedback=json.dumps({"feedbackText": "It skipped the MFA step."}),
        )
    )
    assert response.status_code == 200

    def mine() -> list[tuple[str, str, dict[str, Any]]]:
        records = [(t, u, json.loads(d)) for t, u, d in teams_app.audit("chat.feedback")]
        return [r for r in records if r[2]["comment"] == "It skipped the MFA step."]

    [(tenant, user, data)] = mine()
    assert (tenant, user, data["rating"], data["previous"]) == (
        TEAMS_TENANT,
        "ana",
        "negative",
        None,
    )
    assert data["prompt"] == "grounded_answer@v1"
    stored = teams_app.conversation_messages(data["conversation_id"])
    assert stored[-1] == (data["message_id"], "assistant", "complete")

    # The same click again is not recorded again; another member's click on Ana's answer
    # is not theirs to give.
    before = len(teams_app.audit("chat.feedback"))
    again = _feedback(
        teams_app,
        question,
        answer_id,
        reaction="dislike",
        feedback=json.dumps({"feedbackText": "It skipped the MFA step."}),
    )
    assert teams_app.post(again).status_code == 200
    other = _feedback(teams_app, question, answer_id, user="ben", reaction="like", feedback="")
    assert teams_app.post(other).status_code == 200
    assert len(teams_app.audit("chat.feedback")) == before
    assert len(mine()) == 1


def test_a_like_on_a_streamed_answer_names_the_stream(teams_app: TeamsApp) -> None:
    teams_app.simulator.reset()
    question = teams_app.activity(text="Where is the VPN guide?")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202
    _, final = teams_app.wait_for(conversation, lambda c: c.body["type"] == "message")
    stream_id = _stream_id(final.body)
    assert stream_id is not None
    assert final.body["channelData"] == {"feedbackLoopEnabled": True}

    before = len(teams_app.audit("chat.feedback"))
    response = teams_app.post(
        _feedback(teams_app, question, stream_id, reaction="like", feedback="")
    )
    assert response.status_code == 200
    records = teams_app.audit("chat.feedback")
    assert len(records) == before + 1
    data = json.loads(records[-1][2])
    assert (data["rating"], data["comment"]) == ("positive", None)
    assert teams_app.conversation_messages(data["conversation_id"])[-1][0] == data["message_id"]


def test_feedback_on_a_message_that_is_not_an_answer_is_not_stored(teams_app: TeamsApp) -> None:
    before = len(teams_app.audit("chat.feedback"))
    question = teams_app.activity()
    response = teams_app.post(
        _feedback(teams_app, question, "someone-elses-message", reaction="like", feedback="")
    )
    assert response.status_code == 200
    assert len(teams_app.audit("chat.feedback")) == before
