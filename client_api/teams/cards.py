"""The approval card: a paused turn's high-risk call, shown as an Adaptive Card with
Approve and Reject buttons, and the card that replaces it once someone clicked.

The buttons are ``Action.Execute`` (Universal Actions): Teams sends a click to the bot as
an ``invoke`` named ``adaptiveCard/action``, and shows the card the bot answers with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from microsoft_agents.activity import Attachment

from intelligence.contracts import ApprovalRequiredEvent
from tools.contracts import ApprovalDecision

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
APPROVAL_VERB = "lamina.approval"
PENDING = "Waiting for a decision: the requester, or an approver of their organisation."
_ARGUMENT_CHARS = 300
_ARGUMENTS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class ApprovalCall:
    """What the card shows of the call to approve."""

    approval_id: str
    tool: str
    summary: str
    arguments: Mapping[str, Any]
    expires_at: datetime

    @classmethod
    def of(cls, event: ApprovalRequiredEvent) -> ApprovalCall:
        return cls(event.approval_id, event.tool, event.summary, event.arguments, event.expires_at)


@dataclass(frozen=True, slots=True)
class ApprovalClick:
    """A click on the card's Approve or Reject button."""

    approval_id: str
    decision: ApprovalDecision
    call: ApprovalCall | None
    """What the clicked card showed (carried in the button's data), to draw its successor."""

    @classmethod
    def parse(cls, value: Any) -> ApprovalClick | None:
        """The click in an ``adaptiveCard/action`` invoke's value; ``None`` when it is not
        one of ours or is malformed."""
        action = value.get("action") if isinstance(value, Mapping) else None
        if not isinstance(action, Mapping) or action.get("verb") != APPROVAL_VERB:
            return None
        data = action.get("data")
        if not isinstance(data, Mapping):
            return None
        approval_id, decision = data.get("approval_id"), data.get("decision")
        if not isinstance(approval_id, str) or not approval_id:
            return None
        if decision not in (ApprovalDecision.APPROVE, ApprovalDecision.REJECT):
            return None
        return cls(approval_id, ApprovalDecision(decision), _call_of(approval_id, data))


def approval_card(call: ApprovalCall) -> Attachment:
    """The card asking for a decision, with Approve and Reject."""
    return _attachment(_card(call, PENDING, actions=True))


def decided_card(call: ApprovalCall | None, outcome: str, *, actions: bool) -> dict[str, Any]:
    """The card that replaces the clicked one: ``outcome`` says what happened; the
    buttons stay (``actions``) when the approval is still open to someone else."""
    if call is None:
        return _card_body([_text(outcome, weight="Bolder")], [])
    return _card(call, outcome, actions=actions)


def card_invoke_response(card: dict[str, Any]) -> dict[str, Any]:
    """The body answering an ``adaptiveCard/action`` invoke with ``card``."""
    return {"statusCode": 200, "type": CARD_CONTENT_TYPE, "value": card}


def _card(call: ApprovalCall, status: str, *, actions: bool) -> dict[str, Any]:
    body: list[dict[str, Any]] = [
        _text("Approval needed", weight="Bolder", size="Medium"),
        _text(call.summary),
        {
            "type": "FactSet",
            "facts": [
                {"title": "Tool", "value": call.tool},
                {"title": "Expires", "value": _when(call.expires_at)},
            ],
        },
    ]
    if call.arguments:
        body.append(_text("Arguments", weight="Bolder"))
        body.append(
            {
                "type": "FactSet",
                "facts": [
                    {"title": str(name), "value": _argument(value)}
                    for name, value in list(call.arguments.items())[:_ARGUMENTS_SHOWN]
                ],
            }
        )
    body.append(_text(status, weight="Bolder"))
    buttons = (
        [
            _button("Approve", call, ApprovalDecision.APPROVE, "positive"),
            _button("Reject", call, ApprovalDecision.REJECT, "destructive"),
        ]
        if actions
        else []
    )
    return _card_body(body, buttons)


def _card_body(body: list[dict[str, Any]], actions: list[dict[str, Any]]) -> dict[str, Any]:
    card: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5",
        "body": body,
    }
    if actions:
        card["actions"] = actions
    return card


def _button(
    title: str, call: ApprovalCall, decision: ApprovalDecision, style: str
) -> dict[str, Any]:
    return {
        "type": "Action.Execute",
        "title": title,
        "verb": APPROVAL_VERB,
        "style": style,
        # The card's own content rides along, so the answer to a click can redraw it
        # without reading the approval (which the clicker may not be allowed to see).
        "data": {
            "approval_id": call.approval_id,
            "decision": decision.value,
            "tool": call.tool,
            "summary": call.summary,
            "arguments": dict(call.arguments),
            "expires_at": call.expires_at.astimezone(UTC).isoformat(),
        },
    }


def _call_of(approval_id: str, data: Mapping[str, Any]) -> ApprovalCall | None:
    tool, summary, arguments = data.get("tool"), data.get("summary"), data.get("arguments")
    try:
        expires_at = datetime.fromisoformat(str(data.get("expires_at")))
    except ValueError:
        return None
    if not isinstance(tool, str) or not isinstance(summary, str):
        return None
    if not isinstance(arguments, Mapping):
        return None
    return ApprovalCall(approval_id, tool, summary, arguments, expires_at)


def _text(text: str, **style: str) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "wrap": True, **style}


def _when(at: datetime) -> str:
    # Teams renders DATE/TIME in the reader's locale and time zone.
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{{{{DATE({stamp}, SHORT)}}}} {{{{TIME({stamp})}}}}"


def _argument(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _ARGUMENT_CHARS else text[: _ARGUMENT_CHARS - 1] + "…"


def _attachment(card: dict[str, Any]) -> Attachment:
    return Attachment(content_type=CARD_CONTENT_TYPE, content=card)
