"""Chat model on the ``openai`` SDK: OpenAI, Azure OpenAI or any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall
from openai.types.completion_usage import CompletionUsage

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    EmbeddingResponse,
    InferenceCaller,
    InferenceError,
    InvalidModelRequest,
    ModelCapabilities,
    ProviderUnavailable,
    Role,
    ToolCall,
    ToolDefinition,
    Usage,
)
from inferencing.providers.openai_errors import (
    MALFORMED,
    provider_error,
    stream_interrupted,
)
from inferencing.providers.openai_wire import WireForwarder
from inferencing.telemetry import ModelCall, ModelTarget

_T = TypeVar("_T")


class OpenAICompatibleChatModel:
    """A :class:`~inferencing.contracts.ChatModel` over an ``AsyncOpenAI`` client.

    The client decides where requests go (OpenAI, an Azure OpenAI deployment, a local
    server) and how they authenticate; this class maps Lamina's request and response
    types onto chat completions and turns every SDK exception into an
    :class:`~inferencing.contracts.InferenceError`. ``documents`` in a request are not
    sent: the caller renders them into the prompt.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        name: str | None = None,
        capabilities: ModelCapabilities | None = None,
        default_max_tokens: int | None = None,
        default_temperature: float | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        forwarder: WireForwarder | None = None,
    ) -> None:
        """``on_close`` releases what the client depends on (e.g. an Azure credential);
        ``forwarder`` posts raw chat completion bodies to the same deployment."""
        self._client = client
        self._forwarder = forwarder
        self._model = model
        self._name = name or model
        self._capabilities = capabilities or ModelCapabilities(tool_calls=True)
        self._default_max_tokens = default_max_tokens
        self._default_temperature = default_temperature
        self._on_close = on_close
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> ModelCapabilities:
        return self._capabilities

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        arguments = self._arguments(request)
        try:
            completion: ChatCompletion = await self._client.chat.completions.create(**arguments)
        except openai.OpenAIError as exc:
            raise provider_error(exc) from exc
        return _response(completion)

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        """Text as it arrives; tool calls whole, in one delta, once the model has finished
        them; then a last delta with the finish reason and usage.

        A failure before any delta was yielded raises the same errors as :meth:`complete`
        (the caller may still retry or fail over); after that it raises
        :class:`~inferencing.contracts.StreamInterrupted`.
        """
        arguments = self._arguments(request)
        try:
            chunks: openai.AsyncStream[
                ChatCompletionChunk
            ] = await self._client.chat.completions.create(
                **arguments, stream=True, stream_options={"include_usage": True}
            )
        except openai.OpenAIError as exc:
            raise provider_error(exc) from exc

        calls = _ToolCallAssembler()
        finish_reason: str | None = None
        usage: Usage | None = None
        model = ""
        # Once anything reached the caller, a failure can no longer be retried or failed
        # over transparently: it becomes StreamInterrupted.
        delivered = False
        async with chunks:
            iterator = aiter(chunks)
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                except openai.OpenAIError as exc:
                    raise (stream_interrupted(exc) if delivered else provider_error(exc)) from exc
                except ValueError as exc:  # an event that is not JSON
                    raise _garbled(exc, delivered) from exc
                model = model or chunk.model or ""
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices or ():
                    if choice.index != 0:
                        continue
                    if choice.delta.content:
                        delivered = True
                        yield ChatDelta(content=choice.delta.content, model=model)
                    for fragment in choice.delta.tool_calls or ():
                        calls.add(fragment)
                    if choice.finish_reason is not None and finish_reason is None:
                        finish_reason = choice.finish_reason
                        finished = calls.finish(delivered)
                        if finished:
                            delivered = True
                            yield ChatDelta(tool_calls=finished, model=model)
        if finish_reason is None:
            # The body ended cleanly but the model never said it was done.
            if delivered:
                raise stream_interrupted(None, reason="stream ended without a finish_reason")
            raise ProviderUnavailable(
                MALFORMED, retryable=True, details={"reason": "stream ended before any output"}
            )
        yield ChatDelta(finish_reason=finish_reason, usage=usage, model=model)

    async def forward(self, payload: Mapping[str, Any], caller: InferenceCaller) -> dict[str, Any]:
        """``payload``, a chat completion body, posted as it is but for ``model``; the
        parsed response. Raises :class:`~inferencing.contracts.InferenceError`s."""
        if self._forwarder is None:
            raise InvalidModelRequest(
                "This model does not accept forwarded requests.", details={"model": self._name}
            )
        return await self._forwarder.forward(payload, caller)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._forwarder is not None:
            await self._forwarder.aclose()
        await self._client.close()
        if self._on_close is not None:
            await self._on_close()

    # --- request mapping ---------------------------------------------------------

    def _arguments(self, request: ChatRequest) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` common to both calls."""
        if request.tools and not self._capabilities.tool_calls:
            raise InvalidModelRequest(
                "This model cannot call tools.",
                details={"model": self._name, "tools": [t.name for t in request.tools]},
            )
        if request.response_format is not None and not self._capabilities.json_schema:
            raise InvalidModelRequest(
                "This model cannot produce structured output.", details={"model": self._name}
            )
        arguments: dict[str, Any] = {
            "model": self._model,
            "messages": [_message(m) for m in request.messages],
            "max_tokens": _given(request.max_tokens, self._default_max_tokens),
            "temperature": _given(request.temperature, self._default_temperature),
        }
        if request.tools:
            arguments["tools"] = [_tool(t) for t in request.tools]
        if (schema := request.response_format) is not None:
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema.name,
                    "schema": dict(schema.schema),
                    "strict": schema.strict,
                },
            }
        return arguments


def _garbled(exc: ValueError, delivered: bool) -> InferenceError:
    details = {"reason": "undecodable stream event", "error": str(exc)}
    if delivered:
        return stream_interrupted(None, **details)
    return ProviderUnavailable(MALFORMED, retryable=True, details=details)


def _given(value: _T | None, default: _T | None) -> _T | openai.Omit:
    chosen = value if value is not None else default
    return openai.omit if chosen is None else chosen


def _message(message: ChatMessage) -> ChatCompletionMessageParam:
    match message.role:
        case Role.SYSTEM:
            return {"role": "system", "content": message.content or ""}
        case Role.USER:
            return {"role": "user", "content": message.content or ""}
        case Role.ASSISTANT:
            if not message.tool_calls:
                return {"role": "assistant", "content": message.content or ""}
            calls: list[ChatCompletionMessageFunctionToolCallParam] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ]
            return {"role": "assistant", "content": message.content, "tool_calls": calls}
        case Role.TOOL:
            if not message.tool_call_id:
                raise InvalidModelRequest(
                    "A tool result must name the tool call it answers.",
                    details={"content": message.content},
                )
            return {
                "role": "tool",
                "content": message.content or "",
                "tool_call_id": message.tool_call_id,
            }


def _tool(tool: ToolDefinition) -> ChatCompletionFunctionToolParam:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        },
    }


# --- response mapping ----------------------------------------------------------------


def _response(completion: ChatCompletion) -> ChatResponse:
    if not completion.choices:
        raise ProviderUnavailable(MALFORMED, details={"reason": "no choices", "id": completion.id})
    choice = completion.choices[0]
    calls = tuple(
        ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
        for call in choice.message.tool_calls or ()
        if isinstance(call, ChatCompletionMessageFunctionToolCall)
    )
    return ChatResponse(
        message=ChatMessage(Role.ASSISTANT, content=choice.message.content, tool_calls=calls),
        finish_reason=choice.finish_reason,
        model=completion.model,
        usage=_usage(completion.usage) if completion.usage else None,
    )


def _usage(usage: CompletionUsage) -> Usage:
    return Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


@dataclass
class _PartialToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _ToolCallAssembler:
    """Joins the fragments of streamed tool calls (keyed by ``index``) into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, _PartialToolCall] = {}

    def add(self, fragment: ChoiceDeltaToolCall) -> None:
        call = self._calls.setdefault(fragment.index, _PartialToolCall())
        if fragment.id and not call.id:
            call.id = fragment.id
        function = fragment.function
        if function is None:
            return
        # Some servers repeat the whole name in every fragment; OpenAI sends it once.
        if function.name and function.name != call.name:
            call.name += function.name
        if function.arguments:
            call.arguments.append(function.arguments)

    def finish(self, delivered: bool) -> tuple[ToolCall, ...]:
        calls: list[ToolCall] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            if not partial.name:
                details = {"reason": "tool call without a name", "index": index}
                if delivered:
                    raise stream_interrupted(None, **details)
                raise ProviderUnavailable(MALFORMED, details=details)
            calls.append(
                ToolCall(
                    id=partial.id or f"call_{index}",
                    name=partial.name,
                    arguments="".join(partial.arguments) or "{}",
                )
            )
        self._calls.clear()
        return tuple(calls)


class OpenAIEmbeddingModel:
    """An :class:`~inferencing.contracts.EmbeddingModel` over an ``AsyncOpenAI`` client
    (OpenAI, an Azure OpenAI embeddings deployment, or an OpenAI-compatible server).

    Embedding calls do not pass the gateway, so each is its own ``embeddings {model}``
    span here, with its token usage (:mod:`inferencing.telemetry`); the texts never
    reach the span."""

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        dimensions: int | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        target: ModelTarget | None = None,
    ) -> None:
        """``on_close`` releases what the client depends on (e.g. an Azure credential);
        ``target`` names the deployment in telemetry (by default, an OpenAI model)."""
        self._client = client
        self._model = model
        self._dimensions = dimensions
        self._on_close = on_close
        self._target = target or ModelTarget(deployment=model, provider="openai", model=model)

    @property
    def name(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int | None:
        return self._dimensions

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        if not texts:
            return EmbeddingResponse((), self._model, Usage(0, 0))
        with ModelCall("embeddings", target=self._target) as telemetry, telemetry.current():
            try:
                result = await self._client.embeddings.create(
                    model=self._model,
                    input=list(texts),
                    dimensions=self._dimensions if self._dimensions is not None else openai.omit,
                )
            except openai.OpenAIError as exc:
                raise provider_error(exc) from exc
            except ValueError as exc:  # a body that is not JSON
                raise ProviderUnavailable(
                    MALFORMED, retryable=True, details={"error": str(exc)}
                ) from exc
            ordered = sorted(result.data, key=lambda item: item.index)
            if len(ordered) != len(texts):
                raise ProviderUnavailable(
                    MALFORMED, details={"expected": len(texts), "received": len(ordered)}
                )
            usage = Usage(result.usage.prompt_tokens, 0) if result.usage else None
            telemetry.answered(response_model=result.model)
            if usage is not None:
                telemetry.used(usage, tenant_id=caller.tenant_id, estimated=False)
            return EmbeddingResponse(
                tuple(tuple(item.embedding) for item in ordered), result.model, usage
            )

    async def aclose(self) -> None:
        await self._client.close()
        if self._on_close is not None:
            await self._on_close()
            self._on_close = None
