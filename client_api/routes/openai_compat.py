"""OpenAI-compatible facade: ``POST /v1/chat/completions``, ``GET /v1/models``.

Existing OpenAI clients and SDKs point their ``base_url`` at Lamina, and ``model``
chooses what answers:

- a **logical model** (``lamina-rag``, ``lamina-agent``): the assistant answers, with
  retrieval under the caller's identity, citations, and (for ``lamina-agent``) tools
  behind their policy and approvals. The last message is the question; the
  conversation continues when the request names it (``lamina.conversation_id``).
  Citations and ids come back in the ``lamina`` extension field.
- a **deployment** of the model registry (its failover chain applies) or ``auto``
  (the router chooses): a gateway passthrough. The messages go to the model as sent,
  through the inferencing gateway with the caller's identity, so they are
  authenticated, routed, retried, failed over and metered. The route taken is
  returned in the ``lamina`` extension field and in ``X-Lamina-*`` headers.

Plain clients ignore the extension fields. Errors use OpenAI's error shape, which those
clients parse, with the correlation id in the message. ``docs/protocols.md`` describes
both paths.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Body, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from client_api.auth.dependencies import CREDENTIALS_OPENAPI, OpenAICaller
from client_api.auth.permissions import Permission, PermissionDenied
from client_api.composition import Services
from client_api.edge.admission import check_tokens
from client_api.edge.caps import RequestCaps
from client_api.problems import OPENAI_COMPATIBLE_TAG, openai_error_responses
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
from intelligence.contracts import (
    AnswerDelta,
    ApprovalRequiredEvent,
    Citation,
    CitationsEvent,
    DoneEvent,
    ErrorEvent,
    Principal,
    TurnEvent,
    TurnRequest,
    TurnResult,
    collect_turn,
)

router = APIRouter(
    tags=[OPENAI_COMPATIBLE_TAG], responses=openai_error_responses(401, 403, 422, 429, 503)
)

_COMPLETION_CONTENT: dict[str, Any] = {
    "application/json": {
        "schema": {"type": "object", "description": "A chat.completion (stream: false)"}
    },
    "text/event-stream": {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "A chat.completion.chunk as JSON, or [DONE] last",
                }
            },
        }
    },
}

AUTO = "auto"


@dataclass(frozen=True, slots=True)
class LogicalModel:
    """A ``model`` name that the assistant answers, rather than a deployment."""

    id: str
    description: str
    tools: bool
    """Whether the assistant may plan tool calls (under their policy and approvals)."""


LOGICAL_MODELS: dict[str, LogicalModel] = {
    model.id: model
    for model in (
        LogicalModel(
            "lamina-rag",
            "Grounded answers: search the documents the caller may read, answer with "
            "citations; no tools",
            tools=False,
        ),
        LogicalModel(
            "lamina-agent",
            "The full assistant: retrieval and the tools the caller may use, under their "
            "policy and approvals",
            tools=True,
        ),
    )
}
"""Listed first by ``GET /v1/models``; they need the ``chat`` permission besides ``models``."""


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


class LaminaOptions(BaseModel):
    """The ``lamina`` extension of a request (``extra_body`` in the OpenAI SDKs)."""

    model_config = ConfigDict(extra="ignore")

    conversation_id: str | None = Field(
        default=None,
        max_length=64,
        description="Logical models: continue this conversation of the caller's (its stored "
        "history is what the assistant sees); absent: each request starts a new one",
    )


class ChatCompletionsBody(BaseModel):
    """The subset of OpenAI's chat completion request that Lamina serves."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        description="A logical model (lamina-rag, lamina-agent), a deployment name from "
        "GET /v1/models, or 'auto'"
    )
    messages: list[_Message] = Field(min_length=1)
    tools: list[_Tool] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    response_format: _ResponseFormat | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    lamina: LaminaOptions | None = None


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
    responses={
        200: {
            "description": "chat.completion, or text/event-stream chunks",
            "content": _COMPLETION_CONTENT,
        },
        # 400: a request the model cannot take; 404: no such model or conversation;
        # 409: a turn of the conversation still runs; 502/504: the model failed.
        **openai_error_responses(400, 404, 409, 413, 502, 504),
    },
    openapi_extra=CREDENTIALS_OPENAPI,
)
async def chat_completions(
    body: Annotated[ChatCompletionsBody, Body()], request: Request, principal: OpenAICaller
) -> Response:
    # One dependency (the caller) rather than auth's seven and services': FastAPI's
    # cost per dependency is much of a passthrough's.
    services: Services = request.app.state.services
    logical = LOGICAL_MODELS.get(body.model)
    if logical is not None:
        try:
            return await _assistant_completion(logical, body, request, principal, services)
        except OpenAIError as exc:
            return exc.response()
    gateway = services.gateway
    try:
        typed = await _request(body, services.caps)
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
        sent = orjson.loads(await request.body())
        sent.pop("lamina", None)  # Lamina's own extension is not the provider's business
        completion, route = await gateway.forward(sent, typed, principal)
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


@router.get(
    "/v1/models",
    summary="What the caller may name as 'model': logical models first, then deployments",
    openapi_extra=CREDENTIALS_OPENAPI,
)
async def models(request: Request, principal: OpenAICaller) -> dict[str, Any]:
    services: Services = request.app.state.services
    today = datetime.now(UTC).date()
    data: list[dict[str, Any]] = []
    if _may_chat(request, principal):
        data += [
            _model_entry(model.id) | {"lamina": {"description": model.description}}
            for model in LOGICAL_MODELS.values()
        ]
    data.append(_model_entry(AUTO))
    for deployment in services.gateway.deployments:
        retires = deployment.settings.retires_on
        if retires is not None and today >= retires:
            continue
        data.append(_model_entry(deployment.name))
    return {"object": "list", "data": data}


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "lamina"}


# --- logical models: the assistant answers ------------------------------------------


async def _assistant_completion(
    model: LogicalModel,
    body: ChatCompletionsBody,
    request: Request,
    principal: Principal,
    services: Services,
) -> Response:
    """A turn of the assistant, as a ``chat.completion`` or a stream of chunks. Refusals
    before the turn starts (caps, budget, unknown conversation, rejected input) raise,
    and the problem handlers answer them in OpenAI's error shape."""
    if not _may_chat(request, principal):
        raise OpenAIError(
            403,
            f"The model {model.id} needs the '{Permission.CHAT.value}' permission.",
            "permission_error",
            "missing_permission",
        )
    question = _question(body)
    # The edge's policies for a chat turn, as /v1/chat applies them.
    await services.caps.check_message(question)
    await check_tokens(request, principal)
    options = body.lamina or LaminaOptions()
    started = await services.assistant.start_turn(
        TurnRequest(
            message=question,
            conversation_id=options.conversation_id,
            correlation_id=correlation_id.get(),
            tools=model.tools,
        ),
        principal,
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _turn_chunks(model.id, started.events, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    result = await collect_turn(started.events)
    return Response(_dumps(_turn_completion(model.id, result)), media_type="application/json")


def _may_chat(request: Request, principal: Principal) -> bool:
    try:
        request.app.state.authenticator.policy.check(principal, Permission.CHAT)
    except PermissionDenied:
        return False
    return True


def _question(body: ChatCompletionsBody) -> str:
    """The last message, which must be the user's. Earlier messages are not replayed to
    the assistant: it sees the stored history of ``lamina.conversation_id`` instead."""
    last = body.messages[-1]
    text = _message(last).content or ""
    if last.role != "user" or not text.strip():
        raise OpenAIError(
            400,
            "The last message must be the user's question, with text.",
            "invalid_request_error",
        )
    return text


def _turn_completion(model: str, result: TurnResult) -> dict[str, Any]:
    content = result.answer
    extension = _turn_extension(result.conversation_id, result.message_id, result.citations)
    if result.approval is not None:
        content = approval_notice(result.approval)
        extension["approval"] = _approval(result.approval)
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{result.message_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "lamina": extension,
    }
    if result.usage is not None:
        completion["usage"] = _usage(result.usage.input_tokens, result.usage.output_tokens)
    return completion


async def _turn_chunks(
    model: str, events: AsyncGenerator[TurnEvent, None], include_usage: bool
) -> AsyncIterator[bytes]:
    """The turn's events as ``chat.completion.chunk`` events: the answer text as it
    comes, then a last chunk with ``finish_reason`` and the ``lamina`` extension."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _event({**base, "choices": [choice], **extra})

    citations: tuple[Citation, ...] = ()
    yield chunk({"role": "assistant", "content": ""})
    async with aclosing(events) as turn:
        async for event in turn:
            match event:
                case AnswerDelta():
                    yield chunk({"content": event.text})
                case CitationsEvent():
                    citations = event.citations
                case ApprovalRequiredEvent():
                    yield chunk({"content": approval_notice(event)})
                    extension = _turn_extension(event.conversation_id, event.message_id, ())
                    extension["approval"] = _approval(event)
                    yield chunk({}, "stop", lamina=extension)
                case DoneEvent():
                    extension = _turn_extension(event.conversation_id, event.message_id, citations)
                    yield chunk({}, "stop", lamina=extension)
                    if include_usage and event.usage is not None:
                        usage = _usage(event.usage.input_tokens, event.usage.output_tokens)
                        yield _event({**base, "choices": [], "usage": usage})
                case ErrorEvent():
                    # The stream has started: only an error event can report the failure.
                    error = OpenAIError(500, event.message, "api_error", event.code)
                    yield _event({"error": error.body()})
                    return
    yield b"data: [DONE]\n\n"


def _turn_extension(
    conversation_id: str, message_id: str, citations: tuple[Citation, ...]
) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "message_id": message_id,
        "citations": [asdict(c) for c in citations],
    }


def approval_notice(event: ApprovalRequiredEvent) -> str:
    """What a client that knows nothing of approvals shows its user when a turn paused."""
    return (
        f"This needs a person's approval before it can go on: {event.summary.rstrip('.')}. "
        f"Approve or reject it with POST /v1/approvals/{event.approval_id} before "
        f"{event.expires_at.isoformat()}; the answer continues there."
    )


def _approval(event: ApprovalRequiredEvent) -> dict[str, Any]:
    return {
        "approval_id": event.approval_id,
        "tool": event.tool,
        "arguments": dict(event.arguments),
        "summary": event.summary,
        "expires_at": event.expires_at.isoformat(),
    }


# --- mapping -------------------------------------------------------------------------


async def _request(body: ChatCompletionsBody, caps: RequestCaps) -> ChatRequest:
    """The body's typed reading, once the caps have passed it. The caps count the prompt
    with the gateway's counter, and the gateway routes on that count without recounting."""
    schema: ResponseSchema | None = None
    if body.response_format is not None and body.response_format.type == "json_schema":
        spec = body.response_format.json_schema
        if spec is None:
            raise OpenAIError(
                400, "response_format.json_schema is required.", "invalid_request_error"
            )
        schema = ResponseSchema(spec.name, spec.schema_, spec.strict)
    messages = [_message(m) for m in body.messages]
    tools = [
        ToolDefinition(t.function.name, t.function.description, t.function.parameters)
        for t in body.tools
    ]
    max_tokens = body.max_completion_tokens or body.max_tokens
    return ChatRequest(
        messages=messages,
        tools=tools,
        max_tokens=max_tokens,
        temperature=body.temperature,
        response_format=schema,
        deployment=None if body.model == AUTO else body.model,
        prompt_tokens=await caps.check_completion(messages, tools, max_tokens),
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
        # The name the provider reported, as the non-streaming reply carries it.
        "model": first.model,
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
