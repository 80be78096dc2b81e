"""The gateway's routing, retries, failover, timeouts and metering, over scripted models.

Time is fake throughout: the gateway's clock, sleep and RNG are injected, so the
backoff and breaker behaviour is asserted exactly, without waiting.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import date

import pytest

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatModel,
    ChatRequest,
    ContextWindowExceeded,
    InferenceCaller,
    InvalidModelRequest,
    NoDeploymentAvailable,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    ResponseSchema,
    Role,
    StreamInterrupted,
    ToolDefinition,
    UnknownDeployment,
)
from inferencing.gateway.breaker import BreakerState, InProcessBreakerStore
from inferencing.gateway.core import Gateway
from inferencing.gateway.metering import InMemoryUsageLedger, UsageMeter
from inferencing.gateway.routing import Complexity, Deployment, HeuristicClassifier
from inferencing.settings import (
    BreakerSettings,
    DeploymentSettings,
    RetrySettings,
    TimeoutSettings,
)
from inferencing.tokens import ApproximateCounter
from tests.fakes import ScriptedChatModel, text_reply
from tests.inferencing.conftest import Caller

TODAY = date(2026, 11, 21)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def deployment(name: str, chat: ChatModel | None = None, **settings: object) -> Deployment:
    return Deployment(
        DeploymentSettings.model_validate({"name": name, **settings}),
        chat or ScriptedChatModel(name=name),
    )


def gateway(
    *deployments: Deployment,
    time: FakeTime | None = None,
    ledger: InMemoryUsageLedger | None = None,
    retry: RetrySettings | None = None,
    breaker: BreakerSettings | None = None,
    timeouts: TimeoutSettings | None = None,
) -> Gateway:
    time = time or FakeTime()
    return Gateway(
        deployments,
        counter=ApproximateCounter(),
        breakers=InProcessBreakerStore(),
        meter=UsageMeter(ledger) if ledger is not None else None,
        retry=retry or RetrySettings(max_attempts=4, base_delay_s=1.0, budget_s=30.0),
        breaker=breaker,
        timeouts=timeouts,
        clock=time.clock,
        sleep=time.sleep,
        today=lambda: TODAY,
        rng=random.Random(7),
    )


def ask(text: str = "How many days of leave do I get?", **fields: object) -> ChatRequest:
    return ChatRequest([ChatMessage(Role.USER, text)], **fields)  # type: ignore[arg-type]


def scripted(model: ChatModel) -> ScriptedChatModel:
    assert isinstance(model, ScriptedChatModel)
    return model


async def drain(deltas: AsyncIterator[ChatDelta]) -> list[ChatDelta]:
    return [delta async for delta in deltas]


def unavailable() -> ProviderUnavailable:
    return ProviderUnavailable("The model service is unavailable.", retryable=True)


# --- routing --------------------------------------------------------------------------


async def test_simple_turns_go_to_the_cheap_tier_and_complex_ones_to_the_strong(
    caller: Caller,
) -> None:
    cheap = deployment("mini", tier="cheap", priority=5)
    strong = deployment("large", tier="strong")
    gw = gateway(strong, cheap)

    simple = await gw.complete(ask(), caller)
    complex_ = await gw.complete(ask("Compare the two leave policies and explain why."), caller)

    assert simple.route is not None and simple.route.deployment == "mini"
    assert "simple turn: short single question without tools" in simple.route.reasons
    assert complex_.route is not None and complex_.route.deployment == "large"
    assert "complex turn: question asks to 'compare'" in complex_.route.reasons


async def test_among_equals_priority_then_cost_decides(caller: Caller) -> None:
    dear = deployment("dear", input_price_per_1k=0.01, output_price_per_1k=0.03)
    cheap = deployment("cheap", input_price_per_1k=0.001, output_price_per_1k=0.002)
    first = deployment("first", priority=1, input_price_per_1k=1.0)
    assert (await gateway(dear, cheap).complete(ask(), caller)).route.deployment == "cheap"  # type: ignore[union-attr]
    route = (await gateway(dear, cheap, first).complete(ask(), caller)).route
    assert route is not None and route.deployment == "first"


async def test_capabilities_filter_deployments_and_the_reasons_say_so(caller: Caller) -> None:
    plain = deployment("plain", ScriptedChatModel(name="plain", tool_calls=False), priority=1)
    tools = deployment("tools", ScriptedChatModel(name="tools", tool_calls=True))
    lookup = ToolDefinition("lookup", "Look up", {"type": "object"})
    response = await gateway(plain, tools).complete(ask(tools=[lookup]), caller)
    assert response.route is not None
    assert response.route.deployment == "tools"
    assert "plain skipped: cannot call tools" in response.route.reasons

    schema = ResponseSchema("answer", {"type": "object"})
    with pytest.raises(NoDeploymentAvailable) as raised:
        await gateway(plain, tools).complete(ask(response_format=schema), caller)
    assert "plain skipped: no structured output" in raised.value.details["route"]


async def test_a_retired_deployment_is_skipped_and_logged_once(
    caller: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    old = deployment("gpt-35", priority=1, retires_on="2026-11-01")
    new = deployment("gpt-4o")
    gw = gateway(old, new)
    for _ in range(3):
        response = await gw.complete(ask(), caller)
        assert response.route is not None and response.route.deployment == "gpt-4o"
    assert "gpt-35 skipped: retired on 2026-11-01" in response.route.reasons
    assert scripted(old.model).requests == []
    retired = [r for r in caplog.records if "retired" in r.getMessage()]
    assert len(retired) == 1 and retired[0].levelname == "WARNING"


async def test_a_prompt_too_large_for_one_deployment_goes_to_a_larger_one(
    caller: Caller,
) -> None:
    small = deployment("small", ScriptedChatModel(name="small", context_window=300), priority=1)
    large = deployment("large", ScriptedChatModel(name="large", context_window=100_000))
    gw = gateway(small, large)
    long_question = "word " * 400  # about 500 tokens by the approximate counter

    response = await gw.complete(ask(long_question), caller)
    assert response.route is not None and response.route.deployment == "large"
    assert any(r.startswith("small skipped: context window 300 <") for r in response.route.reasons)
    short = await gw.complete(ask("hi"), caller)
    assert short.route is not None and short.route.deployment == "small"


async def test_a_prompt_counted_by_the_caller_is_routed_on_that_count(caller: Caller) -> None:
    """The edge counts the prompt for its caps and passes the count on: the gateway routes
    on ``prompt_tokens`` when it is given, and counts the messages only when it is not."""
    small = deployment("small", ScriptedChatModel(name="small", context_window=300), priority=1)
    large = deployment("large", ScriptedChatModel(name="large", context_window=100_000))
    gw = gateway(small, large)

    counted = await gw.complete(ask("hi", prompt_tokens=5_000), caller)
    assert counted.route is not None and counted.route.deployment == "large"
    uncounted = await gw.complete(ask("hi"), caller)
    assert uncounted.route is not None and uncounted.route.deployment == "small"


async def test_a_prompt_too_large_for_every_deployment_is_refused_before_any_call(
    caller: Caller,
) -> None:
    small = deployment("small", ScriptedChatModel(name="small", context_window=300))
    with pytest.raises(ContextWindowExceeded):
        await gateway(small).complete(ask("word " * 400), caller)
    assert scripted(small.model).requests == []


async def test_a_context_overflow_reported_by_the_provider_falls_back_to_a_larger_window(
    caller: Caller,
) -> None:
    overflow = ContextWindowExceeded("This conversation is too long for the model.")
    tiny = deployment("tiny", ScriptedChatModel(name="tiny", context_window=2_000))
    large = deployment("large", ScriptedChatModel(name="large", context_window=128_000))
    alone = ScriptedChatModel(name="small", replies=[overflow], context_window=4_000)
    with pytest.raises(ContextWindowExceeded):  # pinned, and no chain to fall back on
        await gateway(deployment("small", alone), tiny, large).complete(
            ask(deployment="small"), caller
        )
    gw = gateway(
        deployment(
            "small",
            ScriptedChatModel(name="small", replies=[overflow], context_window=4_000),
            fallbacks=["tiny", "large"],
        ),
        tiny,
        large,
    )
    response = await gw.complete(ask(deployment="small"), caller)
    assert response.route is not None
    assert response.route.deployment == "large"
    assert response.route.attempts == (("small", "ContextWindowExceeded"), ("large", "ok"))
    assert scripted(tiny.model).requests == []


async def test_a_pinned_deployment_is_used_with_its_chain_and_an_unknown_one_is_refused(
    caller: Caller,
) -> None:
    a = deployment("a", ScriptedChatModel(name="a", replies=[unavailable()]), fallbacks=["c"])
    b, c = deployment("b", priority=0), deployment("c")
    response = await gateway(a, b, c).complete(ask(deployment="a"), caller)
    assert response.route is not None
    assert response.route.attempts == (("a", "ProviderUnavailable"), ("c", "ok"))
    assert "pinned to a" in response.route.reasons
    with pytest.raises(UnknownDeployment):
        await gateway(a, b, c).complete(ask(deployment="zeta"), caller)


def test_the_default_classifier_explains_itself() -> None:
    classify = HeuristicClassifier(long_prompt_tokens=50, long_conversation_turns=3)
    assert classify.assess(ask("hi"), 5).complexity is Complexity.SIMPLE
    assert classify.assess(ask("hi"), 60).reason == "prompt of 60 tokens"
    many = ChatRequest([ChatMessage(Role.USER, "q")] * 3)
    assert classify.assess(many, 5).reason == "conversation of 3 turns"
    assert classify.assess(ask("Analyse our churn"), 5).reason == "question asks to 'analyse'"


# --- retries and failover -------------------------------------------------------------


async def test_failures_fail_over_along_the_chain_without_waiting(caller: Caller) -> None:
    time = FakeTime()
    primary = deployment(
        "primary", ScriptedChatModel(name="p", replies=[unavailable()]), priority=1
    )
    secondary = deployment("secondary")
    response = await gateway(primary, secondary, time=time).complete(ask(), caller)
    assert response.route is not None
    assert response.route.attempts == (("primary", "ProviderUnavailable"), ("secondary", "ok"))
    assert time.slept == []


async def test_once_the_chain_is_exhausted_it_backs_off_with_full_jitter(caller: Caller) -> None:
    time = FakeTime()
    flaky = ScriptedChatModel(name="only", replies=[unavailable(), unavailable(), unavailable()])
    response = await gateway(deployment("only", flaky), time=time).complete(ask(), caller)
    assert response.route is not None and len(response.route.attempts) == 4
    # Full jitter: each wait is uniform in [0, base * 2**round] (base 1 s here).
    assert len(time.slept) == 3
    for round_number, waited in enumerate(time.slept):
        assert 0 <= waited <= 2**round_number


async def test_retry_after_is_honoured(caller: Caller) -> None:
    time = FakeTime()
    limited = ProviderRateLimited("Too many requests.", retryable=True, retry_after_s=7.0)
    only = deployment("only", ScriptedChatModel(name="only", replies=[limited]))
    response = await gateway(only, time=time).complete(ask(), caller)
    assert response.route is not None and response.route.attempts[-1] == ("only", "ok")
    assert time.slept and time.slept[0] >= 7.0


async def test_the_retry_budget_bounds_the_waiting(caller: Caller) -> None:
    time = FakeTime()
    limited = ProviderRateLimited("Too many requests.", retryable=True, retry_after_s=60.0)
    only = deployment("only", ScriptedChatModel(name="only", replies=[limited, limited]))
    with pytest.raises(ProviderRateLimited) as raised:
        await gateway(only, time=time, retry=RetrySettings(budget_s=10)).complete(ask(), caller)
    assert time.slept == []  # waiting 60 s would break the 10 s budget: give up at once
    assert raised.value.details["attempts"] == [["only", "ProviderRateLimited"]]


async def test_attempts_are_capped(caller: Caller) -> None:
    failing = ScriptedChatModel(name="f", replies=[unavailable() for _ in range(10)])
    with pytest.raises(ProviderUnavailable) as raised:
        await gateway(deployment("f", failing), retry=RetrySettings(max_attempts=3)).complete(
            ask(), caller
        )
    assert len(failing.requests) == 3
    assert len(raised.value.details["attempts"]) == 3


async def test_a_refused_request_is_not_retried_or_failed_over(caller: Caller) -> None:
    bad = InvalidModelRequest("The request was refused as malformed.")
    first = deployment("first", ScriptedChatModel(name="first", replies=[bad]), priority=1)
    second = deployment("second")
    with pytest.raises(InvalidModelRequest):
        await gateway(first, second).complete(ask(), caller)
    assert scripted(second.model).requests == []


async def test_an_authentication_failure_fails_over_but_is_not_retried(caller: Caller) -> None:
    refused = ProviderAuthenticationFailed("Lamina could not authenticate to the model service.")
    first = ScriptedChatModel(name="first", replies=[refused, refused])
    response = await gateway(deployment("first", first, priority=1), deployment("second")).complete(
        ask(), caller
    )
    assert response.route is not None and response.route.deployment == "second"
    with pytest.raises(ProviderAuthenticationFailed):
        await gateway(deployment("first", first)).complete(ask(), caller)
    assert len(first.requests) == 2


async def test_a_slow_model_times_out_as_a_typed_error(caller: Caller) -> None:
    class Hanging(ScriptedChatModel):
        async def complete(self, request: ChatRequest, caller: InferenceCaller):  # type: ignore[no-untyped-def]
            await asyncio.sleep(10)

    gw = gateway(
        deployment("slow", Hanging(name="slow")),
        timeouts=TimeoutSettings(total_s=0.05),
        retry=RetrySettings(max_attempts=1),
    )
    with pytest.raises(ProviderTimeout) as raised:
        await gw.complete(ask(), caller)
    assert raised.value.message == "The model did not answer in time."


# --- breakers -------------------------------------------------------------------------


async def test_an_open_breaker_moves_traffic_and_a_probe_closes_it(caller: Caller) -> None:
    time = FakeTime()
    policy = BreakerSettings(
        min_calls=4, failure_rate=0.5, window_s=60, open_s=30, half_open_probes=1
    )
    primary = ScriptedChatModel(name="primary", replies=[unavailable() for _ in range(4)])
    gw = gateway(
        deployment("primary", primary, priority=1),
        deployment("backup"),
        time=time,
        breaker=policy,
    )
    for _ in range(4):
        await gw.complete(ask(), caller)
    assert (await gw.breaker_states())["primary"] is BreakerState.OPEN

    response = await gw.complete(ask(), caller)  # refused by the breaker: straight to backup
    assert response.route is not None
    assert response.route.attempts == (("primary", "breaker open"), ("backup", "ok"))
    assert len(primary.requests) == 4

    time.now += 30
    response = await gw.complete(ask(), caller)  # the probe succeeds
    assert response.route is not None and response.route.attempts == (("primary", "ok"),)
    assert (await gw.breaker_states())["primary"] is BreakerState.CLOSED


async def test_when_every_breaker_is_open_the_caller_is_told_at_once(caller: Caller) -> None:
    time = FakeTime()
    policy = BreakerSettings(min_calls=1, failure_rate=1.0, open_s=30)
    only = ScriptedChatModel(name="only", replies=[unavailable()])
    gw = gateway(
        deployment("only", only), time=time, breaker=policy, retry=RetrySettings(max_attempts=1)
    )
    with pytest.raises(ProviderUnavailable):
        await gw.complete(ask(), caller)
    with pytest.raises(NoDeploymentAvailable) as raised:
        await gw.complete(ask(), caller)
    assert raised.value.retryable
    assert raised.value.details["attempts"] == [["only", "breaker open"]]
    assert time.slept == []


# --- streaming ------------------------------------------------------------------------


async def test_a_stream_fails_over_before_its_first_delta(caller: Caller) -> None:
    primary = deployment(
        "primary", ScriptedChatModel(name="p", replies=[unavailable()]), priority=1
    )
    backup = deployment(
        "backup", ScriptedChatModel(name="b", replies=[text_reply("all good here")])
    )
    deltas = await drain(gateway(primary, backup).stream(ask(), caller))
    assert "".join(d.content for d in deltas) == "all good here"
    route = deltas[-1].route
    assert route is not None
    assert route.attempts == (("primary", "ProviderUnavailable"), ("backup", "ok"))
    assert all(d.route is None for d in deltas[:-1])


async def test_a_stream_broken_after_its_first_delta_is_not_failed_over_but_metered(
    caller: Caller,
) -> None:
    ledger = InMemoryUsageLedger()
    cut = StreamInterrupted("The answer was cut short.", retryable=True)
    primary = ScriptedChatModel(
        name="p", replies=[text_reply("one two three four five")], fail_after_chunks=cut
    )
    backup = deployment("backup")
    gw = gateway(deployment("primary", primary, priority=1), backup, ledger=ledger)
    received: list[str] = []

    async def consume() -> None:
        async for delta in gw.stream(ask(), caller):
            received.append(delta.content)

    with pytest.raises(StreamInterrupted):
        await consume()
    assert "".join(received) == "one two"
    assert scripted(backup.model).requests == []
    await gw.aclose()
    (record,) = ledger.records
    assert (record.deployment, record.outcome, record.estimated) == ("primary", "interrupted", True)
    assert record.output_tokens >= 1 and record.input_tokens > 0


async def test_a_stream_that_gives_no_first_token_in_time_fails_over(caller: Caller) -> None:
    class Silent(ScriptedChatModel):
        async def stream(
            self, request: ChatRequest, caller: InferenceCaller
        ) -> AsyncIterator[ChatDelta]:  # type: ignore[override]
            await asyncio.sleep(10)
            yield ChatDelta(content="never")

    gw = gateway(
        deployment("silent", Silent(name="silent"), priority=1),
        deployment("backup", ScriptedChatModel(name="b", replies=[text_reply("here")])),
        timeouts=TimeoutSettings(first_token_s=0.05),
    )
    deltas = await drain(gw.stream(ask(), caller))
    assert deltas[-1].route is not None
    assert deltas[-1].route.attempts == (("silent", "ProviderTimeout"), ("backup", "ok"))


# --- metering -------------------------------------------------------------------------


async def test_every_call_is_metered_with_its_price_and_versions(caller: Caller) -> None:
    ledger = InMemoryUsageLedger()
    gw = gateway(
        deployment(
            "mini",
            model="gpt-4o-mini",
            model_version="2024-07-18",
            input_price_per_1k=0.5,
            output_price_per_1k=2.0,
        ),
        ledger=ledger,
    )
    await gw.complete(ask(prompt_version="grounded_answer.v1"), caller)
    await drain(gw.stream(ask(), Caller(tenant_id="fabrikam", user_id="bo")))
    await gw.aclose()

    first, second = ledger.records
    assert (first.tenant_id, first.user_id, first.deployment) == ("contoso", "adele", "mini")
    assert (first.model, first.model_version, first.prompt_version) == (
        "gpt-4o-mini",
        "2024-07-18",
        "grounded_answer.v1",
    )
    # ScriptedChatModel reports 10 input tokens and one output token per word.
    assert (first.input_tokens, first.output_tokens, first.estimated) == (10, 3, False)
    assert first.cost == pytest.approx(10 / 1000 * 0.5 + 3 / 1000 * 2.0)
    assert (second.tenant_id, second.outcome) == ("fabrikam", "ok")
