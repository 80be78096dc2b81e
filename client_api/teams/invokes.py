"""Teams ``invoke`` activities the bot answers: feedback on an answer
(``message/submitAction``) and a click on an approval card (``adaptiveCard/action``).

A like or dislike is the rater's rating of the Lamina reply the Teams message carries,
stored as a rating through the API is (:meth:`Assistant.feedback`: one per person and
answer, audited as ``chat.feedback`` when it changes).

An invoke is answered in the HTTP response itself (Teams waits about five seconds for
it), so both are handled inline; only a resumed turn's answer goes on in the background.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from asgi_correlation_id import correlation_id
from fastapi import Response
from fastapi.responses import JSONResponse
from microsoft_agents.activity import Activity
from microsoft_agents.hosting.core import ClaimsIdentity

from client_api.auth.groups import GroupsUnavailable
from client_api.auth.permissions import PermissionDenied
from client_api.teams.cards import ApprovalClick, card_invoke_response, decided_card
from client_api.teams.conversations import TeamsConversationMap
from intelligence.contracts import (
    ApprovalDecisionRequest,
    ApprovalsUnavailable,
    Assistant,
    IntelligenceError,
    Principal,
    ResumedTurn,
    TurnFeedback,
)
from tools.contracts import (
    ApprovalConflict,
    ApprovalDecision,
    ApprovalNotFound,
    ApprovalStatus,
    ToolError,
)

log = logging.getLogger(__name__)

FEEDBACK_INVOKE = "message/submitAction"
CARD_ACTION_INVOKE = "adaptiveCard/action"
_FEEDBACK_TEXT_CHARS = 2000

NOT_ALLOWED = "You may not decide this approval: only the requester or an approver can."
EXPIRED = "This approval has expired; nothing was run."
ALREADY_DECIDED = "This approval was already decided."
UNAVAILABLE = "Approvals are not enabled here."
CANNOT_DECIDE = "I could not record your decision. Please try again in a moment."


@dataclass(frozen=True, slots=True)
class Feedback:
    """A like or dislike on one of the bot's messages, with the user's optional text."""

    teams_message_id: str
    reaction: Literal["like", "dislike"]
    text: str

    @classmethod
    def parse(cls, activity: Activity) -> Feedback | None:
        """The feedback in a ``message/submitAction`` invoke; ``None`` for another
        action or a malformed one."""
        value = activity.value
        if not isinstance(value, Mapping) or value.get("actionName") != "feedback":
            return None
        action = value.get("actionValue")
        if not isinstance(action, Mapping):
            return None
        reaction = action.get("reaction")
        if reaction not in ("like", "dislike") or not activity.reply_to_id:
            return None
        return cls(activity.reply_to_id, reaction, _feedback_text(action.get("feedback")))


def _feedback_text(raw: Any) -> str:
    # Teams sends the form as a JSON string: {"feedbackText": "..."}.
    try:
        form = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return ""
    text = form.get("feedbackText") if isinstance(form, Mapping) else None
    return text[:_FEEDBACK_TEXT_CHARS] if isinstance(text, str) else ""


PrincipalOf = Callable[[Activity], Awaitable[Principal]]
ResumeIn = Callable[[ClaimsIdentity, Activity, ResumedTurn], None]


class TeamsInvokes:
    """Answers the invokes; ``principal`` resolves the clicking user as for a message,
    ``resume`` carries a resumed turn on in the background."""

    def __init__(
        self,
        assistant: Assistant,
        conversations: TeamsConversationMap,
        *,
        principal: PrincipalOf,
        resume: ResumeIn,
    ) -> None:
        self._assistant = assistant
        self._conversations = conversations
        self._principal = principal
        self._resume = resume

    async def handle(self, identity: ClaimsIdentity, activity: Activity) -> Response:
        if activity.name == FEEDBACK_INVOKE:
            return await self._feedback(activity)
        if activity.name == CARD_ACTION_INVOKE:
            click = ApprovalClick.parse(activity.value)
            if click is not None:
                return await self._decide(identity, activity, click)
        # As the SDK answers an invoke nobody handled.
        return Response(status_code=501)

    async def _feedback(self, activity: Activity) -> Response:
        feedback = Feedback.parse(activity)
        tenant = activity.conversation.tenant_id if activity.conversation else None
        user = activity.from_property.aad_object_id if activity.from_property else None
        if feedback is None or not tenant or not user:
            return Response(status_code=400)
        reply = await self._conversations.reply_of(
            tenant, activity.conversation.id, feedback.teams_message_id
        )
        if reply is None:
            # Not an answer of ours (or posted before replies were remembered).
            log.info("Teams feedback on an unknown message %s", feedback.teams_message_id)
            return Response(status_code=200)
        rating = TurnFeedback(
            reply.conversation_id,
            reply.message_id,
            "positive" if feedback.reaction == "like" else "negative",
            feedback.text or None,
            correlation_id.get(),
        )
        # Only the asker's own answers are theirs to rate (in a group chat, another
        # member's like on it is not stored).
        rater = Principal(tenant_id=tenant, user_id=user)
        if not await self._assistant.feedback(rating, rater):
            log.info("Teams feedback on an answer not the rater's (%s)", reply.message_id)
        return Response(status_code=200)

    async def _decide(
        self, identity: ClaimsIdentity, activity: Activity, click: ApprovalClick
    ) -> Response:
        try:
            principal = await self._principal(activity)
            resumed = await self._assistant.decide(
                ApprovalDecisionRequest(
                    click.approval_id, click.decision, correlation_id=correlation_id.get()
                ),
                principal,
            )
        except (ApprovalNotFound, PermissionDenied):
            return _card_answer(click, NOT_ALLOWED, actions=True)
        except ApprovalConflict as exc:
            expired = exc.status is ApprovalStatus.EXPIRED
            return _card_answer(click, EXPIRED if expired else ALREADY_DECIDED, actions=False)
        except ApprovalsUnavailable:
            return _card_answer(click, UNAVAILABLE, actions=False)
        except (GroupsUnavailable, ToolError, IntelligenceError) as exc:
            log.error("Teams: approval %s not decided: %r", click.approval_id, exc)
            return _card_answer(click, CANNOT_DECIDE, actions=True)
        self._resume(identity, activity, resumed)
        who = principal.name or "you"
        verb = "Approved" if click.decision is ApprovalDecision.APPROVE else "Rejected"
        return _card_answer(click, f"{verb} by {who}.", actions=False)


def _card_answer(click: ApprovalClick, outcome: str, *, actions: bool) -> Response:
    card = decided_card(click.call, outcome, actions=actions)
    return JSONResponse(card_invoke_response(card), status_code=200)
