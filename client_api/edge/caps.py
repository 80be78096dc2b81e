"""Per-request caps: prompt tokens, history turns, output tokens and body size.

A request over a cap is refused before any model call (and before it counts against a
rate limit), with a status that says what kind of problem it is: 413 when the request
is too large to take (body, prompt tokens), 422 when it asks for something the
deployment does not allow (more output tokens, a longer history). The message names
the cap and the setting that controls it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence

from asgi_correlation_id import correlation_id
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client_api.edge.telemetry import (
    AdmissionCheck,
    RefusalReason,
    admission_span,
    record_refusal,
    route_of,
)
from inferencing.contracts import ChatMessage, Role, ToolDefinition
from inferencing.tokens import TokenCounter

# Counting a very long prompt takes milliseconds: do it off the event loop.
_COUNT_IN_THREAD_CHARS = 50_000


class CapsSettings(BaseModel):
    max_prompt_tokens: int = Field(
        default=32_000, ge=1, description="Most prompt tokens one request may send (else 413)"
    )
    max_history_turns: int = Field(
        default=50,
        ge=0,
        description="Most earlier user turns one request may carry (else 422); the chat "
        "API's own history (LAMINA_INTELLIGENCE__HISTORY_TURNS) may not exceed it",
    )
    max_output_tokens: int = Field(
        default=4_096, ge=1, description="Most output tokens one request may ask for (else 422)"
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted (else 413)"
    )


class CapExceeded(Exception):
    """A request is over one of the caps; ``message`` is safe to return. ``measured`` and
    ``limit`` are the request's figure and the cap, for callers that word it themselves."""

    def __init__(
        self,
        status: int,
        cap: str,
        message: str,
        *,
        measured: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.cap, self.message = status, cap, message
        self.measured, self.limit = measured, limit


def _cap_refusal(exc: Exception) -> RefusalReason | None:
    return RefusalReason.TOO_LARGE if isinstance(exc, CapExceeded) else None


class RequestCaps:
    """Checks requests against :class:`CapsSettings` with the gateway's token counter."""

    def __init__(self, settings: CapsSettings, counter: TokenCounter) -> None:
        self._settings = settings
        self._counter = counter

    @property
    def settings(self) -> CapsSettings:
        return self._settings

    async def check_message(self, text: str) -> None:
        """A chat API question: its tokens against the prompt cap."""
        with admission_span(AdmissionCheck.CAPS, _cap_refusal):
            await self._check_prompt(len(text), lambda: self._counter.count(text))

    async def check_completion(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolDefinition],
        max_tokens: int | None,
    ) -> int:
        """An OpenAI-style completion: output tokens, history turns, then prompt tokens.
        Returns the prompt's tokens (messages and tools), which the gateway takes as
        ``ChatRequest.prompt_tokens`` rather than counting them again."""
        with admission_span(AdmissionCheck.CAPS, _cap_refusal):
            return await self._check_completion(messages, tools, max_tokens)

    async def _check_completion(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolDefinition],
        max_tokens: int | None,
    ) -> int:
        caps = self._settings
        if max_tokens is not None and max_tokens > caps.max_output_tokens:
            raise CapExceeded(
                422,
                "max_output_tokens",
                f"max_tokens is {max_tokens}; this deployment allows at most "
                f"{caps.max_output_tokens} output tokens per request "
                "(LAMINA_CAPS__MAX_OUTPUT_TOKENS).",
            )
        turns = sum(1 for m in messages if m.role is Role.USER) - 1
        if turns > caps.max_history_turns:
            raise CapExceeded(
                422,
                "max_history_turns",
                f"The request carries {turns} earlier user turns; at most "
                f"{caps.max_history_turns} are allowed (LAMINA_CAPS__MAX_HISTORY_TURNS). "
                "Summarise or drop older turns.",
            )
        chars = sum(len(m.content or "") for m in messages)
        return await self._check_prompt(
            chars, lambda: self._counter.count_messages(messages, tools)
        )

    async def _check_prompt(self, chars: int, count: Callable[[], int]) -> int:
        tokens = await asyncio.to_thread(count) if chars > _COUNT_IN_THREAD_CHARS else count()
        limit = self._settings.max_prompt_tokens
        if tokens > limit:
            raise CapExceeded(
                413,
                "max_prompt_tokens",
                f"The prompt is {tokens} tokens; at most {limit} are allowed per request "
                "(LAMINA_CAPS__MAX_PROMPT_TOKENS).",
                measured=tokens,
                limit=limit,
            )
        return tokens


class BodySizeLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` with 413 before a route parses it.

    A declared ``Content-Length`` over the cap is refused at once. A body without one
    (chunked) is read here up to the cap and handed on whole, or refused: cutting it
    off inside the route would surface as a server error instead of a 413.

    ``path_limits`` gives routes a cap of their own (an upload route), as a path mapped
    to (bytes, the setting that controls them).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        path_limits: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self._app = app
        self._default = (max_bytes, "LAMINA_CAPS__MAX_BODY_BYTES")
        self._path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit, setting = self._path_limits.get(scope["path"], self._default)
        await self._limited(scope, receive, send, limit, setting)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, limit: int, setting: str
    ) -> None:
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if length.isdigit() and int(length) > limit:
                await self._refuse(scope, send, limit, setting)
                return
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._drain(receive, message, limit)
                await self._refuse(scope, send, limit, setting)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self._app(scope, replay, send)

    async def _drain(self, receive: Receive, message: Message, limit: int) -> None:
        """Read what is left of a modest overshoot, so that the client, still sending,
        reads the 413 instead of a connection reset; a body far over the cap is not
        worth reading."""
        drained = 0
        while message.get("more_body", False) and drained <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))

    async def _refuse(self, scope: Scope, send: Send, limit: int, setting: str) -> None:
        # Refused before the problem handlers could see it: counted here.
        record_refusal(RefusalReason.TOO_LARGE, route_of(scope))
        problem = {
            "type": "about:blank",
            "title": "Request too large",
            "status": 413,
            "correlation_id": correlation_id.get(),
            "detail": f"The request body is over {limit} bytes ({setting}).",
        }
        body = json.dumps(problem).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
