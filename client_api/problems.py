"""RFC 9457 problem details for every error the API returns, with the correlation id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from client_api.auth.jwt import AuthenticationError, IdentityProviderUnavailable
from intelligence.contracts import (
    AnswerFailed,
    ConversationNotFound,
    InputRejected,
    IntelligenceError,
)

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


def problem_response(problem: Problem, *, outside_middleware: bool = False) -> JSONResponse:
    """The problem as a response. Handlers of unhandled exceptions run outside the
    correlation middleware (in Starlette's outermost error middleware), so only they
    set the header themselves."""
    cid = correlation_id.get()
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": problem.title,
        "status": problem.status,
        "correlation_id": cid,
    }
    if problem.detail:
        body["detail"] = problem.detail
    body.update(problem.extra)
    headers = dict(problem.headers)
    if cid and outside_middleware:
        headers[CORRELATION_HEADER] = cid
    return JSONResponse(body, status_code=problem.status, headers=headers, media_type=PROBLEM_JSON)


_INTELLIGENCE_STATUS: dict[type[IntelligenceError], tuple[int, str]] = {
    InputRejected: (422, "Message rejected"),
    ConversationNotFound: (404, "Not found"),
    AnswerFailed: (502, "The answer could not be produced"),
}


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return problem_response(
            Problem(
                422,
                "Invalid request",
                "The request body or parameters are invalid.",
                extra={"errors": errors},
            )
        )

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(Problem(exc.status_code, str(exc.detail), headers=exc.headers))

    async def on_auth(_: Request, exc: Exception) -> JSONResponse:
        return problem_response(
            Problem(401, "Unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})
        )

    async def on_idp(_: Request, exc: Exception) -> JSONResponse:
        log.error("identity provider unavailable: %s", exc)
        return problem_response(
            Problem(
                503,
                "Authentication unavailable",
                "Sign-in cannot be checked right now.",
                headers={"Retry-After": "5"},
            )
        )

    async def on_intelligence(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, IntelligenceError)
        status, title = _INTELLIGENCE_STATUS.get(type(exc), (500, "Request failed"))
        return problem_response(Problem(status, title, exc.message))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(
            Problem(500, "Internal error", "Something went wrong; quote the correlation id."),
            outside_middleware=True,
        )

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(AuthenticationError, on_auth)
    app.add_exception_handler(IdentityProviderUnavailable, on_idp)
    app.add_exception_handler(IntelligenceError, on_intelligence)
    app.add_exception_handler(Exception, on_unexpected)
