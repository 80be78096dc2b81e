"""What the simulator does: scripted replies, faults, pacing (all plain data)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FaultKind = Literal["rate_limited", "unavailable", "timeout", "stream_cut", "status"]


class Fault(BaseModel):
    """A failure the simulator plays instead of (or in the middle of) a reply.

    - ``rate_limited``: HTTP 429 with ``Retry-After: retry_after_s``.
    - ``unavailable``: HTTP 503.
    - ``status``: any HTTP error ``status_code`` (400, 401, 500, ...).
    - ``timeout``: hang ``hang_s`` seconds before answering (longer than the client waits).
    - ``stream_cut``: send ``after_chunks`` data events, then drop the connection without
      ``[DONE]``. On a non-streaming request the JSON body is cut in half.
    """

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    retry_after_s: float = Field(default=1.0, ge=0)
    status_code: int = Field(default=500, ge=400, le=599)
    hang_s: float = Field(default=30.0, gt=0)
    after_chunks: int = Field(default=2, ge=0)
    message: str | None = None


class ScriptedToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str = "{}"
    id: str | None = None

    @field_validator("arguments", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        # Scripts may give arguments as an object; the wire carries JSON text.
        if isinstance(value, dict | list):
            return json.dumps(value)
        return value


class ScriptedReply(BaseModel):
    """One answer of the simulated model: text, tool calls, a fault, or text cut by a fault."""

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)
    fault: Fault | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> ScriptedReply:
        if self.content is None and not self.tool_calls and self.fault is None:
            raise ValueError("a scripted reply needs content, tool_calls or a fault")
        return self


class SimulatorConfig(BaseModel):
    """Behaviour of the simulator. Replies in ``script`` are played in order, one per chat
    request; once the queue is empty the default reply is used."""

    model_config = ConfigDict(extra="forbid")

    model: str = "lamina-sim"
    script: list[ScriptedReply] = Field(default_factory=list)
    embedding_faults: list[Fault] = Field(default_factory=list)
    default_reply: str | None = Field(
        default=None,
        description="Fixed text for unscripted requests; None echoes the last user message",
    )
    first_token_latency_s: float = Field(default=0.0, ge=0)
    tokens_per_second: float | None = Field(
        default=None, gt=0, description="Pacing of generated tokens; None sends at once"
    )
    tool_argument_chunk_chars: int = Field(
        default=8, ge=1, description="Size of the argument fragments of a streamed tool call"
    )
    embedding_dims: int = Field(default=256, ge=1, le=8192)
    accepted_credentials: list[str] = Field(
        default_factory=list,
        description="API keys or bearer tokens accepted; empty accepts any (or none)",
    )


class ConfigUpdate(BaseModel):
    """Partial change of the pacing and defaults (``POST /_sim/config``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    default_reply: str | None = None
    first_token_latency_s: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, gt=0)
    tool_argument_chunk_chars: int | None = Field(default=None, ge=1)
    embedding_dims: int | None = Field(default=None, ge=1, le=8192)
    accepted_credentials: list[str] | None = None


class ScriptUpdate(BaseModel):
    """Body of ``POST /_sim/script``: replies and embedding faults to queue."""

    model_config = ConfigDict(extra="forbid")

    replies: list[ScriptedReply] = Field(default_factory=list)
    embedding_faults: list[Fault] = Field(default_factory=list)


class RecordedRequest(BaseModel):
    """A request the simulator received, as the client sent it (headers lower-cased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
