"""RFC 9457 problem details for every error the API returns, with the correlation id."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from client_api.auth.api_keys import KeyStoreUnavailable
from client_api.auth.groups import GroupsUnavailable
from client_api.auth.jwt import AuthenticationError, IdentityProviderUnavailable
from client_api.edge.caps import CapExceeded
from client_api.edge.limits import RateLimiter
from client_api.edge.telemetry import RefusalReason, record_refusal, route_of
from inferencing.contracts import TokenQuotaExceeded, TokenRateLimited
from intelligence.contracts import (
    AnswerFailed,
    ApprovalsUnavailable,
    ConversationNotFound,
    IdempotencyKeyReused,
    InputRejected,
    IntelligenceError,
    StoreUnavailable,
    TurnInProgress,
    UnsafeInput,
)
from tools.approvals.store import ApprovalStoreUnavailable
from tools.contracts import ApprovalConflict, ApprovalNotFound, InvalidToolArguments, ToolError

log = logging.getLogger(__name__)

CORRELATION_HEADER = "X-Correlation-ID"
PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class ProblemDetails(BaseModel):
    """What every error of the API looks like (RFC 9457), but on the OpenAI-compatible
    routes; members beyond these (``code``, ``errors``, ...) depend on the problem."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int = Field(ge=400, le=599)
    detail: str | None = None
    correlation_id: str | None = Field(
        default=None, description="Quote it when reporting the problem: it finds the logs"
    )


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, with the correlation id")
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """An error of the OpenAI-compatible routes: OpenAI's shape, which its clients parse."""

    error: OpenAIErrorDetail


_PROBLEM_DESCRIPTIONS: dict[int, str] = {
    401: "No valid credentials (bearer token or API key)",
    403: "The caller may not do this, or its token quota is used up",
    400: "The body cannot be parsed (not JSON, not UTF-8, broken multipart)",
    413: "The request body is over its size cap",
    422: "The body or parameters are invalid, or over a cap",
    429: "Over a rate limit; retry after Retry-After",
    503: "A dependency (sign-in, a store) cannot answer right now; retry after Retry-After",
}

AUTHENTICATED_PROBLEMS = (401, 403, 422, 429, 503)
"""What any route behind authentication may answer before it runs: bad credentials,
a missing permission or quota, invalid parameters, a rate limit, sign-in unavailable."""

BODY_PROBLEMS = (400, 413)
"""What a route that reads a body may answer besides: unparseable, or too large."""

_COMPONENTS = "#/components/schemas/"


def problem_responses(
    *statuses: int, described: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: these statuses (and those ``described``,
    with the route's own description) come as ``ProblemDetails`` in
    ``application/problem+json``. A route's entry replaces its router's whole entry."""
    return _error_responses(statuses, described, PROBLEM_JSON, ProblemDetails)


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the OpenAI-compatible routes, whose errors take OpenAI's shape."""
    return _error_responses(statuses, None, "application/json", OpenAIErrorBody)


def _error_responses(
    statuses: tuple[int, ...],
    described: Mapping[int, str] | None,
    media_type: str,
    model: type[BaseModel],
) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        **{s: _PROBLEM_DESCRIPTIONS.get(s, HTTPStatus(s).phrase) for s in statuses},
        **(described or {}),
    }
    schema = {"$ref": f"{_COMPONENTS}{model.__name__}"}
    return {
        status: {"description": description, "content": {media_type: {"schema": schema}}}
        for status, description in descriptions.items()
    }


def _document_problems(app: FastAPI) -> None:
    """Put the error bodies :func:`problem_responses` refers to into the OpenAPI
    document's components (no route returns them as its model, so FastAPI would not)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (ProblemDetails, OpenAIErrorBody):
                definition = TypeAdapter(model).json_schema(ref_template=_COMPONENTS + "{model}")
                schemas.update(definition.pop("$defs", {}))
                schemas[model.__name__] = definition
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def retry_later(
    status: int,
    title: str,
    detail: str,
    *,
    after_s: int = 5,
    extra: Mapping[str, Any] | None = None,
) -> Problem:
    """A problem whose request may be sent again as it was once ``after_s`` seconds have
    passed (``Retry-After``)."""
    return Problem(status, title, detail, headers={"Retry-After": str(after_s)}, extra=extra)


def problem_response(
    problem: Problem, request: Request | None = None, *, outside_middleware: bool = False
) -> JSONResponse:
    """The problem as a response. Handlers of unhandled exceptions run outside the
    correlation middleware (in Starlette's outermost error middleware), so only they
    set the header themselves. On the OpenAI-compatible routes the body takes OpenAI's
    error shape, which OpenAI clients parse, with the same status and headers."""
    cid = correlation_id.get()
    headers = dict(problem.headers)
    if cid and outside_middleware:
        headers[CORRELATION_HEADER] = cid
    if request is not None and _openai_compatible(request):
        return JSONResponse(_openai_error(problem, cid), problem.status, headers)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": problem.title,
        "status": problem.status,
        "correlation_id": cid,
    }
    if problem.detail:
        body["detail"] = problem.detail
    body.update(problem.extra)
    return JSONResponse(body, status_code=problem.status, headers=headers, media_type=PROBLEM_JSON)


OPENAI_COMPATIBLE_TAG = "openai-compatible"

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def _openai_compatible(request: Request) -> bool:
    route = request.scope.get("route")
    return isinstance(route, APIRoute) and OPENAI_COMPATIBLE_TAG in route.tags


def _openai_error(problem: Problem, cid: str | None) -> dict[str, Any]:
    message = problem.detail or problem.title
    if cid:
        message = f"{message} (correlation id {cid})"
    if problem.status in _OPENAI_TYPES:
        kind = _OPENAI_TYPES[problem.status]
    else:
        kind = "api_error" if problem.status >= 500 else "invalid_request_error"
    code = problem.extra.get("code")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_INTELLIGENCE_STATUS: dict[type[IntelligenceError], tuple[int, str]] = {
    InputRejected: (422, "Message rejected"),
    ConversationNotFound: (404, "Not found"),
    AnswerFailed: (502, "The answer could not be produced"),
    ApprovalsUnavailable: (404, "Approvals are not enabled"),
    IdempotencyKeyReused: (422, "Idempotency-Key reused"),
}


def _tool(exc: ToolError) -> Problem:
    """Tool errors reach the edge only from approval decisions."""
    if isinstance(exc, ApprovalStoreUnavailable):
        return retry_later(
            503, "Approvals unavailable", exc.message, extra={"code": "approvals_unavailable"}
        )
    if isinstance(exc, ApprovalNotFound):
        return Problem(404, "Not found", exc.message, extra={"code": "approval_not_found"})
    if isinstance(exc, ApprovalConflict):
        return Problem(
            409,
            "Approval already settled",
            exc.message,
            extra={"code": f"approval_{exc.status.value}", "approval_status": exc.status.value},
        )
    if isinstance(exc, InvalidToolArguments):
        return Problem(
            422,
            "Invalid tool arguments",
            exc.message,
            extra={"code": "invalid_tool_arguments", "errors": list(exc.errors)},
        )
    return Problem(422, "Tool refused", exc.message, extra={"code": type(exc).__name__})


def _validation(exc: RequestValidationError) -> Problem:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return Problem(
        422,
        "Invalid request",
        "The request body or parameters are invalid.",
        extra={"errors": errors},
    )


def _http(exc: StarletteHTTPException) -> Problem:
    return Problem(exc.status_code, str(exc.detail), headers=exc.headers)


def _authentication(exc: AuthenticationError) -> Problem:
    return Problem(401, "Unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})


def _identity_provider(exc: IdentityProviderUnavailable) -> Problem:
    log.error("identity provider unavailable: %s", exc)
    return retry_later(503, "Authentication unavailable", "Sign-in cannot be checked right now.")


def _groups(exc: GroupsUnavailable) -> Problem:
    log.error("group memberships unavailable: %s", exc)
    return retry_later(
        503,
        "Group memberships unavailable",
        "Your group memberships cannot be checked right now; try again shortly.",
        after_s=max(1, round(exc.retry_after_s or 5)),
    )


def _key_store(exc: KeyStoreUnavailable) -> Problem:
    log.error("API key store unavailable: %s", exc)
    return retry_later(503, "Authentication unavailable", "API keys cannot be checked right now.")


def _cap(exc: CapExceeded) -> Problem:
    title = "Request too large" if exc.status == 413 else "Request over a cap"
    return Problem(exc.status, title, exc.message, extra={"cap": exc.cap, "code": exc.cap})


def _token_rate(exc: TokenRateLimited) -> Problem:
    states = [exc.state] if exc.state is not None else []
    if not exc.retryable:  # larger than a whole minute's budget: waiting cannot help
        return Problem(413, "Request too large", exc.message, extra={"code": "tokens_over_limit"})
    headers = RateLimiter.headers(states, retry_after_s=exc.retry_after_s)
    return Problem(
        429, "Too many tokens", exc.message, headers=headers, extra={"code": "rate_limited"}
    )


def _quota(exc: TokenQuotaExceeded) -> Problem:
    headers = RateLimiter.headers([exc.state]) if exc.state is not None else {}
    return Problem(
        403, "Quota exceeded", exc.message, headers=headers, extra={"code": "quota_exceeded"}
    )


def _intelligence(exc: IntelligenceError) -> Problem:
    if isinstance(exc, UnsafeInput) and exc.code == "safety_unavailable":
        return retry_later(503, "Safety check unavailable", exc.message, extra={"code": exc.code})
    if isinstance(exc, StoreUnavailable):
        log.error("store unavailable: %s", exc.message)
        return retry_later(
            503,
            "Service unavailable",
            "A store this request needs cannot be reached; try again shortly.",
            extra={"code": "store_unavailable"},
        )
    if isinstance(exc, TurnInProgress):
        return retry_later(
            409, "Turn in progress", exc.message, after_s=2, extra={"code": "turn_in_progress"}
        )
    if isinstance(exc, AnswerFailed) and exc.code in _ANSWER_FAILED_STATUS:
        status, title = _ANSWER_FAILED_STATUS[exc.code]
        return Problem(status, title, exc.message, extra={"code": exc.code})
    status, title = next(
        (_INTELLIGENCE_STATUS[kind] for kind in type(exc).__mro__ if kind in _INTELLIGENCE_STATUS),
        (500, "Request failed"),
    )
    return Problem(status, title, exc.message, extra={"code": getattr(exc, "code", None)})


_HANDLERS: dict[type[Exception], Callable[[Any], Problem]] = {
    Problem: lambda problem: problem,
    RequestValidationError: _validation,
    StarletteHTTPException: _http,
    AuthenticationError: _authentication,
    IdentityProviderUnavailable: _identity_provider,
    GroupsUnavailable: _groups,
    KeyStoreUnavailable: _key_store,
    CapExceeded: _cap,
    TokenRateLimited: _token_rate,
    TokenQuotaExceeded: _quota,
    IntelligenceError: _intelligence,
    ToolError: _tool,
}


_ANSWER_FAILED_STATUS = {
    # A token limit or quota that ran out during the turn (the up-front check
    # catches most before the turn starts).
    "rate_limited": (429, "Too many tokens"),
    "quota_exceeded": (403, "Quota exceeded"),
    "content_filtered": (422, "Answer withheld"),
}


_REFUSAL_STATUS = {
    401: RefusalReason.UNAUTHENTICATED,
    403: RefusalReason.FORBIDDEN,
    413: RefusalReason.TOO_LARGE,
    429: RefusalReason.RATE_LIMITED,
}


def refusal_of(problem: Problem, cause: Exception) -> RefusalReason | None:
    """The refusal a problem reports to its caller, for ``lamina.edge.refusals``: by its
    status, a used-up quota told from other 403s by its code, and a 422 over a cap
    counted as too large. Errors from the layers below (a limit that ran out in the
    middle of a turn) are counted where they happened, not as the edge's refusals."""
    if isinstance(cause, IntelligenceError | ToolError):
        return None
    if problem.status == 403 and problem.extra.get("code") == "quota_exceeded":
        return RefusalReason.QUOTA_EXCEEDED
    if problem.status == 422 and "cap" in problem.extra:
        return RefusalReason.TOO_LARGE
    return _REFUSAL_STATUS.get(problem.status)


def install_problem_handlers(app: FastAPI) -> None:
    def handler(to_problem: Callable[[Any], Problem]) -> Callable[..., Awaitable[JSONResponse]]:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            problem = to_problem(exc)
            if (refusal := refusal_of(problem, exc)) is not None:
                record_refusal(refusal, route_of(request.scope))
            return problem_response(problem, request)

        return handle

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(
            Problem(500, "Internal error", "Something went wrong; quote the correlation id."),
            request,
            outside_middleware=True,
        )

    for kind, to_problem in _HANDLERS.items():
        app.add_exception_handler(kind, handler(to_problem))
    app.add_exception_handler(Exception, on_unexpected)
    # The handlers and the description of what they answer belong together.
    _document_problems(app)
