"""The edge gate every API route passes after authentication and its permission check:
requests-per-minute admission, and rate-limit headers on every response.

Token limits and quotas are charged by the inferencing gateway around each model
call; a chat turn also checks them up front (:func:`check_tokens`), so that a caller
with no budget left is refused with a proper status before anything is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client_api.edge.caps import CapExceeded, RequestCaps
from client_api.edge.limits import RateLimited, RateLimiter
from client_api.edge.telemetry import AdmissionCheck, RefusalReason, admission_span, record_refusal
from client_api.problems import Problem
from inferencing.contracts import LimitState, TokenQuotaExceeded, TokenRateLimited
from intelligence.contracts import Principal

_STATE_KEY = "rate_limit_headers"


async def admit(request: Request, principal: Principal) -> None:
    """Count the request against the caller's requests-per-minute limits (429 when full).

    An app without services (one assembled from routers alone) has no limits to apply."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        return
    limiter: RateLimiter = services.limiter
    try:
        states = await _requests(limiter, principal)
    except RateLimited as refused:
        headers = RateLimiter.headers(refused.states, retry_after_s=refused.retry_after_s)
        raise Problem(429, "Too many requests", refused.message, headers=headers) from None
    if states:
        _remember(request, RateLimiter.headers(states))


async def check_tokens(request: Request, principal: Principal) -> None:
    """Refuse a chat turn up front when a token limit or quota has nothing left; raises
    the inferencing layer's ``TokenRateLimited`` / ``TokenQuotaExceeded``."""
    limiter: RateLimiter = request.app.state.services.limiter
    states = await _tokens(limiter, principal)
    if states:
        _remember(request, RateLimiter.headers(states))


async def admit_turn(
    limiter: RateLimiter,
    caps: RequestCaps,
    principal: Principal,
    message: str,
    *,
    route: str = "/api/messages",
) -> None:
    """The edge's policies for a chat turn that arrives without a request of its own to
    answer (a Teams message, acknowledged before it runs), in the order the chat routes
    apply them: requests per minute, caps, then the token budget.

    No problem response reports a refusal here, so it is counted here, under ``route``
    (the Teams bot's by default).

    Raises :class:`RateLimited`, :class:`~client_api.edge.caps.CapExceeded`, or the
    inferencing layer's ``TokenRateLimited`` / ``TokenQuotaExceeded``."""
    try:
        await _requests(limiter, principal)
        await caps.check_message(message)
        await _tokens(limiter, principal)
    except Exception as exc:
        if (reason := refusal_reason(exc)) is not None:
            record_refusal(reason, route)
        raise


def refusal_reason(exc: Exception) -> RefusalReason | None:
    """The refusal an admission error stands for; ``None`` for anything else. A token
    request larger than a whole minute's budget is too large, not rate limited: waiting
    cannot help it."""
    match exc:
        case RateLimited():
            return RefusalReason.RATE_LIMITED
        case CapExceeded():
            return RefusalReason.TOO_LARGE
        case TokenRateLimited(retryable=True):
            return RefusalReason.RATE_LIMITED
        case TokenRateLimited():
            return RefusalReason.TOO_LARGE
        case TokenQuotaExceeded():
            return RefusalReason.QUOTA_EXCEEDED
    return None


async def _requests(limiter: RateLimiter, principal: Principal) -> list[LimitState]:
    with admission_span(AdmissionCheck.REQUESTS, refusal_reason):
        return await limiter.admit(principal)


async def _tokens(limiter: RateLimiter, principal: Principal) -> list[LimitState]:
    with admission_span(AdmissionCheck.TOKENS, refusal_reason):
        return await limiter.check_tokens(principal)


def _remember(request: Request, headers: Mapping[str, str]) -> None:
    # The scope's state dict is what ``request.state`` wraps, and what the middleware
    # reads; a missing attribute of ``request.state`` would cost a raised AttributeError.
    state: dict[str, object] = request.scope.setdefault("state", {})
    held = state.get(_STATE_KEY)
    if isinstance(held, dict):
        held.update(headers)
    else:
        state[_STATE_KEY] = dict(headers)


class RateLimitHeaders:
    """ASGI middleware: add the rate-limit headers the gate recorded to the response,
    whatever produced it (a model, a ``Response``, a stream or an error)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                held = scope.get("state", {}).get(_STATE_KEY)
                if held:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    extra = [
                        (name.lower().encode(), value.encode())
                        for name, value in held.items()
                        if name.lower().encode() not in present
                    ]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self._app(scope, receive, send_with_headers)
