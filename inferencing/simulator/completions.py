"""Chat completions in the OpenAI wire format: request checks, replies, streamed chunks."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inferencing.simulator.config import ScriptedReply, SimulatorConfig
from inferencing.simulator.structured import structured_content

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD_PIECE = re.compile(r"\S+\s*|\s+")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: words and punctuation marks."""
    return len(_TOKEN.findall(text))


def word_pieces(text: str) -> list[str]:
    """``text`` split into words with their trailing spaces; joined they give ``text`` back."""
    return _WORD_PIECE.findall(text)


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping)
        ).strip()
    return ""


def check_chat_request(body: Any) -> str | None:
    """What OpenAI would refuse with HTTP 400, as its error message; None if acceptable."""
    if not isinstance(body, Mapping):
        return "The request body must be a JSON object."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array."
    unanswered: set[str] = set()
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            return f"Invalid value for 'messages[{position}].role'."
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in unanswered:
                return (
                    f"Invalid parameter: messages[{position}] with role 'tool' must be a "
                    "response to a preceding message with 'tool_calls'."
                )
            unanswered.discard(call_id)
            continue
        if unanswered:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                f"responding to each 'tool_call_id'. Missing: {', '.join(sorted(unanswered))}."
            )
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                if not isinstance(call, Mapping) or not isinstance(call.get("id"), str):
                    return f"Invalid value for 'messages[{position}].tool_calls'."
                unanswered.add(call["id"])
    for position, tool in enumerate(body.get("tools") or ()):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            return f"Invalid value for 'tools[{position}]'."
    return None


def offered_tools(body: Mapping[str, Any]) -> frozenset[str]:
    """The names of the functions a request offers (after ``check_chat_request``)."""
    return frozenset(tool["function"]["name"] for tool in body.get("tools") or ())


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tokens of the messages' texts and of the arguments of their tool calls."""
    return sum(count_tokens(message_text(m)) for m in messages) + sum(
        count_tokens(str((c.get("function") or {}).get("arguments", "")))
        for m in messages
        for c in m.get("tool_calls") or ()
    )


def completion_limit(body: Mapping[str, Any]) -> int | None:
    """The completion tokens asked for (``max_completion_tokens``, else ``max_tokens``)."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) and limit > 0 else None


def context_length_problem(body: Mapping[str, Any], context_window: int) -> str | None:
    """OpenAI's message when prompt plus ``max_tokens`` exceed ``context_window``; else None."""
    prompt = prompt_tokens(body["messages"])
    completion = completion_limit(body) or 0
    total = prompt + completion
    if total <= context_window:
        return None
    message = (
        f"This model's maximum context length is {context_window} tokens. "
        f"However, your messages resulted in {total} tokens"
    )
    if completion:
        return (
            f"{message} ({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return f"{message}. Please reduce the length of the messages."


def default_reply_text(messages: Sequence[Mapping[str, Any]], config: SimulatorConfig) -> str:
    if config.default_reply is not None:
        return config.default_reply
    last = messages[-1]
    if last.get("role") == "tool":
        return f"Simulated answer using the tool result: {message_text(last)}"
    for message in reversed(messages):
        if message.get("role") == "user":
            return f"Simulated reply to: {message_text(message)}"
    return "Simulated reply."


@dataclass(frozen=True, slots=True)
class PlannedToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class PlannedReply:
    """A reply fully decided before any byte is sent, so JSON and SSE agree."""

    id: str
    created: int
    model: str
    pieces: tuple[str, ...]
    tool_calls: tuple[PlannedToolCall, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def content(self) -> str | None:
        return "".join(self.pieces) if self.pieces or not self.tool_calls else None

    @property
    def completion_tokens(self) -> int:
        calls = sum(count_tokens(c.name) + count_tokens(c.arguments) for c in self.tool_calls)
        return len(self.pieces) + calls

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def plan_reply(
    scripted: ScriptedReply | None,
    body: Mapping[str, Any],
    *,
    model: str,
    config: SimulatorConfig,
) -> PlannedReply:
    messages: list[Mapping[str, Any]] = body["messages"]
    if scripted is None or (scripted.content is None and not scripted.tool_calls):
        text: str | None = structured_content(body) or default_reply_text(messages, config)
    else:
        text = scripted.content
    pieces = word_pieces(text) if text else []
    tool_calls = tuple(
        PlannedToolCall(call.id or f"call_{secrets.token_hex(12)}", call.name, call.arguments)
        for call in (scripted.tool_calls if scripted else ())
    )
    finish_reason = scripted.finish_reason if scripted and scripted.finish_reason else None
    limit = completion_limit(body)
    if limit is not None and len(pieces) > limit:
        pieces = pieces[:limit]
        finish_reason = finish_reason or "length"
    return PlannedReply(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=model,
        pieces=tuple(pieces),
        tool_calls=tool_calls,
        finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        prompt_tokens=prompt_tokens(messages),
    )


def completion_body(reply: PlannedReply) -> dict[str, Any]:
    """The JSON body of a non-streaming ``chat.completion``."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": reply.usage(),
    }


def completion_chunks(
    reply: PlannedReply, *, include_usage: bool, argument_chunk_chars: int
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` events of a stream, in order (``[DONE]`` not included).

    As OpenAI does: a first chunk with the role, one chunk per content piece, tool calls
    announced with id and name and then their arguments in fragments, a chunk with the
    ``finish_reason``, and, when usage was asked for, a last chunk with empty ``choices``.
    """
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
            **extra,
        }

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    chunks.extend(chunk({"content": piece}) for piece in reply.pieces)
    for index, call in enumerate(reply.tool_calls):
        head = {"index": index, "id": call.id, "type": "function"}
        chunks.append(
            chunk({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
        )
        for start in range(0, len(call.arguments), argument_chunk_chars):
            fragment = call.arguments[start : start + argument_chunk_chars]
            chunks.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            )
    chunks.append(chunk({}, reply.finish_reason))
    if include_usage:
        chunks.append(
            {
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": reply.created,
                "model": reply.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": reply.usage(),
            }
        )
    return chunks
