"""A user's own conversations: list, read, delete. Others' conversations are 404."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from client_api.auth.dependencies import ConversationsCaller
from client_api.problems import Problem
from client_api.routes.deps import ServicesDep
from client_api.schemas import (
    ConversationDetail,
    ConversationList,
    ConversationSummary,
    MessageView,
)

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

_NOT_FOUND = Problem(404, "Not found", "No such conversation.")


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


@router.get("/{conversation_id}", response_model=ConversationDetail, summary="Read one")
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


@router.delete("/{conversation_id}", status_code=204, summary="Delete one, with its messages")
async def delete_conversation(
    conversation_id: str, principal: ConversationsCaller, services: ServicesDep
) -> Response:
    if not await services.conversations.delete(principal, conversation_id):
        raise _NOT_FOUND
    return Response(status_code=204)
