"""Feedback buttons on every answer, and a like or dislike stored against the reply it
rates (an audit record ``teams.feedback``)."""

from __future__ import annotations

import json
from typing import Any

from tests.client_api.teams.conftest import TeamsApp
from tests.support.bot_framework import TEAMS_TENANT


def _stream_id(body: dict[str, Any]) -> str | None:
    info = [e for e in body.get("entities") or [] if e.get("type") == "streaminfo"]
    return info[0].get("streamId") if info else None


def _feedback(
    app: TeamsApp, question: dict[str, Any], reply_to: str, **value: Any
) -> dict[str, Any]:
    return app.activity(
        user="ana",
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

    records = [
        (tenant, user, json.loads(data)) for tenant, user, data in teams_app.audit("teams.feedback")
    ]
    mine = [r for r in records if r[2]["text"] == "It skipped the MFA step."]
    assert len(mine) == 1
    tenant, user, data = mine[0]
    assert (tenant, user, data["reaction"]) == (TEAMS_TENANT, "ana", "dislike")
    stored = teams_app.conversation_messages(data["conversation_id"])
    assert stored[-1] == (data["message_id"], "assistant", "complete")


def test_a_like_on_a_streamed_answer_names_the_stream(teams_app: TeamsApp) -> None:
    teams_app.simulator.reset()
    question = teams_app.activity(text="Where is the VPN guide?")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202
    _, final = teams_app.wait_for(conversation, lambda c: c.body["type"] == "message")
    stream_id = _stream_id(final.body)
    assert stream_id is not None
    assert final.body["channelData"] == {"feedbackLoopEnabled": True}

    before = len(teams_app.audit("teams.feedback"))
    response = teams_app.post(
        _feedback(teams_app, question, stream_id, reaction="like", feedback="")
    )
    assert response.status_code == 200
    records = teams_app.audit("teams.feedback")
    assert len(records) == before + 1
    data = json.loads(records[-1][2])
    assert (data["reaction"], data["text"]) == ("like", "")
    assert teams_app.conversation_messages(data["conversation_id"])[-1][0] == data["message_id"]


def test_feedback_on_a_message_that_is_not_an_answer_is_not_stored(teams_app: TeamsApp) -> None:
    before = len(teams_app.audit("teams.feedback"))
    question = teams_app.activity()
    response = teams_app.post(
        _feedback(teams_app, question, "someone-elses-message", reaction="like", feedback="")
    )
    assert response.status_code == 200
    assert len(teams_app.audit("teams.feedback")) == before
