"""The OpenAI-compatible provider, driven by the real ``openai`` client against the
simulator over real HTTP on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import openai
import pytest

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    GroundingDocument,
    InvalidModelRequest,
    ModelCapabilities,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    Role,
    StreamInterrupted,
    ToolCall,
    ToolDefinition,
)
from inferencing.providers import build_chat_model
from inferencing.providers.openai_compatible import OpenAICompatibleChatModel
from inferencing.providers.openai_errors import retry_after_seconds
from inferencing.settings import DeploymentSettings
from inferencing.simulator import (
    ConfigUpdate,
    Fault,
    ScriptedReply,
    ScriptedToolCall,
    SimulatorServer,
)
from inferencing.simulator.completions import count_tokens
from tests.inferencing.chat_model_contract import ChatModelContract, collect
from tests.inferencing.conftest import Caller

LOOKUP = ToolDefinition(
    name="lookup_policy",
    description="Find the policy paragraph about a topic",
    parameters={
        "type": "object",
        "properties": {"topic": {"type": "string"}, "country": {"type": "string"}},
        "required": ["topic"],
    },
)


def question(text: str = "How many days of annual leave do I get?") -> ChatRequest:
    return ChatRequest(
        messages=[
            ChatMessage(Role.SYSTEM, "You are Contoso's HR assistant."),
            ChatMessage(Role.USER, text),
        ]
    )


def model_for(
    simulator: SimulatorServer, *, timeout: float = 5.0, supports_tools: bool = True
) -> OpenAICompatibleChatModel:
    client = openai.AsyncOpenAI(
        base_url=simulator.openai_base_url, api_key="sk-test", timeout=timeout, max_retries=0
    )
    return OpenAICompatibleChatModel(
        client,
        model="gpt-4o-mini",
        name="openai:gpt-4o-mini",
        capabilities=ModelCapabilities(tool_calls=supports_tools),
        default_max_tokens=400,
        default_temperature=0.2,
    )


@pytest.fixture
async def model(simulator: SimulatorServer) -> AsyncIterator[OpenAICompatibleChatModel]:
    chat_model = model_for(simulator)
    yield chat_model
    await chat_model.aclose()


class TestOpenAICompatibleContract(ChatModelContract):
    @pytest.fixture
    async def chat_model(
        self, simulator: SimulatorServer
    ) -> AsyncIterator[OpenAICompatibleChatModel]:
        chat_model = model_for(simulator)
        yield chat_model
        await chat_model.aclose()

    @pytest.fixture
    def question(self) -> ChatRequest:
        return question()


# --- answers ---------------------------------------------------------------------------


async def test_complete_maps_the_request_and_the_answer(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(ScriptedReply(content="You get 27 days of paid annual leave [1]."))
    response = await model.complete(question(), caller)

    assert response.message == ChatMessage(
        Role.ASSISTANT, "You get 27 days of paid annual leave [1]."
    )
    assert response.finish_reason == "stop"
    assert response.model == "gpt-4o-mini"
    (sent,) = simulator.requests()
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["messages"] == [
        {"role": "system", "content": "You are Contoso's HR assistant."},
        {"role": "user", "content": "How many days of annual leave do I get?"},
    ]
    assert sent.body["max_tokens"] == 400
    assert sent.body["temperature"] == 0.2
    assert "tools" not in sent.body
    assert not sent.body.get("stream")


async def test_request_values_override_the_defaults(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    request = ChatRequest(question().messages, max_tokens=50, temperature=0.0)
    await model.complete(request, caller)
    (sent,) = simulator.requests()
    assert sent.body["max_tokens"] == 50
    assert sent.body["temperature"] == 0.0


async def test_usage_is_what_the_provider_reported(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    # The simulator counts words and punctuation of the prompt, and one token per word sent.
    simulator.script(ScriptedReply(content="one two three"), ScriptedReply(content="four five"))
    prompt = sum(count_tokens(m.content or "") for m in question().messages)
    response = await model.complete(question(), caller)
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, 3)
    deltas = await collect(model, question(), caller)
    assert deltas[-1].usage is not None
    assert (deltas[-1].usage.input_tokens, deltas[-1].usage.output_tokens) == (prompt, 2)


async def test_grounding_documents_are_not_sent_by_the_provider(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    request = ChatRequest(
        question().messages, documents=[GroundingDocument(1, "Leave", "SECRET-PASSAGE")]
    )
    await model.complete(request, caller)
    (sent,) = simulator.requests()
    assert "SECRET-PASSAGE" not in json.dumps(sent.body)


async def test_stream_delivers_text_then_a_final_delta_with_usage(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    text = "Every full-time employee receives 27 days of paid annual leave [1]."
    simulator.script(ScriptedReply(content=text))
    deltas = await collect(model, question(), caller)

    *pieces, last = deltas
    assert "".join(d.content for d in pieces) == text
    assert len(pieces) == len(text.split())
    assert all(d.tool_calls == () and d.finish_reason is None for d in pieces)
    assert last == ChatDelta(finish_reason="stop", usage=last.usage, model=last.model)
    assert last.usage is not None and last.usage.output_tokens == len(text.split())
    (sent,) = simulator.requests()
    assert sent.body["stream"] is True
    # Every delta names the model the provider reported (the simulator echoes the request's).
    assert {d.model for d in deltas} == {sent.body["model"]}
    assert sent.body["stream_options"] == {"include_usage": True}


# --- tools -----------------------------------------------------------------------------


async def test_a_tool_call_round_trip(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(
        ScriptedReply(
            tool_calls=[
                ScriptedToolCall(
                    id="call_leave_1", name="lookup_policy", arguments={"topic": "annual leave"}
                )
            ]
        ),
        ScriptedReply(content="You get 27 days [1]."),
    )
    asked = ChatRequest(question().messages, tools=[LOOKUP])
    first = await model.complete(asked, caller)

    assert first.finish_reason == "tool_calls"
    assert first.message.tool_calls == (
        ToolCall("call_leave_1", "lookup_policy", '{"topic": "annual leave"}'),
    )
    tool_result = ChatMessage(
        Role.TOOL, content='{"days": 27}', tool_call_id=first.message.tool_calls[0].id
    )
    answered = ChatRequest([*asked.messages, first.message, tool_result], tools=[LOOKUP])
    second = await model.complete(answered, caller)

    assert second.message.content == "You get 27 days [1]."
    assert second.finish_reason == "stop"
    ask, answer = simulator.requests()
    assert ask.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup_policy",
                "description": "Find the policy paragraph about a topic",
                "parameters": LOOKUP.parameters,
            },
        }
    ]
    # The simulator, like OpenAI, refuses a tool result that answers no tool call: the
    # second request passed, and carries the call and its result in OpenAI's shape.
    assert answer.body["messages"][2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_leave_1",
                    "type": "function",
                    "function": {"name": "lookup_policy", "arguments": '{"topic": "annual leave"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"days": 27}', "tool_call_id": "call_leave_1"},
    ]


async def test_streamed_tool_calls_arrive_whole_in_one_delta(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.configure(ConfigUpdate(tool_argument_chunk_chars=3))
    leave = json.dumps({"topic": "annual leave", "country": "Netherlands"})
    travel = json.dumps({"topic": "hotel limits"})
    simulator.script(
        ScriptedReply(
            content="Let me look that up.",
            tool_calls=[
                ScriptedToolCall(id="call_a", name="lookup_policy", arguments=leave),
                ScriptedToolCall(id="call_b", name="lookup_policy", arguments=travel),
            ],
        )
    )
    deltas = await collect(model, ChatRequest(question().messages, tools=[LOOKUP]), caller)

    with_calls = [d for d in deltas if d.tool_calls]
    assert len(with_calls) == 1
    assert with_calls[0].tool_calls == (
        ToolCall("call_a", "lookup_policy", leave),
        ToolCall("call_b", "lookup_policy", travel),
    )
    assert "".join(d.content for d in deltas) == "Let me look that up."
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas.index(with_calls[0]) == len(deltas) - 2


async def test_tools_are_refused_when_the_model_cannot_call_them(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = model_for(simulator, supports_tools=False)
    with pytest.raises(InvalidModelRequest):
        await model.complete(ChatRequest(question().messages, tools=[LOOKUP]), caller)
    await model.aclose()
    assert simulator.requests() == []


async def test_a_tool_result_must_name_its_call(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    request = ChatRequest([*question().messages, ChatMessage(Role.TOOL, content="{}")])
    with pytest.raises(InvalidModelRequest):
        await model.complete(request, caller)
    assert simulator.requests() == []


# --- failures --------------------------------------------------------------------------


async def test_rate_limiting_becomes_provider_rate_limited_with_retry_after(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(
        ScriptedReply(fault=Fault(kind="rate_limited", retry_after_s=7)),
        ScriptedReply(fault=Fault(kind="rate_limited", retry_after_s=2)),
    )
    with pytest.raises(ProviderRateLimited) as raised:
        await model.complete(question(), caller)
    assert raised.value.retry_after_s == 7.0
    assert raised.value.retryable
    assert "Rate limit reached" not in raised.value.message  # the provider's words
    assert raised.value.details["status_code"] == 429

    with pytest.raises(ProviderRateLimited) as raised_in_stream:
        await collect(model, question(), caller)
    assert raised_in_stream.value.retry_after_s == 2.0


async def test_service_unavailable_becomes_retryable_provider_unavailable(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(
        ScriptedReply(fault=Fault(kind="unavailable", message="backend pool exhausted")),
        ScriptedReply(fault=Fault(kind="status", status_code=500)),
    )
    with pytest.raises(ProviderUnavailable) as raised:
        await model.complete(question(), caller)
    assert raised.value.retryable
    assert raised.value.details["status_code"] == 503
    assert "backend pool" not in raised.value.message
    assert "backend pool" in str(raised.value.details["provider_body"])

    with pytest.raises(ProviderUnavailable) as raised_in_stream:
        await collect(model, question(), caller)
    assert raised_in_stream.value.retryable


async def test_a_hanging_provider_becomes_provider_timeout(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = model_for(simulator, timeout=0.5)
    simulator.script(
        ScriptedReply(fault=Fault(kind="timeout", hang_s=30)),
        ScriptedReply(fault=Fault(kind="timeout", hang_s=30)),
    )
    started = time.monotonic()
    with pytest.raises(ProviderTimeout) as raised:
        await model.complete(question(), caller)
    assert raised.value.retryable
    with pytest.raises(ProviderTimeout):
        await collect(model, question(), caller)
    assert time.monotonic() - started < 10
    await model.aclose()


async def test_refused_requests_and_credentials_map_to_their_errors(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(
        ScriptedReply(fault=Fault(kind="status", status_code=400, message="bad 'messages'")),
        ScriptedReply(fault=Fault(kind="status", status_code=403)),
    )
    with pytest.raises(InvalidModelRequest) as bad_request:
        await model.complete(question(), caller)
    assert not bad_request.value.retryable
    assert "messages" not in bad_request.value.message
    with pytest.raises(ProviderAuthenticationFailed):
        await model.complete(question(), caller)

    simulator.configure(ConfigUpdate(accepted_credentials=["the-right-key"]))
    with pytest.raises(ProviderAuthenticationFailed) as unauthorized:
        await model.complete(question(), caller)
    assert unauthorized.value.details["status_code"] == 401
    assert not unauthorized.value.retryable


async def test_a_stream_cut_midway_raises_stream_interrupted_after_the_first_deltas(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    text = "Every full-time employee receives twenty seven days of paid annual leave."
    simulator.script(ScriptedReply(content=text, fault=Fault(kind="stream_cut", after_chunks=4)))
    received: list[ChatDelta] = []

    async def read_all() -> None:
        async for delta in model.stream(question(), caller):
            received.append(delta)

    with pytest.raises(StreamInterrupted) as raised:
        await read_all()

    assert [d.content for d in received] == ["Every ", "full-time ", "employee "]
    assert all(d.finish_reason is None for d in received)
    assert not raised.value.retryable
    assert raised.value.message == "The model's answer was interrupted."


async def test_a_stream_cut_before_any_text_can_still_be_failed_over(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(
        ScriptedReply(content="never delivered", fault=Fault(kind="stream_cut", after_chunks=1))
    )
    with pytest.raises(ProviderUnavailable) as raised:
        await collect(model, question(), caller)
    assert not isinstance(raised.value, StreamInterrupted)
    assert raised.value.retryable


async def test_a_cut_non_streaming_answer_is_provider_unavailable(
    model: OpenAICompatibleChatModel, simulator: SimulatorServer, caller: Caller
) -> None:
    simulator.script(ScriptedReply(content="half of it", fault=Fault(kind="stream_cut")))
    with pytest.raises(ProviderUnavailable) as raised:
        await model.complete(question(), caller)
    assert raised.value.retryable


# --- Azure OpenAI ----------------------------------------------------------------------


def azure_settings(simulator: SimulatorServer, **changes: object) -> DeploymentSettings:
    values: dict[str, object] = {
        "name": "azure",
        "provider": "azure_openai",
        "azure_endpoint": simulator.base_url,
        "model": "chat-deployment",
    }
    return DeploymentSettings.model_validate(values | changes)


async def test_azure_with_an_api_key_uses_the_deployment_route_and_api_key_header(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = build_chat_model(azure_settings(simulator, api_key="azure-key-123"))
    simulator.script(ScriptedReply(content="Hello from Azure."))
    response = await model.complete(question(), caller)
    deltas = await collect(model, question(), caller)
    await model.aclose()

    assert response.message.content == "Hello from Azure."
    assert response.model == "chat-deployment"
    assert deltas[-1].finish_reason == "stop"
    for sent in simulator.requests():
        assert sent.path == "/openai/deployments/chat-deployment/chat/completions"
        assert sent.query["api-version"] == "2024-10-21"
        assert sent.headers["api-key"] == "azure-key-123"
        assert "authorization" not in sent.headers


async def test_azure_with_an_entra_token_sends_it_as_a_bearer_token(
    simulator: SimulatorServer, caller: Caller
) -> None:
    issued: list[str] = []

    async def token_provider() -> str:
        issued.append(f"entra-token-{len(issued) + 1}")
        return issued[-1]

    model = build_chat_model(azure_settings(simulator), azure_token_provider=token_provider)
    await model.complete(question(), caller)
    await collect(model, question(), caller)
    await model.aclose()

    first, second = simulator.requests()
    assert first.headers["authorization"] == "Bearer entra-token-1"
    assert second.headers["authorization"] == "Bearer entra-token-2"
    assert "api-key" not in first.headers
    assert first.path == "/openai/deployments/chat-deployment/chat/completions"


async def test_azure_token_failures_are_authentication_errors(
    simulator: SimulatorServer, caller: Caller
) -> None:
    async def broken_provider() -> str:
        raise RuntimeError("no managed identity endpoint")

    model = build_chat_model(azure_settings(simulator), azure_token_provider=broken_provider)
    with pytest.raises(ProviderAuthenticationFailed) as raised:
        await model.complete(question(), caller)
    await model.aclose()
    assert "managed identity" not in raised.value.message
    assert simulator.requests() == []


# --- Retry-After parsing ----------------------------------------------------------------


def test_retry_after_is_read_from_seconds_milliseconds_or_a_date() -> None:
    assert retry_after_seconds({"retry-after": "12"}) == 12.0
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    from_date = retry_after_seconds({"retry-after": in_a_minute})
    assert from_date is not None and 55 <= from_date <= 60
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after": "-3"}) is None
    assert retry_after_seconds({}) is None
