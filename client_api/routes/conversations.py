"""A user's own conversations: list, read, rename, delete; how one of their answers was
produced (explain), and their rating of it (feedback). Others' conversations are 404."""

from __future__ import annotations

from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Query, Response

from client_api.audit_events import record_action
from client_api.auth.dependencies import ConversationsCaller
from client_api.problems import (
    AUTHENTICATED_PROBLEMS,
    BODY_PROBLEMS,
    Problem,
    problem_responses,
)
from client_api.routes.deps import ServicesDep
from client_api.schemas import (
    ConversationDetail,
    ConversationList,
    ConversationSummary,
    FeedbackBody,
    MessageView,
    RenameConversationBody,
    TurnExplanationView,
)
from intelligence.contracts import TurnFeedback

router = APIRouter(
    prefix="/v1/conversations",
    tags=["conversations"],
    responses=problem_responses(*AUTHENTICATED_PROBLEMS),
)

_NOT_FOUND = Problem(404, "Not found", "No such conversation.")
_NO_TURN = Problem(
    404,
    "Not found",
    "No recorded answer with this id in this conversation (it may still be running).",
)
_UNKNOWN = problem_responses(described={404: "No such conversation of the caller's"})
_UNKNOWN_TURN = problem_responses(
    described={404: "No such answer in a conversation of the caller's"}
)


@router.get("", response_model=ConversationList, summary="List my conversations, newest first")
async def list_conversations(
    principal: ConversationsCaller,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ConversationList:
    try:
        page = await services.conversations.list_conversations(
            principal, limit=limit, cursor=cursor
        )
    except ValueError:
        raise Problem(422, "Invalid request", "The cursor is not valid.") from None
    return ConversationList(
        items=[ConversationSummary.of(c) for c in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/{conversation_id}",
    response_model=ConversationDetail,
    summary="Read one",
    responses=_UNKNOWN,
)
async def get_conversation(
    conversation_id: str, principal: ConversationsCaller, services: ServicesDep
) -> ConversationDetail:
    conversation = await services.conversations.get(principal, conversation_id)
    if conversation is None:
        raise _NOT_FOUND
    messages = await services.conversations.messages(principal, conversation_id)
    summary = ConversationSummary.of(conversation)
    return ConversationDetail(
        **summary.model_dump(), messages=[MessageView.of(m) for m in messages]
    )


@router.delete(
    "/{conversation_id}",
    status_code=204,
    summary="Delete one, with its messages",
    responses=_UNKNOWN,
)
async def delete_conversation(
    conversation_id: str, principal: ConversationsCaller, services: ServicesDep
) -> Response:
    if not await services.conversations.delete(principal, conversation_id):
        raise _NOT_FOUND
    await record_action(
        services.audit, "conversation.deleted", principal, {"conversation_id": conversation_id}
    )
    return Response(status_code=204)


@router.patch(
    "/{conversation_id}",
    response_model=ConversationSummary,
    summary="Rename one",
    responses={**_UNKNOWN, **problem_responses(*BODY_PROBLEMS)},
)
async def rename_conversation(
    conversation_id: str,
    body: RenameConversationBody,
    principal: ConversationsCaller,
    services: ServicesDep,
) -> ConversationSummary:
    if not await services.conversations.rename(principal, conversation_id, body.title.strip()):
        raise _NOT_FOUND
    conversation = await services.conversations.get(principal, conversation_id)
    if conversation is None:  # deleted between the two calls
        raise _NOT_FOUND
    return ConversationSummary.of(conversation)


@router.get(
    "/{conversation_id}/turns/{turn_id}/explain",
    response_model=TurnExplanationView,
    summary="How one of my answers was produced: plan, steps, sources, models, policy",
    responses=_UNKNOWN_TURN,
)
async def explain_turn(
    conversation_id: str, turn_id: str, principal: ConversationsCaller, services: ServicesDep
) -> TurnExplanationView:
    explanation = await services.assistant.explain(principal, conversation_id, turn_id)
    if explanation is None:
        raise _NO_TURN
    return TurnExplanationView.of(explanation)


@router.post(
    "/{conversation_id}/turns/{turn_id}/feedback",
    status_code=204,
    summary="Rate one of my answers (positive or negative, with an optional comment)",
    responses={**_UNKNOWN_TURN, **problem_responses(*BODY_PROBLEMS)},
)
async def rate_turn(
    conversation_id: str,
    turn_id: str,
    body: FeedbackBody,
    principal: ConversationsCaller,
    services: ServicesDep,
) -> Response:
    feedback = TurnFeedback(
        conversation_id, turn_id, body.rating, body.comment, correlation_id.get()
    )
    if not await services.assistant.feedback(feedback, principal):
        raise _NO_TURN
    return Response(status_code=204)
