"""Random fault profiles of the simulator, driven through the real ``openai`` client.

Every profile test fixes the seed, so the draws (and the counts asserted) are the same
on every run.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from statistics import NormalDist

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from pydantic import ValidationError

from inferencing.simulator import (
    ConfigUpdate,
    DeploymentStats,
    Fault,
    FaultProfile,
    Latency,
    ScriptedReply,
    SimulatorConfig,
    SimulatorServer,
    SimulatorState,
)
from inferencing.simulator.profiles import (
    Z_99,
    draw_fault,
    draw_stream_cut,
    lognormal_parameters,
    sample_latency,
)

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "How many days of leave?"}
]
AZURE_API_VERSION = "2024-10-21"


@pytest.fixture
async def client(simulator: SimulatorServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=simulator.openai_base_url, api_key="k", max_retries=0, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def azure(simulator: SimulatorServer) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=simulator.base_url,
        api_version=AZURE_API_VERSION,
        api_key="k",
        max_retries=0,
        timeout=10,
    ) as client:
        yield client


@pytest.fixture
def http(simulator: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=simulator.base_url, timeout=10) as client:
        yield client


@pytest.fixture
async def ahttp(simulator: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=10) as client:
        yield client


async def succeeds(client: openai.AsyncOpenAI, model: str = "m") -> bool:
    try:
        await client.chat.completions.create(model=model, messages=QUESTION)
    except openai.APIStatusError:
        return False
    return True


# --- random faults ---------------------------------------------------------------------


async def test_the_observed_error_rate_is_the_profiles_and_the_seed_replays_it(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    profile = FaultProfile(error_rate=0.25)
    simulator.configure(ConfigUpdate(seed=1234, default_profile=profile))
    outcomes = [await succeeds(client) for _ in range(400)]

    failures = outcomes.count(False)
    # Deterministic under the seed; the band is three standard deviations wide anyway.
    assert abs(failures / 400 - 0.25) < 0.065
    assert simulator.stats() == {
        "m": DeploymentStats(
            requests=400, completed=400 - failures, faults={"unavailable": failures}
        )
    }

    simulator.reset()
    simulator.configure(ConfigUpdate(seed=1234, default_profile=profile))
    assert [await succeeds(client) for _ in range(400)] == outcomes


def test_fault_kinds_are_drawn_by_their_weights() -> None:
    profile = FaultProfile(error_rate=0.5, kinds={"rate_limited": 3, "status": 1, "timeout": 0})
    rng = random.Random(42)
    drawn = Counter(draw_fault(profile, rng) for _ in range(20_000))

    assert set(drawn) == {None, "rate_limited", "status"}
    assert abs(drawn[None] / 20_000 - 0.5) < 0.02
    assert abs(drawn["rate_limited"] / (drawn["rate_limited"] + drawn["status"]) - 0.75) < 0.02


def test_a_profile_needs_a_kind_with_weight_and_rates_within_0_and_1() -> None:
    with pytest.raises(ValidationError):
        FaultProfile(kinds={"unavailable": 0})
    with pytest.raises(ValidationError):
        FaultProfile.model_validate({"kinds": {"stream_cut": 1}})
    with pytest.raises(ValidationError):
        FaultProfile(error_rate=1.5)
    with pytest.raises(ValidationError):
        FaultProfile(stream_cut_rate=-0.1)
    with pytest.raises(ValidationError):
        FaultProfile.model_validate({"error_rate": 0.1, "typo": 1})


async def test_profiles_apply_only_to_their_deployment(
    simulator: SimulatorServer,
    client: openai.AsyncOpenAI,
    azure: openai.AsyncAzureOpenAI,
    ahttp: httpx.AsyncClient,
) -> None:
    # Set over HTTP, as a gateway's test harness in another process would.
    update = {
        "seed": 7,
        "profiles": {"flaky": {"error_rate": 1.0}},
        "default_profile": {"error_rate": 1.0, "kinds": {"status": 1}, "status_code": 409},
    }
    assert (await ahttp.post("/_sim/config", json=update)).status_code == 200

    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model="flaky", messages=QUESTION)
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.InternalServerError):
        await azure.chat.completions.create(model="flaky", messages=QUESTION)
    with pytest.raises(openai.ConflictError):
        await client.chat.completions.create(model="other", messages=QUESTION)

    simulator.configure(ConfigUpdate(default_profile=None))
    assert await succeeds(client, "other")
    answer = await azure.chat.completions.create(model="steady", messages=QUESTION)
    assert answer.model == "steady"
    assert (await succeeds(client, "flaky"), await succeeds(client, "steady")) == (False, True)

    stats = simulator.stats()
    assert stats["flaky"].faults == {"unavailable": 3}
    assert stats["other"].faults == {"status": 1}
    assert (stats["other"].completed, stats["steady"].completed) == (1, 2)
    azure_paths = {r.path for r in simulator.requests() if r.path.startswith("/openai/")}
    assert azure_paths == {
        "/openai/deployments/flaky/chat/completions",
        "/openai/deployments/steady/chat/completions",
    }


async def test_a_rate_limited_profile_answers_429_with_retry_after(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    profile = FaultProfile(error_rate=1.0, kinds={"rate_limited": 1}, retry_after_s=7)
    simulator.configure(ConfigUpdate(seed=1, profiles={"m": profile}))

    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=QUESTION)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.code == "rate_limit_exceeded"


async def test_scripted_replies_take_precedence_over_the_profile(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    simulator.configure(
        ConfigUpdate(seed=1, default_profile=FaultProfile(error_rate=1.0, stream_cut_rate=1.0))
    )
    simulator.script(ScriptedReply(content="Scripted."), ScriptedReply(content="Streamed."))

    answer = await client.chat.completions.create(model="m", messages=QUESTION)
    assert answer.choices[0].message.content == "Scripted."
    stream = await client.chat.completions.create(model="m", messages=QUESTION, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "Streamed."
    assert not await succeeds(client)


async def test_embeddings_follow_their_deployments_profile(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    simulator.configure(ConfigUpdate(seed=1, profiles={"embed": FaultProfile(error_rate=1.0)}))
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model="embed", input="annual leave")
    assert (await client.embeddings.create(model="other", input="annual leave")).data
    assert simulator.stats()["embed"].faults == {"unavailable": 1}


# --- stream cuts -----------------------------------------------------------------------


REPLY = "Every full-time employee receives twenty seven days of leave."


async def test_a_stream_cut_rate_cuts_streams_after_some_content(
    simulator: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    simulator.configure(
        ConfigUpdate(
            seed=3,
            default_reply=REPLY,
            default_profile=FaultProfile(stream_cut_rate=1.0),
        )
    )
    received: list[ChatCompletionChunk] = []

    async def read_all() -> None:
        stream = await client.chat.completions.create(model="m", messages=QUESTION, stream=True)
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIConnectionError):
        await read_all()
    text = "".join(c.choices[0].delta.content or "" for c in received)
    assert text and REPLY.startswith(text) and text != REPLY
    assert all(c.choices[0].finish_reason is None for c in received)
    # Requests that are not streamed are never cut.
    assert await succeeds(client)
    assert simulator.stats()["m"] == DeploymentStats(requests=2, completed=1, stream_cuts=1)


def test_streams_are_cut_after_at_least_one_chunk_and_before_the_last(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.configure(
        ConfigUpdate(seed=5, default_reply="a b c d e", default_profile=FaultProfile())
    )
    body = {"model": "m", "messages": QUESTION, "stream": True}
    whole = http.post("/v1/chat/completions", json=body).text
    chunk_count = whole.count("data: {")  # role, five words, finish

    simulator.configure(ConfigUpdate(default_profile=FaultProfile(stream_cut_rate=1.0)))
    sent: list[int] = []
    for _ in range(40):
        received: list[bytes] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            received.extend(response.iter_bytes())
        text = b"".join(received).decode()
        assert "[DONE]" not in text
        sent.append(text.count("data: {"))
    assert set(sent) == set(range(1, chunk_count))


def test_the_stream_cut_point_is_drawn_within_the_stream() -> None:
    profile = FaultProfile(stream_cut_rate=0.5)
    rng = random.Random(9)
    cuts = [draw_stream_cut(profile, 6, rng) for _ in range(2_000)]
    assert {cut for cut in cuts if cut is not None} == {1, 2, 3, 4, 5}
    assert abs(cuts.count(None) / 2_000 - 0.5) < 0.05
    assert draw_stream_cut(FaultProfile(), 6, rng) is None


# --- latency ---------------------------------------------------------------------------


def test_lognormal_parameters_put_the_median_and_p99_where_asked() -> None:
    mu, sigma = lognormal_parameters(0.4, 2.0)
    assert mu == pytest.approx(math.log(0.4))
    assert sigma == pytest.approx(math.log(2.0 / 0.4) / 2.3263478740408408)
    assert math.isclose(Z_99, 2.3263478740408408)
    normal = NormalDist(mu, sigma)
    assert math.exp(normal.inv_cdf(0.5)) == pytest.approx(0.4)
    assert math.exp(normal.inv_cdf(0.99)) == pytest.approx(2.0)
    assert lognormal_parameters(1.0, 1.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="p50_s <= p99_s"):
        lognormal_parameters(2.0, 1.0)


def test_sampled_latencies_follow_their_distribution() -> None:
    rng = random.Random(11)
    lognormal = Latency(kind="lognormal", p50_s=0.4, p99_s=2.0)
    draws = sorted(sample_latency(lognormal, rng) for _ in range(20_000))
    assert draws[10_000] == pytest.approx(0.4, rel=0.05)
    assert draws[19_800] == pytest.approx(2.0, rel=0.1)

    uniform = Latency(kind="uniform", min_s=0.1, max_s=0.3)
    assert all(0.1 <= sample_latency(uniform, rng) <= 0.3 for _ in range(1_000))
    assert sample_latency(Latency(seconds=0.25), rng) == 0.25


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "lognormal", "p50_s": 1.0},
        {"kind": "lognormal", "p50_s": 1.0, "p99_s": 0.5},
        {"kind": "uniform", "min_s": 2.0, "max_s": 1.0},
        {"kind": "fixed", "seconds": -1},
        {"kind": "gamma"},
    ],
)
def test_latency_parameters_must_fit_the_kind(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Latency.model_validate(fields)


def test_the_profiles_latency_replaces_the_global_first_token_latency() -> None:
    state = SimulatorState(SimulatorConfig(first_token_latency_s=0.2, seed=1))
    assert state.first_token_delay(None) == 0.2
    assert state.first_token_delay(FaultProfile()) == 0.2
    fixed = FaultProfile(first_token_latency=Latency(seconds=0.5))
    assert state.first_token_delay(fixed) == 0.5
    lognormal = FaultProfile(first_token_latency=Latency(kind="lognormal", p50_s=1, p99_s=3))
    first = [state.first_token_delay(lognormal) for _ in range(5)]
    state.reset()  # restarts the seeded draws
    assert [state.first_token_delay(lognormal) for _ in range(5)] == first
    assert len(set(first)) == 5


# --- context window --------------------------------------------------------------------


async def test_a_prompt_beyond_the_context_window_is_context_length_exceeded(
    simulator: SimulatorServer, client: openai.AsyncOpenAI, ahttp: httpx.AsyncClient
) -> None:
    simulator.configure(ConfigUpdate(profiles={"small": FaultProfile(context_window=20)}))
    simulator.script(ScriptedReply(content="Kept for the next request."))

    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="small", messages=QUESTION, max_tokens=50)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"
    # "How many days of leave?" is six tokens.
    assert refused.value.body == {
        "message": "This model's maximum context length is 20 tokens. However, your messages "
        "resulted in 56 tokens (6 in the messages, 50 in the completion). Please reduce the "
        "length of the messages or completion.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }

    long_question = [{"role": "user", "content": "leave " * 30}]
    raw = await ahttp.post(
        "/v1/chat/completions", json={"model": "small", "messages": long_question}
    )
    assert raw.status_code == 400
    assert raw.json() == {
        "error": {
            "message": "This model's maximum context length is 20 tokens. However, your "
            "messages resulted in 30 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }

    fits = await client.chat.completions.create(model="small", messages=QUESTION, max_tokens=14)
    assert fits.choices[0].message.content == "Kept for the next request."
    assert await succeeds(client, "other-model")
    assert simulator.stats()["small"] == DeploymentStats(requests=3, completed=1, rejected=2)


# --- stats, recording, runtime configuration -------------------------------------------


def test_stats_count_requests_faults_cuts_and_completions_per_deployment(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.script(
        ScriptedReply(fault=Fault(kind="rate_limited")),
        ScriptedReply(content="a b c", fault=Fault(kind="stream_cut", after_chunks=2)),
        ScriptedReply(fault=Fault(kind="status", status_code=500)),
    )
    chat = {"model": "m", "messages": QUESTION}
    statuses = [http.post("/v1/chat/completions", json=chat).status_code]
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}) as response,
    ):
        response.read()
    statuses.append(http.post("/v1/chat/completions", json=chat).status_code)
    statuses.append(http.post("/v1/chat/completions", json=chat).status_code)
    statuses.append(http.post("/v1/chat/completions", json={"model": "m"}).status_code)
    azure = "/openai/deployments/dep/chat/completions"
    statuses.append(http.post(azure, json={"messages": QUESTION}).status_code)
    streamed = http.post(
        azure, params={"api-version": AZURE_API_VERSION}, json={**chat, "stream": True}
    )
    statuses.append(streamed.status_code)

    assert statuses == [429, 500, 200, 400, 400, 200]
    assert streamed.text.endswith("data: [DONE]\n\n")
    expected = {
        "m": {
            "requests": 5,
            "completed": 1,
            "faults": {"rate_limited": 1, "status": 1},
            "stream_cuts": 1,
            "rejected": 1,
        },
        "dep": {"requests": 2, "completed": 1, "faults": {}, "stream_cuts": 0, "rejected": 1},
    }
    assert http.get("/_sim/stats").json() == expected
    http.post("/_sim/reset")
    assert http.get("/_sim/stats").json() == {}


async def test_without_recording_no_request_is_kept(
    simulator: SimulatorServer, client: openai.AsyncOpenAI, ahttp: httpx.AsyncClient
) -> None:
    configured = await ahttp.post("/_sim/config", json={"record_requests": False})
    assert configured.json()["record_requests"] is False
    for _ in range(5):
        await client.chat.completions.create(model="m", messages=QUESTION)
    await client.embeddings.create(model="e", input="leave")
    await ahttp.post("/v1/chat/completions", json={"model": "m", "messages": []})

    assert simulator.requests() == []
    assert (await ahttp.get("/_sim/requests")).json() == []
    assert simulator.stats()["m"] == DeploymentStats(requests=6, completed=5, rejected=1)
    simulator.reset()
    await client.chat.completions.create(model="m", messages=QUESTION)
    assert len(simulator.requests()) == 1


def test_config_updates_accept_null_only_where_the_setting_may_be_null(
    http: httpx.Client,
) -> None:
    assert http.post("/_sim/config", json={"first_token_latency_s": None}).status_code == 422
    assert http.post("/_sim/config", json={"record_requests": None}).status_code == 422
    assert http.post("/_sim/config", json={"profiles": {"x": {"error_rate": 2}}}).status_code == (
        422
    )
    profile = {"error_rate": 0.5, "first_token_latency": {"kind": "fixed", "seconds": 0}}
    configured = http.post("/_sim/config", json={"default_profile": profile, "seed": 3}).json()
    assert configured["default_profile"]["error_rate"] == 0.5
    assert configured["seed"] == 3
    cleared = http.post("/_sim/config", json={"default_profile": None, "seed": None}).json()
    assert (cleared["default_profile"], cleared["seed"]) == (None, None)
    with pytest.raises(ValidationError, match="cannot be null"):
        ConfigUpdate(first_token_latency_s=None)
