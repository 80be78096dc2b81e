"""The simulator's wire format and controls, checked over HTTP (and against the SDK's types)."""

from __future__ import annotations

import base64
import json
import math
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from inferencing.simulator import (
    ConfigUpdate,
    Fault,
    ScriptedReply,
    ScriptedToolCall,
    SimulatorConfig,
    SimulatorServer,
)

QUESTION = [{"role": "user", "content": "How many days of leave?"}]


@pytest.fixture
def http(simulator: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=simulator.base_url, timeout=5) as client:
        yield client


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


def stream(http: httpx.Client, **body: Any) -> list[str]:
    response = http.post("/v1/chat/completions", json={"model": "m", "stream": True, **body})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response.text)


def test_streamed_text_is_in_openai_chunk_format_with_a_usage_chunk(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.script(ScriptedReply(content="Twenty seven days."))
    events = stream(http, messages=QUESTION, stream_options={"include_usage": True})

    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Twenty seven days."
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 3
    assert all(json.loads(e)["usage"] is None for e in events[:-2])


def test_without_include_usage_there_is_no_usage_chunk(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    events = stream(http, messages=QUESTION)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


def test_streamed_tool_calls_are_split_across_chunks(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    arguments = json.dumps({"topic": "annual leave", "country": "NL"})
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(id="call_1", name="lookup", arguments=arguments)]
        )
    )
    events = stream(http, messages=QUESTION)
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    fragments = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]

    assert len(fragments) > 2
    head, *rest = fragments
    assert (head.index, head.id, head.type) == (0, "call_1", "function")
    assert head.function is not None and head.function.name == "lookup"
    assert all(f.id is None and f.function and f.function.name is None for f in rest)
    assert "".join(f.function.arguments or "" for f in fragments if f.function) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_answers_validate_as_chat_completions(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.script(
        ScriptedReply(content="Checking.", tool_calls=[ScriptedToolCall(name="lookup")])
    )
    response = http.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION})
    completion = ChatCompletion.model_validate(response.json())
    assert completion.model == "m"
    assert completion.choices[0].message.content == "Checking."
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_unscripted_requests_get_an_echo_and_max_tokens_cuts_it(http: httpx.Client) -> None:
    body = {"model": "m", "messages": QUESTION}
    echo = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert echo["message"]["content"] == "Simulated reply to: How many days of leave?"
    cut = http.post("/v1/chat/completions", json=body | {"max_tokens": 2}).json()["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"]) == ("Simulated reply ", "length")


def test_tool_results_must_answer_a_tool_call(http: httpx.Client) -> None:
    messages = [*QUESTION, {"role": "tool", "tool_call_id": "call_x", "content": "{}"}]
    response = http.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_azure_route_needs_an_api_version(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    path = "/openai/deployments/chat/chat/completions"
    assert http.post(path, json={"messages": QUESTION}).status_code == 400
    answered = http.post(
        path, params={"api-version": "2024-10-21"}, json={"messages": QUESTION}
    ).json()
    assert answered["model"] == "chat"


def test_faults_have_openai_status_codes_and_headers(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.script(
        ScriptedReply(fault=Fault(kind="rate_limited", retry_after_s=3)),
        ScriptedReply(fault=Fault(kind="unavailable")),
    )
    body = {"model": "m", "messages": QUESTION}
    limited = http.post("/v1/chat/completions", json=body)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "3")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert http.post("/v1/chat/completions", json=body).status_code == 503
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_stream_cut_closes_the_connection_without_done(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.script(
        ScriptedReply(content="a b c d e f", fault=Fault(kind="stream_cut", after_chunks=3))
    )
    received: list[bytes] = []
    body = {"model": "m", "messages": QUESTION, "stream": True}

    def read_all() -> None:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            received.extend(response.iter_bytes())

    with pytest.raises(httpx.RemoteProtocolError):
        read_all()
    events = b"".join(received).decode().split("\n\n")
    assert len([e for e in events if e.startswith("data: {")]) == 3
    assert "[DONE]" not in b"".join(received).decode()


def test_first_token_latency_is_applied(simulator: SimulatorServer, http: httpx.Client) -> None:
    simulator.configure(ConfigUpdate(first_token_latency_s=0.3))
    started = time.monotonic()
    http.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION})
    assert time.monotonic() - started >= 0.3


def test_models_lists_the_simulated_model(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [SimulatorConfig().model]


# --- embeddings ------------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors_through_the_sdk(
    simulator: SimulatorServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=simulator.openai_base_url, api_key="k", max_retries=0)
    texts = ["annual leave policy", "annual leave days", "database failover runbook"]
    first = await client.embeddings.create(model="embed", input=texts, dimensions=64)
    again = await client.embeddings.create(model="embed", input=texts, dimensions=64)
    packed = await client.embeddings.create(
        model="embed", input=texts[:1], dimensions=64, encoding_format="base64"
    )
    await client.close()

    vectors = [item.embedding for item in first.data]
    assert vectors == [item.embedding for item in again.data]
    assert all(len(v) == 64 for v in vectors)
    # The SDK asks for base64 (float32) by default, hence the tolerance.
    assert all(math.isclose(sum(x * x for x in v), 1.0, abs_tol=1e-5) for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    raw = packed.data[0].embedding
    decoded = struct.unpack("<64f", base64.b64decode(raw if isinstance(raw, str) else ""))
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(decoded, vectors[0], strict=True))
    assert first.usage.prompt_tokens == 9


def test_embedding_dimensions_default_to_the_configuration(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.configure(ConfigUpdate(embedding_dims=12))
    body = http.post("/v1/embeddings", json={"model": "e", "input": "hello"}).json()
    assert len(body["data"][0]["embedding"]) == 12
    simulator.script_embedding_faults(Fault(kind="rate_limited"))
    assert http.post("/v1/embeddings", json={"model": "e", "input": "x"}).status_code == 429
    azure = http.post(
        "/openai/deployments/embed/embeddings",
        params={"api-version": "2024-10-21"},
        json={"input": ["a", "b"]},
    ).json()
    assert (azure["model"], len(azure["data"])) == ("embed", 2)


# --- control endpoints -----------------------------------------------------------------


def test_the_script_requests_reset_and_config_endpoints(http: httpx.Client) -> None:
    queued = http.post(
        "/_sim/script",
        json={"replies": [{"content": "first"}, {"fault": {"kind": "unavailable"}}]},
    )
    assert queued.json() == {"pending_replies": 2}
    chat = {"model": "m", "messages": QUESTION}
    headers = {"Authorization": "Bearer tok-1", "api-key": "key-1"}
    answer = http.post("/v1/chat/completions", json=chat, headers=headers).json()
    assert answer["choices"][0]["message"]["content"] == "first"

    (seen,) = http.get("/_sim/requests").json()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == "Bearer tok-1"
    assert seen["headers"]["api-key"] == "key-1"
    assert seen["body"] == chat

    assert http.post("/_sim/reset").status_code == 200
    assert http.get("/_sim/requests").json() == []
    # The queued 503 is gone with the reset; a new default reply is configured.
    configured = http.post("/_sim/config", json={"default_reply": "Fixed."}).json()
    assert configured["default_reply"] == "Fixed."
    answer = http.post("/v1/chat/completions", json=chat).json()
    assert answer["choices"][0]["message"]["content"] == "Fixed."
    assert http.post("/_sim/script", json={"replies": [{}]}).status_code == 422


def test_a_reply_for_a_tool_waits_for_a_request_that_offers_it(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    """A scripted tool call kept for the turn that offers the tool: a gateway failing
    a plain question over to this simulator must not take it (and answer a plain question
    with a tool call), while replies without a condition keep their order."""
    ticket = ScriptedToolCall(name="create_ticket", arguments={"title": "Screen"})
    simulator.script(
        ScriptedReply(tool_calls=[ticket], when_tool="create_ticket"),
        ScriptedReply(content="Unconditional."),
    )
    tool = {"type": "function", "function": {"name": "create_ticket", "parameters": {}}}
    other = {"type": "function", "function": {"name": "search", "parameters": {}}}
    plain = {"model": "m", "messages": QUESTION}

    first = http.post("/v1/chat/completions", json=plain).json()["choices"][0]["message"]
    assert first["content"] == "Unconditional." and not first.get("tool_calls")
    echoed = http.post("/v1/chat/completions", json=plain | {"tools": [other]}).json()
    assert not echoed["choices"][0]["message"].get("tool_calls")
    assert http.post("/_sim/script", json={"replies": []}).json() == {"pending_replies": 1}

    taken = http.post("/v1/chat/completions", json=plain | {"tools": [other, tool]}).json()
    (call,) = taken["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "create_ticket"
    assert http.post("/_sim/script", json={"replies": []}).json() == {"pending_replies": 0}


def test_accepted_credentials_refuse_other_keys(
    simulator: SimulatorServer, http: httpx.Client
) -> None:
    simulator.configure(ConfigUpdate(accepted_credentials=["good"]))
    chat = {"model": "m", "messages": QUESTION}
    assert http.post("/v1/chat/completions", json=chat).status_code == 401
    assert http.post("/v1/chat/completions", json=chat, headers={"api-key": "good"}).is_success
    bearer = {"Authorization": "Bearer good"}
    assert http.post("/v1/chat/completions", json=chat, headers=bearer).is_success


@pytest.mark.slow
def test_python_dash_m_serves_the_simulator() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "inferencing.simulator", "--port", str(port), "--model", "cli"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        assert models["data"][0]["id"] == "cli"
    finally:
        process.terminate()
        process.wait(timeout=10)
