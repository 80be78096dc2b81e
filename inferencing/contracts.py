"""Public contract of the inferencing layer.

Callers (the intelligence layer) import only this module. Every model call goes
through a :class:`ChatModel`; providers live in ``inferencing.providers`` and
are wired by the composition root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call requested by the model. ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function the model may call: name, description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class GroundingDocument:
    """A source the answer may cite as ``[ref]``.

    The intelligence layer also renders these into the prompt for generative
    models; answerers that need no model (the extractive one) read them here.
    """

    ref: int
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class ResponseSchema:
    """Structured output: the answer must be JSON valid against ``schema``."""

    name: str
    schema: Mapping[str, Any]
    strict: bool = True


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One model call.

    ``deployment`` pins the call to a named deployment of the gateway's registry (the
    deployment's failover chain still applies); None lets the router choose.
    ``prompt_version`` names the prompt the messages were rendered from, for metering.
    ``prompt_tokens``: the messages and tools counted with the gateway's own token
    counter, when the caller has counted them already (the edge's caps check does), so
    the gateway does not count the prompt again; None: the gateway counts.
    """

    messages: Sequence[ChatMessage]
    tools: Sequence[ToolDefinition] = ()
    documents: Sequence[GroundingDocument] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    response_format: ResponseSchema | None = None
    deployment: str | None = None
    prompt_version: str | None = None
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """Where the gateway sent a call, and why.

    ``reasons`` explain the choice in words (capability, complexity, cost, retirement,
    open breakers); ``attempts`` lists every deployment tried, in order, with its
    outcome (``ok`` or an error kind).
    """

    deployment: str
    model: str
    model_version: str | None
    reasons: tuple[str, ...] = ()
    attempts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ChatResponse:
    message: ChatMessage
    finish_reason: str
    model: str
    usage: Usage | None = None
    route: RouteInfo | None = None


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One piece of a streamed answer.

    ``content`` carries text as it arrives. Tool calls are delivered whole, once
    the model has finished them, in a delta of their own. The last delta has a
    ``finish_reason`` and, where the provider reports it, ``usage``; through the
    gateway it also carries the ``route``. ``model`` is the model name the provider
    reported for the stream, where it reports one ("" otherwise).
    """

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    route: RouteInfo | None = None
    model: str = ""


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    streaming: bool = True
    tool_calls: bool = False
    json_schema: bool = False
    generative: bool = True
    """False for answerers that only extract from the grounding documents."""
    context_window: int | None = None
    """Most tokens (prompt plus output) one call may use; None when unknown or unbounded."""


class InferenceCaller(Protocol):
    """What inferencing needs to know of the caller (quotas, metering)."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...


@runtime_checkable
class ChatModel(Protocol):
    """A chat model, local or remote. Implementations never leak raw provider errors:
    they raise :class:`InferenceError` subclasses."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> ModelCapabilities: ...

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse: ...

    def stream(self, request: ChatRequest, caller: InferenceCaller) -> AsyncIterator[ChatDelta]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ChatForwarder(Protocol):
    """A chat model that also takes chat completion bodies in OpenAI's wire format as
    they are (the gateway's passthrough), returning the parsed response body."""

    async def forward(
        self, payload: Mapping[str, Any], caller: InferenceCaller
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class EmbeddingResponse:
    vectors: tuple[tuple[float, ...], ...]
    model: str
    usage: Usage | None = None


@runtime_checkable
class EmbeddingModel(Protocol):
    """Turns texts into vectors, one per text, in order. Errors as for :class:`ChatModel`."""

    @property
    def name(self) -> str: ...

    @property
    def dimensions(self) -> int | None: ...

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse: ...

    async def aclose(self) -> None: ...


# --- token budgets: rate limits and quotas around every model call ------------


@dataclass(frozen=True, slots=True)
class LimitState:
    """Where a caller stands against one limit (for ``RateLimit-*`` headers)."""

    name: str
    """Which limit, e.g. ``tenant-tokens-per-minute`` or ``user-tokens-per-day``."""
    limit: int
    remaining: int
    reset_s: float
    """Seconds until the window has room again (rate limits) or the period ends (quotas)."""


@dataclass(frozen=True, slots=True)
class TokenReservation:
    """Tokens held for one model call until :meth:`TokenBudget.reconcile` settles them."""

    id: str
    tokens: int


@runtime_checkable
class TokenBudget(Protocol):
    """Token rate limits and quotas, charged by the gateway around every model call:
    the prompt estimate plus ``max_tokens`` is reserved before the call, and replaced
    by the tokens actually used after it."""

    async def reserve(self, caller: InferenceCaller, tokens: int) -> TokenReservation:
        """Hold ``tokens`` or raise :class:`TokenRateLimited` / :class:`TokenQuotaExceeded`."""
        ...

    async def reconcile(self, reservation: TokenReservation, used_tokens: int) -> None:
        """Replace the reservation by what was used (0 when the call failed). Never raises."""
        ...


# --- safety models: prompt shields and content moderation -------------------------


@dataclass(frozen=True, slots=True)
class ShieldVerdict:
    attack: bool
    score: float
    """Confidence in ``attack``, 0 to 1 (detectors that only say yes/no give 0 or 1)."""
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ShieldResult:
    detector: str
    prompt: ShieldVerdict | None
    """The verdict on the user prompt, None when none was given."""
    documents: tuple[ShieldVerdict, ...] = ()
    """One verdict per document, in order."""


@runtime_checkable
class PromptShield(Protocol):
    """Detects prompt injection and jailbreak attempts: direct ones in the user's prompt,
    indirect ones in documents (retrieved passages, tool outputs) bound for a model."""

    @property
    def name(self) -> str: ...

    async def shield(self, prompt: str | None, documents: Sequence[str] = ()) -> ShieldResult: ...


@dataclass(frozen=True, slots=True)
class ModerationResult:
    severities: Mapping[str, int]
    """Severity per harm category (e.g. Hate, SelfHarm, Sexual, Violence), 0 = safe."""
    flagged: tuple[str, ...] = ()
    """Categories at or above the configured threshold."""


@runtime_checkable
class ContentModerator(Protocol):
    """Classifies text into harm categories with a severity each."""

    @property
    def name(self) -> str: ...

    async def moderate(self, text: str) -> ModerationResult: ...


# --- errors ------------------------------------------------------------------


@dataclass
class InferenceError(Exception):
    """Base of every inferencing failure. ``message`` is safe to show a user."""

    message: str
    retryable: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class ProviderUnavailable(InferenceError):
    """The provider failed or could not be reached (5xx, connection error)."""


@dataclass
class ProviderRateLimited(InferenceError):
    retry_after_s: float | None = None


class ProviderTimeout(InferenceError):
    """The provider did not answer in time."""


class StreamInterrupted(InferenceError):
    """The provider's stream broke after it had started."""


class InvalidModelRequest(InferenceError):
    """The provider refused the request as malformed or too long."""


class ContextWindowExceeded(InvalidModelRequest):
    """The prompt plus the requested output does not fit the model's context window."""


class UnknownDeployment(InvalidModelRequest):
    """The request names a deployment the registry does not have."""


class NoDeploymentAvailable(ProviderUnavailable):
    """No configured deployment can serve the request now (all retired, open or failed)."""


class ProviderAuthenticationFailed(InferenceError):
    """Credentials for the provider were missing or refused."""


@dataclass
class TokenRateLimited(InferenceError):
    """A tokens-per-minute limit has no room for this call now (HTTP 429)."""

    state: LimitState | None = None
    retry_after_s: float = 1.0


@dataclass
class TokenQuotaExceeded(InferenceError):
    """A daily or monthly token quota is used up (HTTP 403)."""

    state: LimitState | None = None


class SafetyServiceUnavailable(ProviderUnavailable):
    """The content-safety service failed or could not be reached."""
