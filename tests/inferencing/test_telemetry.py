"""Spans and metrics of model calls: the real gateway against the OpenAI-compatible
simulator through the real ``openai`` client, the real breaker stores (in-process and a
real Redis), the session's in-memory telemetry capture.

Every call runs under a parent span the test starts, so that the model call's span is
seen where a turn would put it: a child, in the same trace.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from uuid import uuid4

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from inferencing.contracts import (
    ChatMessage,
    ChatRequest,
    InferenceCaller,
    LimitState,
    ProviderUnavailable,
    Role,
    TokenQuotaExceeded,
    TokenRateLimited,
    TokenReservation,
)
from inferencing.gateway import Gateway, build_gateway
from inferencing.gateway.breaker import BreakerState, BreakerStore, InProcessBreakerStore
from inferencing.gateway.metering import cost_of
from inferencing.gateway.redis_state import RedisBreakerStore
from inferencing.providers import build_embedding_model
from inferencing.settings import DeploymentSettings, InferencingSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.inferencing.breaker_contract import POLICY, T0, trip
from tests.inferencing.conftest import Caller
from tests.support.telemetry import InMemorySpanExporter, MetricsProbe, children, finished_spans

QUESTION = "How many days of annual leave do I get?"
ANSWER = "Full-time staff get twenty-five days of annual leave a year."
INFERENCING_METRICS = (
    "gen_ai.client.token.usage",
    "gen_ai.client.operation.duration",
    "lamina.gen_ai.time_to_first_token",
    "lamina.gen_ai.cost",
    "lamina.gen_ai.refusals",
    "lamina.breaker.transitions",
)

tracer = trace.get_tracer("tests")


@pytest.fixture
def caller() -> Caller:
    """A tenant and a user of this test alone: metrics are cumulative for the session."""
    return Caller(tenant_id=f"tenant-{uuid4().hex[:8]}", user_id=f"user-{uuid4().hex[:8]}")


@pytest.fixture
def deployment() -> str:
    """A deployment name of this test alone."""
    return f"d{uuid4().hex[:8]}"


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    built: list[Gateway] = []
    yield built
    for gateway in built:
        await gateway.aclose()


def make(
    gateways: list[Gateway],
    simulator: SimulatorServer,
    *entries: Mapping[str, Any],
    capture_content: bool = False,
    budget: Any = None,
) -> Gateway:
    """A gateway over ``entries`` (deployment settings; the model defaults to the name),
    all served by the simulator."""
    deployments = [
        {
            "model": entry["name"],
            "base_url": simulator.openai_base_url,
            "api_key": "sk-sim",
            **entry,
        }
        for entry in entries
    ]
    settings = InferencingSettings.model_validate(
        {"deployments": deployments, "retry": {"base_delay_s": 0.001, "max_delay_s": 0.001}}
    )
    gateway = build_gateway(settings, budget=budget, capture_content=capture_content)
    gateways.append(gateway)
    return gateway


def chat_request(**fields: Any) -> ChatRequest:
    return ChatRequest(
        [ChatMessage(Role.SYSTEM, "Answer from the handbook."), ChatMessage(Role.USER, QUESTION)],
        **fields,
    )


def only(name: str) -> ReadableSpan:
    found = finished_spans(name)
    assert len(found) == 1, [s.name for s in finished_spans()]
    return found[0]


def parent_of(span: ReadableSpan) -> ReadableSpan:
    (parent,) = [s for s in finished_spans() if span in children(s, finished_spans())]
    return parent


def texts(spans: Sequence[ReadableSpan]) -> str:
    """Every attribute value of ``spans`` and of their events, as one text."""
    values: list[str] = []
    for span in spans:
        values.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            values.extend(str(v) for v in (event.attributes or {}).values())
    return "\n".join(values)


def assert_no_user_in_metrics(user_id: str) -> None:
    probe = MetricsProbe()
    for name in INFERENCING_METRICS:
        for attributes in probe.attribute_sets(name):
            assert user_id not in attributes.values(), (name, attributes)


# --- chat calls ----------------------------------------------------------------------


async def test_a_call_is_one_client_span_under_the_callers_with_the_genai_attributes(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    spans: InMemorySpanExporter,
) -> None:
    gateway = make(
        gateways,
        simulator,
        {"name": deployment, "model": "gpt-4o-mini", "model_version": "2024-07-18"},
    )
    simulator.script(ScriptedReply(content=ANSWER))

    with tracer.start_as_current_span("turn"):
        response = await gateway.complete(chat_request(max_tokens=200, temperature=0.1), caller)

    span = only("chat gpt-4o-mini")
    assert span.kind is SpanKind.CLIENT
    assert parent_of(span).name == "turn"
    assert response.usage is not None
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 200,
        "gen_ai.request.temperature": 0.1,
        "gen_ai.usage.input_tokens": response.usage.input_tokens,
        "gen_ai.usage.output_tokens": response.usage.output_tokens,
        "gen_ai.response.finish_reasons": ("stop",),
        "lamina.gen_ai.deployment": deployment,
        "lamina.gen_ai.model_version": "2024-07-18",
        "lamina.gen_ai.usage.estimated": False,
    }
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        (
            "lamina.gen_ai.attempt",
            {"lamina.gen_ai.deployment": deployment, "lamina.gen_ai.attempt.outcome": "ok"},
        )
    ]
    assert span.status.status_code is StatusCode.UNSET
    assert QUESTION not in texts(spans.get_finished_spans())
    assert "twenty-five" not in texts(spans.get_finished_spans())


async def test_prompt_and_completion_reach_the_span_only_when_content_capture_is_on(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway], deployment: str
) -> None:
    gateway = make(gateways, simulator, {"name": deployment}, capture_content=True)
    simulator.script(ScriptedReply(content=ANSWER))

    await gateway.complete(chat_request(), caller)

    attributes = only(f"chat {deployment}").attributes or {}
    assert json.loads(str(attributes["gen_ai.input.messages"])) == [
        {"role": "system", "parts": [{"type": "text", "content": "Answer from the handbook."}]},
        {"role": "user", "parts": [{"type": "text", "content": QUESTION}]},
    ]
    assert json.loads(str(attributes["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": ANSWER}],
            "finish_reason": "stop",
        }
    ]


async def test_tool_calls_are_captured_as_tool_call_parts(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway], deployment: str
) -> None:
    gateway = make(gateways, simulator, {"name": deployment}, capture_content=True)
    simulator.script(
        ScriptedReply(tool_calls=[{"name": "book_room", "arguments": {"room": "Fjord"}}])
    )

    response = await gateway.complete(chat_request(), caller)

    (call,) = response.message.tool_calls
    (output,) = json.loads(str(only(f"chat {deployment}").attributes["gen_ai.output.messages"]))
    assert output["parts"] == [
        {"type": "tool_call", "id": call.id, "name": "book_room", "arguments": {"room": "Fjord"}}
    ]
    assert output["finish_reason"] == "tool_calls"


async def test_failover_is_one_span_named_after_the_model_that_answered_with_each_attempt(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway]
) -> None:
    primary, secondary = f"p{uuid4().hex[:8]}", f"s{uuid4().hex[:8]}"
    gateway = make(
        gateways, simulator, {"name": primary, "priority": 1}, {"name": secondary, "priority": 2}
    )
    simulator.script(ScriptedReply(fault=Fault(kind="unavailable")), ScriptedReply(content=ANSWER))

    response = await gateway.complete(chat_request(), caller)

    assert response.route is not None and response.route.deployment == secondary
    span = only(f"chat {secondary}")
    assert finished_spans(f"chat {primary}") == []
    attributes = span.attributes or {}
    assert attributes["lamina.gen_ai.deployment"] == secondary
    assert attributes["gen_ai.request.model"] == secondary
    assert [
        (e.attributes["lamina.gen_ai.deployment"], e.attributes["lamina.gen_ai.attempt.outcome"])
        for e in span.events
        if e.attributes is not None
    ] == [(primary, "ProviderUnavailable"), (secondary, "ok")]


async def test_a_failed_call_marks_its_span_and_its_duration_with_the_error_type(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    metrics: MetricsProbe,
) -> None:
    gateway = make(gateways, simulator, {"name": deployment})
    simulator.script(*[ScriptedReply(fault=Fault(kind="unavailable"))] * 4)

    with pytest.raises(ProviderUnavailable):
        await gateway.complete(chat_request(), caller)

    span = only(f"chat {deployment}")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ProviderUnavailable"
    assert "gen_ai.usage.input_tokens" not in (span.attributes or {})
    assert len(span.events) == 4, "one event per attempt"
    failed = {"lamina.gen_ai.deployment": deployment, "error.type": "ProviderUnavailable"}
    assert metrics.amount("gen_ai.client.operation.duration", **failed) == 1
    assert (
        metrics.amount("gen_ai.client.token.usage", **{"lamina.gen_ai.deployment": deployment}) == 0
    )


async def test_tokens_cost_and_duration_are_metered_by_deployment_version_and_tenant(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    metrics: MetricsProbe,
) -> None:
    gateway = make(
        gateways,
        simulator,
        {
            "name": deployment,
            "model": "gpt-4o",
            "model_version": "2024-08-06",
            "input_price_per_1k": 0.0025,
            "output_price_per_1k": 0.01,
        },
    )
    simulator.script(ScriptedReply(content=ANSWER), ScriptedReply(content=ANSWER))

    first = await gateway.complete(chat_request(), caller)
    second = await gateway.complete(chat_request(), caller)

    dimensions = {
        "gen_ai.request.model": "gpt-4o",
        "lamina.gen_ai.deployment": deployment,
        "lamina.gen_ai.model_version": "2024-08-06",
        "lamina.tenant.id": caller.tenant_id,
    }
    assert (
        metrics.amount("gen_ai.client.token.usage", **dimensions, **{"gen_ai.token.type": "input"})
        == 2
    )
    assert (
        metrics.amount("gen_ai.client.token.usage", **dimensions, **{"gen_ai.token.type": "output"})
        == 2
    )
    usages = [r.usage for r in (first, second) if r.usage is not None]
    expected = sum(cost_of(u.input_tokens, u.output_tokens, 0.0025, 0.01) for u in usages)
    charged = {k: v for k, v in dimensions.items() if k != "gen_ai.request.model"}
    assert metrics.amount("lamina.gen_ai.cost", **charged) == pytest.approx(expected)
    assert expected > 0
    assert (
        metrics.amount(
            "gen_ai.client.operation.duration",
            **{"lamina.gen_ai.deployment": deployment, "gen_ai.operation.name": "chat"},
        )
        == 2
    )
    assert_no_user_in_metrics(caller.user_id)


async def test_the_passthrough_is_a_chat_span_too(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway], deployment: str
) -> None:
    gateway = make(gateways, simulator, {"name": deployment})
    simulator.script(ScriptedReply(content=ANSWER))
    payload = {"model": "anything", "messages": [{"role": "user", "content": QUESTION}]}

    with tracer.start_as_current_span("facade"):
        body, _ = await gateway.forward(payload, chat_request(), caller)

    span = only(f"chat {deployment}")
    assert parent_of(span).name == "facade"
    attributes = span.attributes or {}
    assert attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert "gen_ai.output.messages" not in attributes


# --- streams -------------------------------------------------------------------------


async def test_a_streams_span_lasts_until_its_last_delta_and_times_the_first(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    metrics: MetricsProbe,
) -> None:
    gateway = make(gateways, simulator, {"name": deployment}, capture_content=True)
    simulator.script(ScriptedReply(content=ANSWER))

    with tracer.start_as_current_span("turn") as turn:
        stream = gateway.stream(chat_request(), caller)
        first = await anext(stream)
        assert first.content
        assert finished_spans(f"chat {deployment}") == [], "the span is open while it streams"
        assert trace.get_current_span() is turn, "the model's span is not current in the caller"
        rest = [delta async for delta in stream]

    span = only(f"chat {deployment}")
    assert parent_of(span).name == "turn"
    attributes = span.attributes or {}
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    usage = rest[-1].usage
    assert usage is not None
    assert attributes["gen_ai.usage.output_tokens"] == usage.output_tokens
    streamed = first.content + "".join(d.content for d in rest)
    (output,) = json.loads(str(attributes["gen_ai.output.messages"]))
    assert output["parts"] == [{"type": "text", "content": streamed}]
    assert (
        metrics.amount(
            "lamina.gen_ai.time_to_first_token", **{"lamina.gen_ai.deployment": deployment}
        )
        == 1
    )


async def test_a_stream_closed_early_ends_its_span_as_cancelled_not_failed(
    simulator: SimulatorServer, caller: Caller, gateways: list[Gateway], deployment: str
) -> None:
    gateway = make(gateways, simulator, {"name": deployment})
    simulator.script(ScriptedReply(content=ANSWER))

    stream = gateway.stream(chat_request(), caller)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]

    span = only(f"chat {deployment}")
    attributes = span.attributes or {}
    assert attributes["lamina.gen_ai.cancelled"] is True
    assert span.status.status_code is StatusCode.UNSET
    assert "gen_ai.response.finish_reasons" not in attributes
    assert attributes["gen_ai.usage.output_tokens"] > 0, "what was delivered is metered"


# --- refusals ------------------------------------------------------------------------


class RefusingBudget:
    """A token budget that refuses every call with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def reserve(self, caller: InferenceCaller, tokens: int) -> TokenReservation:
        raise self.error

    async def reconcile(self, reservation: TokenReservation, used_tokens: int) -> None:
        raise AssertionError("a refused call has no reservation to reconcile")


STATE = LimitState("tenant-tokens-per-minute", 1000, 0, 30.0)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TokenRateLimited("Too many tokens.", state=STATE), "token_rate_limited"),
        (TokenQuotaExceeded("Quota used up.", state=STATE), "quota_exceeded"),
    ],
)
async def test_rate_limit_and_quota_refusals_are_counted_by_reason_and_tenant(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    metrics: MetricsProbe,
    error: Exception,
    reason: str,
) -> None:
    gateway = make(gateways, simulator, {"name": deployment}, budget=RefusingBudget(error))

    with pytest.raises(type(error)):
        await gateway.complete(chat_request(), caller)
    with pytest.raises(type(error)):
        async for _ in gateway.stream(chat_request(), caller):
            pass

    refused = {"lamina.policy.reason": reason, "lamina.tenant.id": caller.tenant_id}
    assert metrics.amount("lamina.gen_ai.refusals", **refused) == 2
    assert simulator.requests() == [], "no model saw a refused call"
    for span in finished_spans(f"chat {deployment}"):
        assert (span.attributes or {})["error.type"] == type(error).__name__
        assert (span.attributes or {})["lamina.policy.reason"] == reason
    assert len(finished_spans(f"chat {deployment}")) == 2
    assert_no_user_in_metrics(caller.user_id)


# --- breakers ------------------------------------------------------------------------


@pytest.fixture
def in_process_store() -> InProcessBreakerStore:
    return InProcessBreakerStore()


@pytest.fixture
def redis_store(redis: Redis) -> RedisBreakerStore:
    return RedisBreakerStore(redis, prefix=f"test:{uuid4().hex}:breaker:")


@pytest.fixture(params=["in_process_store", "redis_store"])
def breaker_store(request: pytest.FixtureRequest) -> BreakerStore:
    store: BreakerStore = request.getfixturevalue(request.param)
    return store


def transitions(metrics: MetricsProbe, key: str, state: BreakerState) -> float:
    return metrics.amount(
        "lamina.breaker.transitions",
        **{"lamina.gen_ai.deployment": key, "lamina.breaker.state": state.value},
    )


async def test_every_breaker_state_change_is_counted_once(
    breaker_store: BreakerStore, metrics: MetricsProbe
) -> None:
    key = f"d{uuid4().hex[:8]}"
    await trip(breaker_store, key, T0)
    # Asked again while open: no change, nothing counted.
    await breaker_store.admit(key, T0 + 1, POLICY)
    assert transitions(metrics, key, BreakerState.OPEN) == 1

    later = T0 + POLICY.open_s
    for _ in range(POLICY.half_open_probes):
        assert (await breaker_store.admit(key, later, POLICY)).probe
    assert transitions(metrics, key, BreakerState.HALF_OPEN) == 1
    for _ in range(POLICY.half_open_probes):
        await breaker_store.record(key, later, POLICY, ok=True, probe=True)

    assert await breaker_store.state(key, later, POLICY) is BreakerState.CLOSED
    assert transitions(metrics, key, BreakerState.CLOSED) == 1
    assert transitions(metrics, key, BreakerState.OPEN) == 1


async def test_a_probe_failing_as_the_breaker_turns_half_open_counts_both_changes(
    breaker_store: BreakerStore, metrics: MetricsProbe
) -> None:
    key = f"d{uuid4().hex[:8]}"
    await trip(breaker_store, key, T0)
    later = T0 + POLICY.open_s
    assert (await breaker_store.admit(key, later, POLICY)).probe
    await breaker_store.record(key, later, POLICY, ok=False, probe=True)  # opens again
    # One call moves it open → half-open → open: its probe fails as it turns half-open.
    again = later + POLICY.open_s
    await breaker_store.record(key, again, POLICY, ok=False, probe=True)

    assert transitions(metrics, key, BreakerState.HALF_OPEN) == 2
    assert transitions(metrics, key, BreakerState.OPEN) == 3


async def test_a_gateway_opening_a_failing_deployments_breaker_counts_it(
    simulator: SimulatorServer,
    caller: Caller,
    gateways: list[Gateway],
    deployment: str,
    metrics: MetricsProbe,
) -> None:
    deployments = [{"name": deployment, "base_url": simulator.openai_base_url, "api_key": "k"}]
    gateway = build_gateway(
        InferencingSettings.model_validate(
            {
                "deployments": deployments,
                "retry": {"max_attempts": 1},
                "breaker": {"min_calls": 2, "failure_rate": 0.5},
            }
        )
    )
    gateways.append(gateway)
    simulator.script(*[ScriptedReply(fault=Fault(kind="unavailable"))] * 2)

    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await gateway.complete(chat_request(), caller)

    assert transitions(metrics, deployment, BreakerState.OPEN) == 1


# --- embeddings ----------------------------------------------------------------------


async def test_an_embedding_call_is_an_embeddings_span_with_its_input_tokens(
    simulator: SimulatorServer, caller: Caller, deployment: str, metrics: MetricsProbe
) -> None:
    settings = DeploymentSettings.model_validate(
        {
            "name": deployment,
            "model": "text-embedding-3-small",
            "base_url": simulator.openai_base_url,
            "api_key": "sk-sim",
        }
    )
    embedder = build_embedding_model(settings)
    try:
        with tracer.start_as_current_span("lookup"):
            response = await embedder.embed([QUESTION], caller)
    finally:
        await embedder.aclose()

    span = only("embeddings text-embedding-3-small")
    assert span.kind is SpanKind.CLIENT
    assert parent_of(span).name == "lookup"
    attributes = span.attributes or {}
    assert attributes["gen_ai.operation.name"] == "embeddings"
    assert attributes["lamina.gen_ai.deployment"] == deployment
    assert response.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == response.usage.input_tokens > 0
    assert QUESTION not in texts([span])
    used = {"lamina.gen_ai.deployment": deployment, "lamina.tenant.id": caller.tenant_id}
    assert (
        metrics.amount("gen_ai.client.token.usage", **used, **{"gen_ai.token.type": "input"}) == 1
    )
    assert (
        metrics.amount("gen_ai.client.token.usage", **used, **{"gen_ai.token.type": "output"}) == 0
    )
    assert_no_user_in_metrics(caller.user_id)
