"""Chat completion bodies forwarded as they are: the gateway's passthrough path.

An OpenAI-compatible client talking to Lamina's ``/v1/chat/completions`` already
speaks the wire format, so re-typing its body through the ``openai`` SDK would
cost milliseconds of CPU per request and drop every parameter Lamina does not
model (``seed``, ``logprobs``, ``n``...). :class:`WireForwarder` posts the body
over a pooled aiohttp session with only ``model`` replaced, and maps HTTP
failures onto the same typed errors as the SDK path.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from inferencing.contracts import (
    ChatResponse,
    InferenceCaller,
    InferenceError,
    ProviderTimeout,
    ProviderUnavailable,
    ToolCall,
)
from inferencing.providers.openai_errors import MALFORMED, TIMED_OUT, UNAVAILABLE, status_error
from inferencing.settings import TimeoutSettings


@dataclass(frozen=True, slots=True)
class WireTarget:
    """Where a deployment's chat completions are posted, and how they authenticate.

    ``model`` replaces the body's ``model`` (None for Azure, whose URL names the
    deployment); ``bearer`` returns a fresh token per request (Microsoft Entra).
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    bearer: Callable[[], Awaitable[str]] | None = None


class WireForwarder:
    def __init__(self, target: WireTarget, timeouts: TimeoutSettings) -> None:
        self._target = target
        self._timeout = aiohttp.ClientTimeout(
            total=timeouts.total_s, sock_connect=timeouts.connect_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def forward(self, payload: Mapping[str, Any], caller: InferenceCaller) -> dict[str, Any]:
        target = self._target
        body = dict(payload)
        if target.model is not None:
            body["model"] = target.model
        headers = {"Content-Type": "application/json", **target.headers}
        if target.bearer is not None:
            headers["Authorization"] = f"Bearer {await target.bearer()}"
        try:
            async with self._client().post(
                target.url, data=orjson.dumps(body), headers=headers
            ) as response:
                raw = await response.read()
                status, response_headers = response.status, response.headers
        except TimeoutError as exc:
            raise ProviderTimeout(TIMED_OUT, retryable=True, details=_why(exc)) from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(UNAVAILABLE, retryable=True, details=_why(exc)) from exc
        if status >= 400:
            raise _http_error(status, raw, response_headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not data.get("choices"):
            raise ProviderUnavailable(
                MALFORMED, retryable=True, details={"body": raw[:500].decode(errors="replace")}
            )
        return data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                json_serialize=lambda value: orjson.dumps(value).decode(),
            )
        return self._session


def completion_body(response: ChatResponse) -> dict[str, Any]:
    """A typed response in the chat completion wire format (for models that do not
    speak it themselves, such as the extractive answerer)."""
    message: dict[str, Any] = {"role": "assistant", "content": response.message.content}
    if response.message.tool_calls:
        message["tool_calls"] = [wire_tool_call(call) for call in response.message.tool_calls]
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": message, "finish_reason": response.finish_reason}],
    }
    if response.usage is not None:
        body["usage"] = {
            "prompt_tokens": response.usage.input_tokens,
            "completion_tokens": response.usage.output_tokens,
            "total_tokens": response.usage.input_tokens + response.usage.output_tokens,
        }
    return body


def wire_tool_call(call: ToolCall) -> dict[str, Any]:
    """A tool call in the chat completion wire format."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _http_error(status: int, raw: bytes, headers: Mapping[str, str]) -> InferenceError:
    code: object = None
    try:
        error = orjson.loads(raw).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (orjson.JSONDecodeError, AttributeError):
        pass  # not OpenAI's error shape: the status alone decides
    details = {"status_code": status, "provider_body": raw[:500].decode(errors="replace")}
    return status_error(status, code if isinstance(code, str) else None, headers, details)


def _why(exc: BaseException) -> dict[str, Any]:
    return {"provider_error": type(exc).__name__, "provider_message": str(exc)}
