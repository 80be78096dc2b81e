"""What the simulator does: scripted replies, faults, pacing (all plain data)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FaultKind = Literal["rate_limited", "unavailable", "timeout", "stream_cut", "status"]
RandomFaultKind = Literal["rate_limited", "unavailable", "timeout", "status"]
"""The faults a :class:`FaultProfile` draws for a failing request (cuts have their own rate)."""
LatencyKind = Literal["fixed", "uniform", "lognormal"]


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
    """One answer of the simulated model: text, tool calls, a fault, or text cut by a fault.

    ``when_tool`` keeps the reply for a request that offers a tool of that name: other
    requests pass it by (they take the first reply without a condition behind it, or
    behave as unscripted). So a scripted tool call waits for the turn that can take it,
    even when unrelated requests reach the same simulator (a gateway failing over to it).
    """

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)
    fault: Fault | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None
    when_tool: str | None = Field(
        default=None,
        min_length=1,
        description="Played only for a request offering a tool (function) of this name",
    )

    @model_validator(mode="after")
    def _says_something(self) -> ScriptedReply:
        if self.content is None and not self.tool_calls and self.fault is None:
            raise ValueError("a scripted reply needs content, tool_calls or a fault")
        return self


class Latency(BaseModel):
    """A distribution of delays, sampled once per request.

    - ``fixed``: always ``seconds``.
    - ``uniform``: between ``min_s`` and ``max_s``.
    - ``lognormal``: median ``p50_s`` and 99th percentile ``p99_s``, the long right tail of
      real model latency (see :func:`inferencing.simulator.profiles.lognormal_parameters`).
    """

    model_config = ConfigDict(extra="forbid")

    kind: LatencyKind = "fixed"
    seconds: float = Field(default=0.0, ge=0)
    min_s: float = Field(default=0.0, ge=0)
    max_s: float = Field(default=0.0, ge=0)
    p50_s: float | None = Field(default=None, gt=0)
    p99_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _parameters_fit_the_kind(self) -> Latency:
        if self.kind == "uniform" and self.min_s > self.max_s:
            raise ValueError("a uniform latency needs min_s <= max_s")
        if self.kind == "lognormal":
            if self.p50_s is None or self.p99_s is None:
                raise ValueError("a lognormal latency needs p50_s and p99_s")
            if self.p99_s < self.p50_s:
                raise ValueError("a lognormal latency needs p99_s >= p50_s")
        return self


_ONLY_UNAVAILABLE: dict[RandomFaultKind, float] = {"unavailable": 1.0}


class FaultProfile(BaseModel):
    """How one deployment misbehaves at random, drawn from ``SimulatorConfig.seed``.

    A request that takes a scripted reply from the queue draws no random fault or cut;
    the profile's latency, pacing and context window still apply to it.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(default=0.0, ge=0, le=1, description="Probability a request fails")
    kinds: dict[RandomFaultKind, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: _ONLY_UNAVAILABLE.copy(),
        description="Relative weights of the faults a failing request plays",
    )
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After of a 429")
    status_code: int = Field(default=500, ge=400, le=599, description="Status of a `status` fault")
    hang_s: float = Field(default=30.0, gt=0, description="How long a `timeout` fault hangs")
    stream_cut_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Probability a streamed answer that did not fail is cut before its end",
    )
    first_token_latency: Latency | None = Field(
        default=None, description="Time to first token; None uses first_token_latency_s"
    )
    tokens_per_second: float | None = Field(
        default=None, gt=0, description="Pacing of generated tokens; None uses the global one"
    )
    context_window: int | None = Field(
        default=None,
        ge=1,
        description="Prompt plus max_tokens above this is refused with context_length_exceeded",
    )

    @model_validator(mode="after")
    def _some_kind_can_be_drawn(self) -> FaultProfile:
        if not any(weight > 0 for weight in self.kinds.values()):
            raise ValueError("kinds needs at least one positive weight")
        return self

    def fault(self, kind: RandomFaultKind) -> Fault:
        """The fault a failing request of this deployment plays."""
        return Fault(
            kind=kind,
            retry_after_s=self.retry_after_s,
            status_code=self.status_code,
            hang_s=self.hang_s,
        )


class SimulatorConfig(BaseModel):
    """Behaviour of the simulator. Replies in ``script`` are played in order, one per chat
    request; once the queue is empty the default reply is used, subject to the random
    faults of the deployment's profile (``profiles``, else ``default_profile``)."""

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
    profiles: dict[str, FaultProfile] = Field(
        default_factory=dict,
        description="Random behaviour per deployment: the Azure path's, else the body's model",
    )
    default_profile: FaultProfile | None = Field(
        default=None, description="Profile of deployments without one of their own"
    )
    seed: int | None = Field(
        default=None, description="Seed of the random draws; None draws differently each run"
    )
    record_requests: bool = Field(
        default=True, description="Keep received requests for /_sim/requests (off for benchmarks)"
    )

    def profile_for(self, deployment: str) -> FaultProfile | None:
        return self.profiles.get(deployment, self.default_profile)


class ConfigUpdate(BaseModel):
    """Partial change of the configuration (``POST /_sim/config``): fields left out keep their
    value; ``profiles`` replaces the whole mapping. ``null`` is accepted only for fields
    whose value may be null (``default_reply``, ``tokens_per_second``, ``default_profile``,
    ``seed``). Setting ``seed`` restarts the random draws."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    default_reply: str | None = None
    first_token_latency_s: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, gt=0)
    tool_argument_chunk_chars: int | None = Field(default=None, ge=1)
    embedding_dims: int | None = Field(default=None, ge=1, le=8192)
    accepted_credentials: list[str] | None = None
    profiles: dict[str, FaultProfile] | None = None
    default_profile: FaultProfile | None = None
    seed: int | None = None
    record_requests: bool | None = None

    @model_validator(mode="after")
    def _null_only_where_allowed(self) -> ConfigUpdate:
        for name in self.model_fields_set:
            if getattr(self, name) is None and name not in _NULLABLE:
                raise ValueError(f"{name} cannot be null")
        return self


_NULLABLE = frozenset(
    name for name, field in SimulatorConfig.model_fields.items() if field.default is None
)


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


class DeploymentStats(BaseModel):
    """What one deployment (or model) was asked and answered (``GET /_sim/stats``).

    ``requests`` counts every chat and embeddings request; each ends as ``completed``, a
    fault of ``faults`` (by kind), one of ``stream_cuts`` (scripted or random), or
    ``rejected`` (400/401: bad request, wrong key, context length exceeded), unless the
    client went away first.
    """

    requests: int = 0
    completed: int = 0
    faults: dict[str, int] = Field(default_factory=dict)
    stream_cuts: int = 0
    rejected: int = 0
