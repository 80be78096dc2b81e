"""GET /v1/chunks/{chunk_id}: the full passage behind a citation, for the caller only.

A citation carries a snippet; a reader who opens it wants the passage. The lookup goes
through the security-trimmed retriever with the caller's identity, so a chunk the caller
may not read is indistinguishable from one that does not exist: both are the same 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from client_api.auth.dependencies import ChatCaller
from client_api.problems import AUTHENTICATED_PROBLEMS, Problem, problem_responses
from client_api.routes.deps import ServicesDep
from client_api.schemas import PassageView

router = APIRouter(
    prefix="/v1/chunks",
    tags=["chat"],
    responses=problem_responses(
        *AUTHENTICATED_PROBLEMS, described={404: "No such passage the caller may read"}
    ),
)

_NOT_FOUND = Problem(404, "Not found", "No such passage.")


@router.get("/{chunk_id}", response_model=PassageView, summary="Read a cited passage")
async def get_chunk(
    chunk_id: Annotated[str, Path(min_length=1, max_length=512)],
    principal: ChatCaller,
    services: ServicesDep,
) -> PassageView:
    chunk = await services.retriever.get_chunk(chunk_id, principal)
    if chunk is None:
        raise _NOT_FOUND
    return PassageView(
        chunk_id=chunk.chunk_id,
        document_id=chunk.document_id,
        title=chunk.title,
        source=chunk.source,
        text=chunk.text,
        page=chunk.page,
        section=chunk.section,
    )
