"""A Teams turn that reaches a high-risk tool posts an approval card; clicking Approve
(an ``adaptiveCard/action`` invoke) decides through the same approval flow as the REST
API, runs the tool once and posts the resumed answer."""

from __future__ import annotations

from typing import Any

import httpx

from inferencing.simulator import ScriptedReply, ScriptedToolCall
from tests.client_api.teams.conftest import CLOSED, TeamsApp
from tests.support.bot_framework import ConnectorCall

CARD = "application/vnd.microsoft.card.adaptive"


def _card(call: ConnectorCall) -> dict[str, Any] | None:
    cards = [a for a in call.body.get("attachments") or [] if a.get("contentType") == CARD]
    return cards[0]["content"] if cards else None


def _texts(card: dict[str, Any]) -> list[str]:
    return [b["text"] for b in card["body"] if b["type"] == "TextBlock"]


def _click(
    app: TeamsApp, question: dict[str, Any], card_id: str, button: dict[str, Any], user: str
) -> httpx.Response:
    return app.post(
        app.activity(
            user=user,
            conversation=question["conversation"]["id"],
            kind=question["conversation"]["conversationType"],
            type="invoke",
            name="adaptiveCard/action",
            replyToId=card_id,
            value={
                "action": {
                    "type": "Action.Execute",
                    "verb": button["verb"],
                    "data": button["data"],
                },
                "trigger": "manual",
            },
        )
    )


def _answered_card(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["statusCode"], body["type"]) == (200, CARD)
    return body["value"]  # type: ignore[no-any-return]


def test_approve_on_the_card_runs_the_tool_once_and_posts_the_answer(
    teams_app: TeamsApp,
) -> None:
    teams_app.simulator.reset()
    teams_app.simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="close_ticket", arguments={"ticket": "T-17"})]
        )
    )
    question = teams_app.activity(text="Please close ticket T-17.")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202

    card_id, posted = teams_app.wait_for(conversation, lambda c: _card(c) is not None)
    card = _card(posted)
    assert card is not None and card["version"] == "1.5"
    facts = {
        f["title"]: f["value"] for b in card["body"] if b["type"] == "FactSet" for f in b["facts"]
    }
    assert facts["Tool"] == "close_ticket" and facts["ticket"] == "T-17"
    assert "{{DATE(" in facts["Expires"]
    approve, reject = card["actions"]
    assert [a["type"] for a in (approve, reject)] == ["Action.Execute"] * 2
    assert {a["verb"] for a in (approve, reject)} == {"lamina.approval"}
    assert (approve["data"]["decision"], reject["data"]["decision"]) == ("approve", "reject")
    assert CLOSED == []

    # Someone else of the tenant, without an approver role, may not decide it.
    refused = _answered_card(_click(teams_app, question, card_id, approve, user="bob"))
    assert any("may not decide" in t for t in _texts(refused))
    assert refused["actions"]  # still open to the requester
    assert CLOSED == []

    teams_app.simulator.script(
        ScriptedReply(content="Done."), ScriptedReply(content="Ticket T-17 is closed.")
    )
    approved = _answered_card(_click(teams_app, question, card_id, approve, user="ana"))
    assert "Approved by Ana." in _texts(approved)
    assert "actions" not in approved
    _, answer = teams_app.wait_for(
        conversation,
        lambda c: c.body["type"] == "message" and "T-17 is closed" in (c.body.get("text") or ""),
    )
    assert answer.activity_id == card_id  # threaded under the card
    assert CLOSED == ["T-17"]

    again = _answered_card(_click(teams_app, question, card_id, approve, user="ana"))
    assert "This approval was already decided." in _texts(again)
    assert "actions" not in again
    assert CLOSED == ["T-17"]


def test_reject_on_the_card_runs_nothing(teams_app: TeamsApp) -> None:
    teams_app.simulator.reset()
    teams_app.simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="close_ticket", arguments={"ticket": "T-99"})]
        )
    )
    question = teams_app.activity(kind="groupChat", text="Close ticket T-99.")
    conversation = question["conversation"]["id"]
    assert teams_app.post(question).status_code == 202
    card_id, posted = teams_app.wait_for(conversation, lambda c: _card(c) is not None)
    card = _card(posted)
    assert card is not None
    teams_app.simulator.script(
        ScriptedReply(content="Done."), ScriptedReply(content="I did not close T-99.")
    )
    rejected = _answered_card(_click(teams_app, question, card_id, card["actions"][1], user="ana"))
    assert "Rejected by Ana." in _texts(rejected)
    teams_app.wait_for(conversation, lambda c: "did not close T-99" in (c.body.get("text") or ""))
    assert "T-99" not in CLOSED
