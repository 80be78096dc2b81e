"""One turn's events, written into Teams: the answer as it streams, its citations, and an
approval card when the turn pauses before a high-risk call."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from client_api.teams.cards import ApprovalCall, approval_card
from client_api.teams.conversations import PostedReply
from client_api.teams.replies import TeamsReply
from intelligence.contracts import (
    AnswerDelta,
    ApprovalRequiredEvent,
    CitationsEvent,
    DoneEvent,
    ErrorEvent,
    TurnEvent,
)

SORRY = "Sorry, I could not answer that. Please try again in a moment."


@dataclass(frozen=True, slots=True)
class PostedAnswer:
    """An answer posted in full: the Lamina reply, and the Teams messages carrying it."""

    reply: PostedReply
    teams_message_ids: tuple[str, ...]


async def relay_turn(
    events: AsyncGenerator[TurnEvent, None], reply: TeamsReply
) -> PostedAnswer | None:
    """Write the turn into ``reply``; the answer posted, or ``None`` when the turn failed
    or paused for an approval."""
    parts: list[str] = []
    citations: tuple[Any, ...] = ()
    async with aclosing(events) as stream:
        async for event in stream:
            match event:
                case AnswerDelta():
                    parts.append(event.text)
                    await reply.add(event.text)
                case CitationsEvent():
                    citations = event.citations
                case ErrorEvent():
                    await reply.fail(event.message)
                    return None
                case ApprovalRequiredEvent():
                    await reply.ask_approval(
                        f"Before I {event.summary}, someone has to approve it.",
                        approval_card(ApprovalCall.of(event)),
                    )
                    return None
                case DoneEvent():
                    ids = await reply.finish("".join(parts), citations)
                    return PostedAnswer(PostedReply(event.conversation_id, event.message_id), ids)
    await reply.fail(SORRY)
    return None
