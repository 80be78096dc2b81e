"""The Microsoft AI chat protocol: ``POST /chat`` (JSON) and ``POST /chat/stream`` (NDJSON).

This is the protocol of the Azure RAG sample frontends (azure-search-openai-demo and
the ai-chat-protocol web components), so those frontends can point at Lamina. The
request carries ``messages``, ``context.overrides`` and ``session_state``; the answer
carries the assistant's ``message`` and a ``context`` of ``data_points`` (the passages
the answer cites), ``thoughts`` (the plan and its steps, as the frontends' thought
process tab shows them) and ``followup_questions``.

The assistant answers as on ``/v1/chat`` (retrieval under the caller's identity, tools
behind their policy and approvals), with the same permission and edge policies.
``session_state`` is the Lamina conversation id: a frontend sends back what it got, and
the conversation continues. ``docs/protocols.md`` has the full mapping.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Annotated, Any, Literal

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from client_api.auth.dependencies import ChatCaller
from client_api.composition import Services
from client_api.edge.admission import check_tokens
from client_api.problems import AUTHENTICATED_PROBLEMS, Problem, problem_responses
from client_api.routes.chat import TURN_PROBLEMS
from client_api.routes.deps import ServicesDep
from client_api.routes.openai_compat import approval_notice
from intelligence.contracts import (
    AnswerDelta,
    ApprovalRequiredEvent,
    Citation,
    CitationsEvent,
    DoneEvent,
    ErrorEvent,
    Plan,
    PlanEvent,
    PlanStep,
    Principal,
    StartedTurn,
    StepEvent,
    StepKind,
    StepOutcome,
    TurnEvent,
    TurnRequest,
    collect_turn,
)

router = APIRouter(tags=["ai-chat-protocol"], responses=problem_responses(*AUTHENTICATED_PROBLEMS))

NDJSON = "application/x-ndjson"


class ProtocolMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant", "system"]
    content: str


class ProtocolContext(BaseModel):
    model_config = ConfigDict(extra="ignore")

    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Accepted and ignored (top, temperature, retrieval_mode, "
        "suggest_followup_questions, ...): retrieval and model parameters are the "
        "operator's policy in Lamina, not the client's",
    )


class ProtocolRequest(BaseModel):
    """A chat request of the AI chat protocol."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ProtocolMessage] = Field(
        min_length=1,
        description="The conversation as the frontend holds it; the last message is the "
        "user's question. The assistant sees the stored history of session_state.",
    )
    context: ProtocolContext = Field(default_factory=ProtocolContext)
    session_state: str | None = Field(
        default=None,
        max_length=64,
        description="The conversation id a previous answer returned; null starts a new one",
    )


_STREAM_DOC = """Newline-delimited JSON (`application/x-ndjson`), one object a line:

- first `{"delta": {"role": "assistant"}, "context": {"data_points": {"text": []},
  "thoughts": [...]}, "session_state": "<conversation id>"}` (the plan and the steps that
  ran before the answer)
- then `{"delta": {"role": "assistant", "content": "..."}}` for each piece of the answer
- last `{"delta": {"role": "assistant"}, "context": {"data_points": {"text": [...]},
  "thoughts": [...], "followup_questions": []}, "session_state": "..."}` (the cited
  passages; `context.approval` too when the turn paused for a person's approval)
- or, when the answer fails after the stream began, `{"error": "..."}` and nothing more

Errors found before the stream begins (authentication, validation, caps, an unknown
`session_state`) are returned as `application/problem+json` with their HTTP status."""


@router.post("/chat", summary="AI chat protocol: ask a question (JSON)", responses=TURN_PROBLEMS)
async def chat(
    body: Annotated[ProtocolRequest, Body()],
    request: Request,
    principal: ChatCaller,
    services: ServicesDep,
) -> dict[str, Any]:
    started = await _start(body, request, principal, services)
    result = await collect_turn(started.events)
    thoughts = _plan_thoughts(result.plan) + [
        _step_thought(step, outcome)
        for step in result.plan.steps
        if (outcome := _outcome_of(step, result.steps)) is not None
    ]
    context = _final_context(result.citations, thoughts, result.approval)
    content = approval_notice(result.approval) if result.approval else result.answer
    return {
        "message": {"role": "assistant", "content": content},
        "context": context,
        "session_state": result.conversation_id,
    }


@router.post(
    "/chat/stream",
    summary="AI chat protocol: ask a question, answer streamed as NDJSON",
    description=_STREAM_DOC,
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {"schema": {"type": "string"}}}}, **TURN_PROBLEMS},
)
async def chat_stream(
    body: Annotated[ProtocolRequest, Body()],
    request: Request,
    principal: ChatCaller,
    services: ServicesDep,
) -> StreamingResponse:
    started = await _start(body, request, principal, services)
    return StreamingResponse(
        _lines(started), media_type=NDJSON, headers={"Cache-Control": "no-cache"}
    )


async def _start(
    body: ProtocolRequest, request: Request, principal: Principal, services: Services
) -> StartedTurn:
    """The edge's policies for a chat turn, as /v1/chat applies them, then the turn
    (its question stored) before any response starts: every refusal is an HTTP error."""
    question = _question(body.messages)
    await services.caps.check_message(question)
    await check_tokens(request, principal)
    return await services.assistant.start_turn(
        TurnRequest(
            message=question,
            conversation_id=body.session_state,
            correlation_id=correlation_id.get(),
        ),
        principal,
    )


def _question(messages: Sequence[ProtocolMessage]) -> str:
    last = messages[-1]
    if last.role != "user" or not last.content.strip():
        raise Problem(422, "Invalid request", "The last message must be the user's question.")
    return last.content


async def _lines(started: StartedTurn) -> AsyncIterator[bytes]:
    events: AsyncGenerator[TurnEvent, None] = started.events
    plan: Plan | None = None
    thoughts: list[dict[str, Any]] = []
    citations: tuple[Citation, ...] = ()
    opened = False

    def opening() -> bytes:
        context = {"data_points": {"text": []}, "thoughts": _plan_thoughts(plan) + thoughts}
        return _line(
            {
                "delta": {"role": "assistant"},
                "context": context,
                "session_state": started.conversation_id,
            }
        )

    async with aclosing(events) as turn:
        async for event in turn:
            match event:
                case PlanEvent():
                    plan = event.plan
                case StepEvent(outcome=StepOutcome() as outcome):
                    thoughts.append(_step_thought(event.step, outcome))
                case AnswerDelta() | ApprovalRequiredEvent() | DoneEvent() | ErrorEvent() if (
                    not opened
                ):
                    opened = True
                    yield opening()
            match event:
                case AnswerDelta():
                    yield _line({"delta": {"role": "assistant", "content": event.text}})
                case CitationsEvent():
                    citations = event.citations
                case ApprovalRequiredEvent():
                    notice = approval_notice(event)
                    yield _line({"delta": {"role": "assistant", "content": notice}})
                    context = _final_context((), _plan_thoughts(plan) + thoughts, event)
                    yield _closing(context, started.conversation_id)
                case DoneEvent():
                    context = _final_context(citations, _plan_thoughts(plan) + thoughts)
                    yield _closing(context, started.conversation_id)
                case ErrorEvent():
                    cid = correlation_id.get()
                    message = f"{event.message} (correlation id {cid})" if cid else event.message
                    yield _line({"error": message})
                    return


def _closing(context: dict[str, Any], conversation_id: str) -> bytes:
    return _line(
        {"delta": {"role": "assistant"}, "context": context, "session_state": conversation_id}
    )


def _final_context(
    citations: Sequence[Citation],
    thoughts: list[dict[str, Any]],
    approval: ApprovalRequiredEvent | None = None,
) -> dict[str, Any]:
    context: dict[str, Any] = {
        "data_points": _data_points(citations),
        "thoughts": thoughts,
        # Accepted for the frontends' sake; Lamina does not suggest follow-up questions.
        "followup_questions": [],
    }
    if approval is not None:
        context["approval"] = {
            "approval_id": approval.approval_id,
            "tool": approval.tool,
            "summary": approval.summary,
            "expires_at": approval.expires_at.isoformat(),
        }
    return context


def _data_points(citations: Sequence[Citation]) -> dict[str, Any]:
    """The cited passages, as the sample frontends list them: ``source: text`` strings
    (the ``[n]`` in front matches the answer's reference), and Lamina's citation objects."""
    return {
        "text": [f"[{c.ref}] {c.source}: {c.snippet}" for c in citations],
        "citations": [
            {
                "ref": c.ref,
                "source": c.source,
                "title": c.title,
                "document_id": c.document_id,
                "chunk_id": c.chunk_id,
                "page": c.page,
                "section": c.section,
            }
            for c in citations
        ],
    }


def _plan_thoughts(plan: Plan | None) -> list[dict[str, Any]]:
    if plan is None:
        return []
    description = plan.rationale or f"{len(plan.steps)} step(s)"
    return [{"title": "Plan", "description": description, "props": {"planner": plan.planner}}]


def _step_thought(step: PlanStep, outcome: StepOutcome) -> dict[str, Any]:
    props: dict[str, Any] = {
        "step": step.id,
        "kind": step.kind.value,
        "status": outcome.status.value,
    }
    if step.kind is StepKind.RETRIEVE:
        props["query"] = step.query
    elif step.kind is StepKind.CALL_TOOL:
        props["tool"] = step.tool
    return {"title": step.description, "description": outcome.summary, "props": props}


def _outcome_of(step: PlanStep, outcomes: Sequence[StepOutcome]) -> StepOutcome | None:
    return next((o for o in outcomes if o.step_id == step.id), None)


def _line(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload) + b"\n"
