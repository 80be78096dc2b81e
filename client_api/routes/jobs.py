"""Long-running work as jobs: ingestion of uploaded files, and long agent tasks.

Both answer ``202 Accepted`` with the job and its ``Location``; poll it with
``GET /v1/jobs/{id}`` until its ``status`` is ``succeeded`` (its ``result`` is there),
``failed`` (its ``error``) or ``cancelled``. Jobs outlive a restart of the server. A
caller sees only their own jobs: another user's job is 404.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from client_api.audit_events import record_action
from client_api.auth.dependencies import ChatCaller, CurrentPrincipal, require
from client_api.auth.permissions import Permission
from client_api.edge.admission import admit, check_tokens
from client_api.problems import (
    AUTHENTICATED_PROBLEMS,
    BODY_PROBLEMS,
    Problem,
    problem_responses,
)
from client_api.routes.deps import ServicesDep
from client_api.schemas import MESSAGE_CEILING
from intelligence.contracts import (
    ConversationNotFound,
    Job,
    JobAlreadyFinished,
    JobStatus,
    Principal,
)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(*AUTHENTICATED_PROBLEMS)
)

INGEST_PATH = "/v1/jobs/ingest"
"""The upload route, whose body cap is ``LAMINA_JOBS__MAX_UPLOAD_BYTES``."""

IngestCaller = Annotated[Principal, Depends(require(Permission.INGEST))]
"""A caller who may put documents into the tenant's index (a content owner)."""


async def _job_owner(request: Request, principal: CurrentPrincipal) -> Principal:
    # Any signed-in caller may read and cancel their own jobs; the rate limits apply.
    await admit(request, principal)
    return principal


JobOwner = Annotated[Principal, Depends(_job_owner)]

_NOT_FOUND = Problem(404, "Not found", "No such job.")


class JobErrorView(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    id: str
    kind: str = Field(description="ingest or agent_task")
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    input: dict[str, Any] = Field(description="What the job works on")
    progress: float | None = Field(
        default=None, description="0..1 when the job can tell how far it got"
    )
    progress_message: str | None = Field(default=None, description="What it is doing now")
    result: dict[str, Any] | None = Field(
        default=None,
        description="Once succeeded: the ingestion report (files_seen, files_indexed, "
        "chunks_indexed, skipped) or the answer (as POST /v1/chat returns it)",
    )
    error: JobErrorView | None = Field(default=None, description="Once failed: why")
    cancel_requested: bool = False
    attempts: int = Field(default=0, description="Runs so far (more than one after a restart)")

    @classmethod
    def of(cls, job: Job) -> JobView:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            created_at=job.created_at,
            updated_at=job.updated_at,
            input=dict(job.input),
            progress=job.progress,
            progress_message=job.progress_message,
            result=dict(job.result) if job.result is not None else None,
            error=JobErrorView(code=job.error.code, message=job.error.message)
            if job.error
            else None,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
        )


class JobList(BaseModel):
    items: list[JobView]
    next_cursor: str | None = None


class TaskRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=MESSAGE_CEILING, description="The task")
    conversation_id: str | None = Field(
        default=None, max_length=64, description="Continue this conversation; omit to start one"
    )


def _accepted(job: Job, response: Response) -> JobView:
    response.headers["Location"] = f"{router.prefix}/{job.id}"
    return JobView.of(job)


@router.post(
    "/ingest",
    status_code=202,
    response_model=JobView,
    summary="Upload documents and index them in the background",
    description="Multipart form: one or more `files` (their names may carry folders, "
    "'policies/leave.md', which the ACL rules match), and optionally an `acl` file in the "
    "format of `lamina ingest` (acl.yaml) granting access in the caller's tenant only. "
    "Without one, only the uploader may read what is indexed. Needs the `ingest` "
    "permission. 413 over LAMINA_JOBS__MAX_UPLOAD_BYTES; 422 for unusable names or ACL.",
    responses=problem_responses(*BODY_PROBLEMS),
)
async def ingest(
    principal: IngestCaller,
    services: ServicesDep,
    response: Response,
    files: Annotated[list[UploadFile], File(description="The documents")],
    acl: Annotated[UploadFile | None, File(description="Who may read them (acl.yaml)")] = None,
) -> JobView:
    config = services.settings.jobs
    if len(files) > config.max_upload_files:
        raise Problem(
            422,
            "Too many files",
            f"{len(files)} files were uploaded; at most {config.max_upload_files} are "
            "accepted per job (LAMINA_JOBS__MAX_UPLOAD_FILES).",
            extra={"code": "max_upload_files"},
        )
    size = sum(upload.size or 0 for upload in [*files, *([acl] if acl else [])])
    if size > config.max_upload_bytes:
        raise Problem(
            413,
            "Upload too large",
            f"The upload is {size} bytes; at most {config.max_upload_bytes} are accepted "
            "per job (LAMINA_JOBS__MAX_UPLOAD_BYTES).",
            extra={"code": "max_upload_bytes"},
        )
    job = await services.ingest_jobs.submit(
        principal,
        [(upload.filename or "", upload.file) for upload in files],
        acl.file if acl is not None else None,
    )
    await record_action(
        services.audit,
        "ingest.submitted",
        principal,
        {"job_id": job.id, "files": job.input["files"], "acl": job.input["acl"], "bytes": size},
    )
    return _accepted(job, response)


@router.post(
    "/tasks",
    status_code=202,
    response_model=JobView,
    summary="Run a long agent task in the background",
    description="The task is one turn of the assistant, run as the caller; its result is "
    "the answer as POST /v1/chat returns it. Needs the `chat` permission.",
    responses=problem_responses(
        *BODY_PROBLEMS, described={404: "No such conversation of the caller's"}
    ),
)
async def create_task(
    body: TaskRequestBody,
    request: Request,
    response: Response,
    principal: ChatCaller,
    services: ServicesDep,
) -> JobView:
    await services.caps.check_message(body.message)
    await check_tokens(request, principal)
    if body.conversation_id is not None and (
        await services.conversations.get(principal, body.conversation_id) is None
    ):
        raise ConversationNotFound("No such conversation.")
    job = await services.agent_tasks.submit(principal, body.message, body.conversation_id)
    return _accepted(job, response)


@router.get("", response_model=JobList, summary="List my jobs, newest first")
async def list_jobs(
    principal: JobOwner,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobList:
    try:
        page = await services.jobs.list_jobs(principal, limit=limit, cursor=cursor)
    except ValueError:
        raise Problem(422, "Invalid request", "The cursor is not valid.") from None
    return JobList(items=[JobView.of(job) for job in page.items], next_cursor=page.next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobView,
    summary="A job: status, progress, result",
    responses=problem_responses(described={404: "No such job of the caller's"}),
)
async def get_job(job_id: str, principal: JobOwner, services: ServicesDep) -> JobView:
    job = await services.jobs.get(principal, job_id)
    if job is None:
        raise _NOT_FOUND
    return JobView.of(job)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobView,
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one stops shortly (poll it). "
    "409 when the job has already ended.",
    responses=problem_responses(
        described={404: "No such job of the caller's", 409: "The job has already ended"}
    ),
)
async def cancel_job(job_id: str, principal: JobOwner, services: ServicesDep) -> JobView:
    try:
        job = await services.job_runner.cancel(principal, job_id)
    except JobAlreadyFinished as finished:
        raise Problem(
            409, "Job already ended", str(finished), extra={"code": "job_finished"}
        ) from None
    if job is None:
        raise _NOT_FOUND
    event = "ingest.cancelled" if job.kind == "ingest" else "task.cancelled"
    await record_action(services.audit, event, principal, {"job_id": job.id})
    return JobView.of(job)
