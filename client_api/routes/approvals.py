"""Human approval of high-risk tool calls: list what waits, decide, and resume the turn.

A turn that reaches a high-risk tool call pauses with an ``approval_required``
event. The requester, or anyone of their tenant with an approver role
(``LAMINA_TOOLS__APPROVALS__APPROVER_ROLES``), decides here; the decision resumes
the turn where it stopped, and the tool runs at most once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import APIRouter
from sse_starlette import EventSourceResponse

from client_api.auth.dependencies import ChatCaller
from client_api.composition import Services
from client_api.problems import AUTHENTICATED_PROBLEMS, BODY_PROBLEMS, problem_responses
from client_api.routes.chat import TURN_EVENTS, chat_answer, sse_content, sse_events
from client_api.routes.deps import ServicesDep
from client_api.schemas import (
    ApprovalDecisionBody,
    ApprovalList,
    ApprovalOutcome,
    ApprovalView,
)
from intelligence.contracts import (
    ApprovalDecisionRequest,
    ApprovalsUnavailable,
    Principal,
    ResumedTurn,
    TurnEvent,
    collect_turn,
)
from tools.contracts import ApprovalGate

router = APIRouter(
    prefix="/v1/approvals",
    tags=["approvals"],
    responses=problem_responses(
        *AUTHENTICATED_PROBLEMS, described={404: "No such approval, or approvals are off"}
    ),
)

_DECISION_PROBLEMS = problem_responses(
    *BODY_PROBLEMS,
    described={
        409: "The approval was already settled or has expired",
        502: "The resumed turn's answer could not be produced",
    },
)


def _gate(services: Services) -> ApprovalGate:
    if services.approvals is None:
        raise ApprovalsUnavailable("High-risk tools need an approval gate; none is configured.")
    return services.approvals


@router.get("", response_model=ApprovalList, summary="Pending approvals I may decide")
async def list_approvals(principal: ChatCaller, services: ServicesDep) -> ApprovalList:
    pending = await _gate(services).pending(principal)
    return ApprovalList(items=[ApprovalView.of(approval) for approval in pending])


@router.get("/{approval_id}", response_model=ApprovalView, summary="One approval")
async def get_approval(
    approval_id: str, principal: ChatCaller, services: ServicesDep
) -> ApprovalView:
    return ApprovalView.of(await _gate(services).get(approval_id, principal))


@router.post(
    "/{approval_id}",
    response_model=ApprovalOutcome,
    summary="Approve, edit or reject; the paused turn resumes",
    description="The requester gets the resumed turn's answer; an approver deciding for "
    "someone else gets the decision only (the answer is stored in the requester's "
    "conversation). 409 when the approval was already settled or has expired.",
    responses=_DECISION_PROBLEMS,
)
async def decide(
    approval_id: str, body: ApprovalDecisionBody, principal: ChatCaller, services: ServicesDep
) -> ApprovalOutcome:
    resumed = await _resume(approval_id, body, principal, services)
    if not resumed.for_requester:
        await _drain(resumed.events)
        answer = None
    else:
        answer = chat_answer(await collect_turn(resumed.events))
    # As it stands now the turn went on: executed (or rejected), not just decided.
    settled = await _gate(services).get(approval_id, principal)
    return ApprovalOutcome(approval=ApprovalView.of(settled), answer=answer)


@router.post(
    "/{approval_id}/stream",
    summary="Approve, edit or reject; the resumed turn streams as server-sent events",
    description="The same events as POST /v1/chat/stream, after an `approval` event with "
    "the decision. An approver deciding for someone else gets only the `approval` event.",
    response_class=EventSourceResponse,
    responses={200: {"content": sse_content("approval", *TURN_EVENTS)}, **_DECISION_PROBLEMS},
)
async def decide_stream(
    approval_id: str, body: ApprovalDecisionBody, principal: ChatCaller, services: ServicesDep
) -> EventSourceResponse:
    resumed = await _resume(approval_id, body, principal, services)
    return EventSourceResponse(_resumed_events(resumed), ping=15)


async def _resume(
    approval_id: str, body: ApprovalDecisionBody, principal: Principal, services: Services
) -> ResumedTurn:
    request = ApprovalDecisionRequest(
        approval_id=approval_id,
        decision=body.decision,
        arguments=body.arguments,
        reason=body.reason,
        correlation_id=correlation_id.get(),
    )
    return await services.assistant.decide(request, principal)


async def _resumed_events(resumed: ResumedTurn) -> AsyncIterator[dict[str, Any]]:
    view = ApprovalView.of(resumed.approval)
    yield {"event": "approval", "data": view.model_dump_json()}
    if not resumed.for_requester:
        await _drain(resumed.events)
        return
    async for event in sse_events(resumed.events):
        yield event


async def _drain(events: AsyncGenerator[TurnEvent, None]) -> None:
    """Run the requester's resumed turn to its end (it stores its own answer)."""
    async with aclosing(events) as stream:
        async for _ in stream:
            pass
