"""A person's own data: ``GET /v1/me/data`` exports it, ``DELETE /v1/me/data`` erases it.

Both need the ``conversations`` permission (any signed-in user holds it) and a caller
who is a person: a delegated Entra token, or dev mode. An API key or an app-only token
stands for a service; its data is the operator's to manage, and erasing it would wipe
an integration's history on behalf of everyone who used it (403).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from asgi_correlation_id import correlation_id
from fastapi import APIRouter
from pydantic import BaseModel, Field

from client_api.auth.dependencies import ConversationsCaller
from client_api.auth.permissions import is_signed_in_user
from client_api.problems import AUTHENTICATED_PROBLEMS, Problem, problem_responses, retry_later
from client_api.routes.deps import ServicesDep
from intelligence.contracts import Principal
from intelligence.personal_data import PersonalDataIncomplete

router = APIRouter(
    prefix="/v1/me", tags=["me"], responses=problem_responses(*AUTHENTICATED_PROBLEMS)
)

_RETRY_AFTER_S = 5

_T = TypeVar("_T")


class MyDataExport(BaseModel):
    tenant_id: str
    user_id: str
    exported_at: datetime
    stores: dict[str, Any] = Field(
        description="One entry per store that keeps data about people: conversations, "
        "answer_cache, approvals, usage, …"
    )


class MyDataErased(BaseModel):
    tenant_id: str
    user_id: str
    erased: dict[str, int] = Field(
        description="How many items went, per store (usage: model calls no longer "
        "attributed to the caller)"
    )


_RESPONSES = problem_responses(
    described={
        403: "The caller is a service (API key, app-only token)",
        503: "Some stores could not answer; the problem names them",
    }
)


@router.get(
    "/data",
    response_model=MyDataExport,
    summary="Export everything stored about me, as JSON",
    responses=_RESPONSES,
)
async def export_my_data(principal: ConversationsCaller, services: ServicesDep) -> MyDataExport:
    stores = await _for_person(services.personal_data.export, principal)
    return MyDataExport(
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        exported_at=datetime.now(UTC),
        stores=stores,
    )


@router.delete(
    "/data",
    response_model=MyDataErased,
    summary="Erase everything stored about me",
    responses=_RESPONSES,
)
async def erase_my_data(principal: ConversationsCaller, services: ServicesDep) -> MyDataErased:
    erased = await _for_person(services.personal_data.erase, principal)
    return MyDataErased(tenant_id=principal.tenant_id, user_id=principal.user_id, erased=erased)


async def _for_person(
    action: Callable[[Principal, str | None], Awaitable[_T]], principal: Principal
) -> _T:
    """``action`` (export or erase) done for the caller, who must be a person; stores
    that could not answer make it a 503 that names them."""
    if not is_signed_in_user(principal):
        raise Problem(
            403,
            "Forbidden",
            "Only a signed-in person can export or erase their data; an API key or an "
            "app-only token stands for a service, whose data its operator manages.",
            extra={"code": "person_required"},
        )
    try:
        return await action(principal, correlation_id.get())
    except PersonalDataIncomplete as incomplete:
        raise _incomplete(incomplete) from None


def _incomplete(incomplete: PersonalDataIncomplete) -> Problem:
    extra: dict[str, Any] = {"code": incomplete.code, "failed_stores": list(incomplete.failed)}
    if incomplete.action == "erase":
        extra["erased"] = dict(incomplete.erased)
    return retry_later(
        503, "Try again shortly", incomplete.message, after_s=_RETRY_AFTER_S, extra=extra
    )
