"""POST /v1/chat (JSON) and POST /v1/chat/stream (server-sent events)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Header, Request, Response
from pydantic import TypeAdapter
from sse_starlette import EventSourceResponse

from client_api.auth.dependencies import ChatCaller
from client_api.composition import Services
from client_api.edge.admission import check_tokens
from client_api.problems import AUTHENTICATED_PROBLEMS, BODY_PROBLEMS, problem_responses
from client_api.routes.deps import ServicesDep
from client_api.schemas import ChatAnswer, ChatRequestBody
from intelligence.contracts import (
    CacheOutcome,
    ErrorEvent,
    Principal,
    TurnEvent,
    TurnRequest,
    TurnResult,
    collect_turn,
)

router = APIRouter(
    prefix="/v1", tags=["chat"], responses=problem_responses(*AUTHENTICATED_PROBLEMS)
)

TURN_PROBLEMS = problem_responses(
    *BODY_PROBLEMS,
    described={
        404: "No such conversation of the caller's",
        409: "A turn with this Idempotency-Key (or in this conversation) is still running",
        502: "The answer could not be produced",
    },
)
"""What starting a turn may answer besides the edge's refusals."""

TURN_EVENTS = ("plan", "step", "delta", "citations", "done", "approval_required", "error")


def sse_content(*events: str) -> dict[str, Any]:
    """The OpenAPI ``content`` of a server-sent event stream whose events are named
    ``events``, each with one JSON object as its data (``itemSchema``: one event)."""
    return {
        "text/event-stream": {
            "itemSchema": {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": list(events)},
                    "data": {"type": "string", "contentMediaType": "application/json"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer", "minimum": 0},
                },
            }
        }
    }


_EVENT: TypeAdapter[TurnEvent] = TypeAdapter(TurnEvent)

_STREAM_DOC = """Server-sent events, one JSON object per event; the SSE event name equals its
`type`:

- `plan` — the typed plan (`planner`, `steps`); sent again, extended, after each further
  round of planning (the model saw results and chose more steps)
- `step` — a step started (`outcome` null) or ended (`outcome.status`: ok, failed,
  refused, needs_approval)
- `delta` — a piece of answer text
- `citations` — the sources cited in the answer as `[n]`
- `done` — the answer is complete and stored (`conversation_id`, `message_id`, `usage`,
  `route`: the model deployment that answered, and why; `cache`: hit, miss or skipped,
  with the similarity)
- `approval_required` — the turn paused before a high-risk action (`approval_id`, `tool`,
  `arguments`, `summary`, `expires_at`); nothing follows. Decide with
  `POST /v1/approvals/{approval_id}` (or `/stream`), and the turn resumes there
- `error` — the turn failed after the stream began (`code`, `message`, `retryable`,
  `correlation_id`); no `done` follows

Errors found before the stream begins (authentication, validation, unknown
conversation) are returned as `application/problem+json` instead."""


IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_STATUS_HEADER = "X-Lamina-Idempotency"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Your unique key for this request (e.g. a UUID), so that sending it again "
        "never starts a second turn: the same key and body replay the stored answer, join the "
        "turn while it runs, or finish an interrupted one; the same key with another body is "
        "a 422, and a turn still running elsewhere a 409 (retry after `Retry-After`).",
    ),
]


@router.post(
    "/chat", response_model=ChatAnswer, summary="Ask a question (JSON)", responses=TURN_PROBLEMS
)
async def chat(
    body: ChatRequestBody,
    request: Request,
    response: Response,
    principal: ChatCaller,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> ChatAnswer:
    await _edge_checks(body, request, principal, services)
    started = await services.assistant.start_turn(_turn(body, idempotency_key), principal)
    if started.idempotency is not None:
        response.headers[IDEMPOTENCY_STATUS_HEADER] = started.idempotency
    result = await collect_turn(started.events)
    if result.cache is not None:
        response.headers[CACHE_HEADER] = cache_header(result.cache)
    return chat_answer(result)


def chat_answer(result: TurnResult) -> ChatAnswer:
    return ChatAnswer(
        conversation_id=result.conversation_id,
        message_id=result.message_id,
        answer=result.answer,
        citations=list(result.citations),
        plan=result.plan,
        steps=list(result.steps),
        usage=result.usage,
        route=result.route,
        cache=result.cache,
        approval=result.approval,
    )


@router.post(
    "/chat/stream",
    summary="Ask a question, answer streamed as server-sent events",
    description=_STREAM_DOC,
    response_class=EventSourceResponse,
    responses={200: {"content": sse_content(*TURN_EVENTS)}, **TURN_PROBLEMS},
)
async def chat_stream(
    body: ChatRequestBody,
    request: Request,
    principal: ChatCaller,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> EventSourceResponse:
    await _edge_checks(body, request, principal, services)
    # start_turn validates and persists the user message before the response
    # starts, so every refusal up to here is a proper HTTP error, never a 200.
    started = await services.assistant.start_turn(_turn(body, idempotency_key), principal)
    headers = {IDEMPOTENCY_STATUS_HEADER: started.idempotency} if started.idempotency else None
    return EventSourceResponse(sse_events(started.events), ping=15, headers=headers)


async def _edge_checks(
    body: ChatRequestBody, request: Request, principal: Principal, services: Services
) -> None:
    """Caps and token budget, before anything is stored or any model is called."""
    await services.caps.check_message(body.message)
    await check_tokens(request, principal)


CACHE_HEADER = "X-Lamina-Cache"


def cache_header(outcome: CacheOutcome) -> str:
    """``hit; similarity=0.9731``, ``miss; similarity=0.4120``, ``skipped; reason=multi_turn``."""
    parts: list[str] = [outcome.status]
    if outcome.similarity is not None:
        parts.append(f"similarity={outcome.similarity:.4f}")
    if outcome.reason:
        parts.append(f"reason={outcome.reason}")
    return "; ".join(parts)


def _turn(body: ChatRequestBody, idempotency_key: str | None = None) -> TurnRequest:
    return TurnRequest(
        message=body.message,
        conversation_id=body.conversation_id,
        correlation_id=correlation_id.get(),
        idempotency_key=idempotency_key,
    )


async def sse_events(events: AsyncGenerator[TurnEvent, None]) -> AsyncIterator[dict[str, Any]]:
    cid = correlation_id.get()
    # aclosing: when the client hangs up, the turn is closed at once and records
    # itself as interrupted, instead of waiting for garbage collection.
    async with aclosing(events) as turn_events:
        async for event in turn_events:
            payload = _EVENT.dump_python(event, mode="json")
            if isinstance(event, ErrorEvent):
                payload["correlation_id"] = cid
            yield {"event": event.type, "data": json.dumps(payload)}
