"""Spans and metrics of the inferencing layer, on the OpenTelemetry API.

Every model call is one ``chat {model}`` or ``embeddings {model}`` span (kind CLIENT)
with the GenAI semantic conventions' attributes, whatever the gateway did to serve it:
each attempt (a deployment tried, refused by its breaker or failed) is an event
``lamina.gen_ai.attempt`` on that span, not a span of its own, so that one call reads as
one operation in a trace and its retries and failover as its history. A stream's span
lasts until the stream ends or its consumer closes it.

Prompt and completion text reach a span only when the operator allows it
(``capture_content``, from ``LAMINA_TELEMETRY__CAPTURE_CONTENT``). Metric attributes
are bounded: deployment, model, model version, tenant; never a user.

The instruments are created at import, on the API's proxies: they bind to the SDK
providers once the composition root installs them, and record nothing until then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from inferencing.contracts import (
    ChatMessage,
    ChatRequest,
    InferenceError,
    Role,
    RouteInfo,
    TokenQuotaExceeded,
    TokenRateLimited,
    Usage,
)
from inferencing.settings import DeploymentSettings

tracer = trace.get_tracer("lamina.inferencing")
meter = metrics.get_meter("lamina.inferencing")

# Bucket boundaries advised by the GenAI semantic conventions for these histograms.
_TOKEN_BUCKETS = [4.0**n for n in range(14)]
_DURATION_BUCKETS = [0.01 * 2**n for n in range(14)]
_FIRST_TOKEN_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
]  # fmt: skip

token_usage = meter.create_histogram(
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Tokens used per model call, by gen_ai.token.type (input or output)",
    explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
)
operation_duration = meter.create_histogram(
    "gen_ai.client.operation.duration",
    unit="s",
    description="Duration of a model call through the gateway, retries and failover included",
    explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
)
time_to_first_token = meter.create_histogram(
    "lamina.gen_ai.time_to_first_token",
    unit="s",
    description="From a streamed call's start to its first delta, by deployment",
    explicit_bucket_boundaries_advisory=_FIRST_TOKEN_BUCKETS,
)
cost = meter.create_counter(
    "lamina.gen_ai.cost",
    unit="USD",
    description="Cost of model calls at the registry's prices per 1k tokens (USD by convention)",
)
refusals = meter.create_counter(
    "lamina.gen_ai.refusals",
    unit="{refusal}",
    description="Model calls refused by a token rate limit or quota before reaching a model",
)
breaker_transitions = meter.create_counter(
    "lamina.breaker.transitions",
    unit="{transition}",
    description="Circuit breaker state changes, by deployment and the state entered",
)

PROVIDER_NAMES = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "extractive": "lamina.extractive",
}
"""``gen_ai.provider.name`` of each provider of the registry."""


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """The deployment a model call goes to, as telemetry names it."""

    deployment: str
    provider: str
    """``gen_ai.provider.name``: ``openai``, ``azure.ai.openai`` or ``lamina.extractive``."""
    model: str
    model_version: str | None = None

    @classmethod
    def of(cls, settings: DeploymentSettings) -> ModelTarget:
        return cls(
            deployment=settings.name,
            provider=PROVIDER_NAMES[settings.provider],
            model=settings.model,
            model_version=settings.model_version,
        )

    def attributes(self) -> dict[str, AttributeValue]:
        found: dict[str, AttributeValue] = {
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.model,
            "lamina.gen_ai.deployment": self.deployment,
        }
        if self.model_version:
            found["lamina.gen_ai.model_version"] = self.model_version
        return found

    def metric_attributes(self) -> dict[str, AttributeValue]:
        """:meth:`attributes` without the model version (metrics' bounded set)."""
        return {
            "gen_ai.provider.name": self.provider,
            "gen_ai.request.model": self.model,
            "lamina.gen_ai.deployment": self.deployment,
        }


class ModelCall:
    """The span and metrics of one model call, from its start to its end.

    Use it as a context manager: leaving it ends the span, with the error if one
    escaped (a cancelled call or a stream closed early is not an error), and records
    ``gen_ai.client.operation.duration``. The span is current only inside
    :meth:`current`: a stream's span outlives the awaits that make it current, and must
    not stay current in its consumer between deltas.
    """

    def __init__(
        self,
        operation: Literal["chat", "embeddings"],
        *,
        target: ModelTarget | None = None,
        request: ChatRequest | None = None,
        stream: bool = False,
        capture_content: bool = False,
    ) -> None:
        """``target`` when the deployment is known up front (else :meth:`routed_to`
        names it); ``request`` sets the request attributes, and its messages with
        ``capture_content``."""
        self._operation = operation
        self._target: ModelTarget | None = None
        self._capture_content = capture_content
        self._started = time.perf_counter()
        self._error_type: str | None = None
        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": operation}
        if stream:
            attributes["gen_ai.request.stream"] = True
        if request is not None:
            if request.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = request.max_tokens
            if request.temperature is not None:
                attributes["gen_ai.request.temperature"] = request.temperature
            if capture_content:
                attributes["gen_ai.input.messages"] = _messages_json(request.messages)
        self.span: Span = tracer.start_span(operation, kind=SpanKind.CLIENT, attributes=attributes)
        if target is not None:
            self.routed_to(target)

    def __enter__(self) -> ModelCall:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            self.failed(exc)
        elif exc is not None:  # cancelled, or a stream closed before its end
            self.span.set_attribute("lamina.gen_ai.cancelled", True)
        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": self._operation}
        if self._target is not None:
            attributes.update(self._target.metric_attributes())
        if self._error_type is not None:
            attributes["error.type"] = self._error_type
        operation_duration.record(time.perf_counter() - self._started, attributes)
        self.span.end()

    def current(self) -> AbstractContextManager[Span]:
        """Make the span current (for the model call's own awaits, never across a yield)."""
        return trace.use_span(
            self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        )

    def routed_to(self, target: ModelTarget) -> None:
        """The deployment the call goes to: the first the router chose, then the one
        that served it (failover may have moved it). Names the span after its model."""
        if target is self._target or target == self._target:
            return
        self._target = target
        self.span.update_name(f"{self._operation} {target.model}")
        self.span.set_attributes(target.attributes())

    def attempt(self, deployment: str, outcome: str) -> None:
        """One deployment tried: ``ok``, ``breaker open`` or the kind of error."""
        self.span.add_event(
            "lamina.gen_ai.attempt",
            {"lamina.gen_ai.deployment": deployment, "lamina.gen_ai.attempt.outcome": outcome},
        )

    def first_token(self) -> None:
        """A stream delivered its first delta."""
        elapsed = time.perf_counter() - self._started
        self.span.set_attribute("gen_ai.response.time_to_first_chunk", elapsed)
        if self._target is not None:
            time_to_first_token.record(
                elapsed, {"lamina.gen_ai.deployment": self._target.deployment}
            )

    def used(
        self, usage: Usage, *, tenant_id: str, cost_usd: float | None = None, estimated: bool
    ) -> None:
        """The tokens the call used (``estimated`` when counted by Lamina, the provider
        having reported none), and what they cost."""
        self.span.set_attributes(
            {
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
                "lamina.gen_ai.usage.estimated": estimated,
            }
        )
        if self._target is None:
            return
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": self._operation,
            **self._target.attributes(),
            "lamina.tenant.id": tenant_id,
        }
        token_usage.record(usage.input_tokens, {**attributes, "gen_ai.token.type": "input"})
        if self._operation == "chat":
            token_usage.record(usage.output_tokens, {**attributes, "gen_ai.token.type": "output"})
        if cost_usd is not None:
            charged: dict[str, AttributeValue] = {
                "lamina.gen_ai.deployment": self._target.deployment,
                "lamina.tenant.id": tenant_id,
            }
            if self._target.model_version:
                charged["lamina.gen_ai.model_version"] = self._target.model_version
            cost.add(cost_usd, charged)

    def routed(self, route: RouteInfo) -> None:
        """How the gateway served the call: the model that answered, and why that one."""
        self.span.set_attribute("gen_ai.response.model", route.model)
        if route.reasons:
            self.span.set_attribute("lamina.route.reasons", list(route.reasons))

    def answered(
        self,
        *,
        finish_reasons: Sequence[str] = (),
        output: ChatMessage | None = None,
        response_model: str | None = None,
    ) -> None:
        """The answer: why it stopped, and (with ``capture_content``) what it said."""
        if response_model:
            self.span.set_attribute("gen_ai.response.model", response_model)
        if finish_reasons:
            self.span.set_attribute("gen_ai.response.finish_reasons", list(finish_reasons))
        if self._capture_content and output is not None:
            reason = finish_reasons[0] if finish_reasons else None
            self.span.set_attribute(
                "gen_ai.output.messages", json.dumps([_message(output, reason)], ensure_ascii=False)
            )

    def refused(self, error: TokenRateLimited | TokenQuotaExceeded, tenant_id: str) -> None:
        """A token rate limit or quota refused the call before any model saw it."""
        reason = "token_rate_limited" if isinstance(error, TokenRateLimited) else "quota_exceeded"
        self.span.set_attribute("lamina.policy.reason", reason)
        refusals.add(1, {"lamina.policy.reason": reason, "lamina.tenant.id": tenant_id})

    def failed(self, error: Exception) -> None:
        """The call failed: ``error.type`` is the error's class. Only an
        :class:`InferenceError`'s message (written to be shown) reaches the span."""
        self._error_type = type(error).__name__
        self.span.set_attribute("error.type", self._error_type)
        message = error.message if isinstance(error, InferenceError) else self._error_type
        self.span.set_status(StatusCode.ERROR, message)


def breaker_moved(deployment: str, state: str) -> None:
    """A circuit breaker entered ``state`` (``closed``, ``open`` or ``half_open``)."""
    breaker_transitions.add(
        1, {"lamina.gen_ai.deployment": deployment, "lamina.breaker.state": state}
    )


def _messages_json(messages: Iterable[ChatMessage]) -> str:
    return json.dumps([_message(m) for m in messages], ensure_ascii=False)


def _message(message: ChatMessage, finish_reason: str | None = None) -> dict[str, Any]:
    """A message in the GenAI conventions' JSON shape: a role and typed parts."""
    parts: list[dict[str, Any]] = []
    if message.role is Role.TOOL:
        parts.append(
            {"type": "tool_call_response", "id": message.tool_call_id, "response": message.content}
        )
    elif message.content:
        parts.append({"type": "text", "content": message.content})
    for call in message.tool_calls:
        parts.append(
            {
                "type": "tool_call",
                "id": call.id,
                "name": call.name,
                "arguments": _arguments(call.arguments),
            }
        )
    shaped: dict[str, Any] = {"role": message.role.value, "parts": parts}
    if finish_reason is not None:
        shaped["finish_reason"] = finish_reason
    return shaped


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
