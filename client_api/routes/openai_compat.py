"""OpenAI-compatible gateway passthrough: ``POST /v1/chat/completions``, ``GET /v1/models``.

Existing OpenAI clients and SDKs point their ``base_url`` at Lamina. ``model`` names
a deployment of the model registry (its failover chain applies) or ``auto`` (the
router chooses). Calls go through the inferencing gateway with the caller's
identity, so they are authenticated, routed, retried, failed over and metered.
Errors use OpenAI's error shape, which those clients parse, with the correlation
id in the message. The route taken is returned in a ``lamina`` extension field
and in ``X-Lamina-*`` headers, which plain clients ignore.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from client_api.auth.dependencies import ModelsCaller
from client_api.problems import OPENAI_COMPATIBLE_TAG
from client_api.routes.deps import ServicesDep
from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ContextWindowExceeded,
    InferenceError,
    InvalidModelRequest,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderTimeout,
    ResponseSchema,
    Role,
    RouteInfo,
    TokenQuotaExceeded,
    TokenRateLimited,
    ToolCall,
    ToolDefinition,
    UnknownDeployment,
)
from inferencing.providers.openai_wire import wire_tool_call

router = APIRouter(tags=[OPENAI_COMPATIBLE_TAG])

AUTO = "auto"


class _Function(BaseModel):
    name: str
    arguments: str = "{}"


class _ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: _Function


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class _Tool(BaseModel):
    type: Literal["function"] = "function"
    function: _FunctionSpec


class _JsonSchema(BaseModel):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool = True


class _ResponseFormat(BaseModel):
    type: Literal["text", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionsBody(BaseModel):
    """The subset of OpenAI's chat completion request that Lamina serves."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A deployment name from GET /v1/models, or 'auto'")
    messages: list[_Message] = Field(min_length=1)
    tools: list[_Tool] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    response_format: _ResponseFormat | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, error_type, code
        self.headers = headers or {}

    def response(self) -> Response:
        return Response(
            _dumps({"error": self.body()}),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )

    def body(self) -> dict[str, Any]:
        cid = correlation_id.get()
        message = f"{self.message} (correlation id {cid})" if cid else self.message
        return {"message": message, "type": self.type, "param": None, "code": self.code}


@router.post(
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion through the gateway",
    response_class=Response,
    responses={200: {"description": "chat.completion, or text/event-stream chunks"}},
)
async def chat_completions(
    body: Annotated[ChatCompletionsBody, Body()],
    request: Request,
    principal: ModelsCaller,
    services: ServicesDep,
) -> Response:
    gateway = services.gateway
    try:
        typed = _request(body)
        await services.caps.check_completion(typed.messages, typed.tools, typed.max_tokens)
        if body.stream:
            deltas = aiter(gateway.stream(typed, principal))
            # Fail over, or fail with a proper status, before the response starts.
            first = await anext(deltas)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _chunks(first, deltas, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        # The body goes on as the client sent it (parameters Lamina does not model
        # included); FastAPI has validated it and Starlette keeps the bytes.
        completion, route = await gateway.forward(
            orjson.loads(await request.body()), typed, principal
        )
    except OpenAIError as exc:
        return exc.response()
    except (TokenRateLimited, TokenQuotaExceeded):
        raise  # the problem handlers answer these with the rate-limit headers
    except InferenceError as exc:
        return _error(exc).response()
    completion["lamina"] = {"route": _route(route)}
    return Response(
        orjson.dumps(completion), media_type="application/json", headers=_route_headers(route)
    )


@router.get("/v1/models", summary="Deployments the caller may name as 'model'")
async def models(principal: ModelsCaller, services: ServicesDep) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    data = [{"id": AUTO, "object": "model", "created": 0, "owned_by": "lamina"}]
    for deployment in services.gateway.deployments:
        retires = deployment.settings.retires_on
        if retires is not None and today >= retires:
            continue
        data.append({"id": deployment.name, "object": "model", "created": 0, "owned_by": "lamina"})
    return {"object": "list", "data": data}


# --- mapping -------------------------------------------------------------------------


def _request(body: ChatCompletionsBody) -> ChatRequest:
    schema: ResponseSchema | None = None
    if body.response_format is not None and body.response_format.type == "json_schema":
        spec = body.response_format.json_schema
        if spec is None:
            raise OpenAIError(
                400, "response_format.json_schema is required.", "invalid_request_error"
            )
        schema = ResponseSchema(spec.name, spec.schema_, spec.strict)
    return ChatRequest(
        messages=[_message(m) for m in body.messages],
        tools=[
            ToolDefinition(t.function.name, t.function.description, t.function.parameters)
            for t in body.tools
        ],
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        response_format=schema,
        deployment=None if body.model == AUTO else body.model,
    )


def _message(message: _Message) -> ChatMessage:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    role = Role.SYSTEM if message.role == "developer" else Role(message.role)
    calls = tuple(
        ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()
    )
    return ChatMessage(role, content, calls, message.tool_call_id)


async def _chunks(
    first: ChatDelta, deltas: AsyncIterator[ChatDelta], include_usage: bool
) -> AsyncIterator[bytes]:
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "",
    }
    delta: ChatDelta | None = first
    try:
        while delta is not None:
            yield _event({**base, "choices": [_choice(delta)]} | _extension(delta))
            if delta.usage is not None and include_usage:
                usage = _usage(delta.usage.input_tokens, delta.usage.output_tokens)
                yield _event({**base, "choices": [], "usage": usage})
            delta = await anext(deltas, None)
    except InferenceError as exc:
        # The stream has started: the status is sent, only an error event can follow.
        yield _event({"error": _error(exc).body()})
        return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"


def _choice(delta: ChatDelta) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if delta.content:
        content["content"] = delta.content
    if delta.tool_calls:
        content["tool_calls"] = [
            {"index": i, **wire_tool_call(call)} for i, call in enumerate(delta.tool_calls)
        ]
    return {"index": 0, "delta": content, "finish_reason": delta.finish_reason}


def _extension(delta: ChatDelta) -> dict[str, Any]:
    return {"lamina": {"route": _route(delta.route)}} if delta.route is not None else {}


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def _route(route: RouteInfo) -> dict[str, Any]:
    return {
        "deployment": route.deployment,
        "model": route.model,
        "model_version": route.model_version,
        "reasons": list(route.reasons),
        "attempts": [{"deployment": d, "outcome": o} for d, o in route.attempts],
    }


def _route_headers(route: RouteInfo) -> dict[str, str]:
    headers = {"X-Lamina-Deployment": route.deployment}
    if route.model_version:
        headers["X-Lamina-Model-Version"] = route.model_version
    return headers


def _error(exc: InferenceError) -> OpenAIError:
    if isinstance(exc, ContextWindowExceeded):
        return OpenAIError(400, exc.message, "invalid_request_error", "context_length_exceeded")
    if isinstance(exc, UnknownDeployment):
        return OpenAIError(404, exc.message, "invalid_request_error", "model_not_found")
    if isinstance(exc, InvalidModelRequest):
        return OpenAIError(400, exc.message, "invalid_request_error")
    if isinstance(exc, ProviderRateLimited):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s or 1)))}
        return OpenAIError(429, exc.message, "rate_limit_error", "rate_limited", headers)
    if isinstance(exc, ProviderTimeout):
        return OpenAIError(504, exc.message, "timeout_error", "timeout")
    if isinstance(exc, ProviderAuthenticationFailed):
        return OpenAIError(502, exc.message, "api_error", "upstream_authentication")
    return OpenAIError(503, exc.message, "api_error", "unavailable", {"Retry-After": "5"})


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


def _dumps(payload: Any) -> bytes:
    return orjson.dumps(payload)
