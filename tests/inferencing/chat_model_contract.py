"""The contract every ChatModel passes (mix into a test class that provides a
``chat_model`` fixture and a ``question`` fixture: a request it answers with text)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from inferencing.contracts import (
    ChatDelta,
    ChatModel,
    ChatRequest,
    InferenceCaller,
    ModelCapabilities,
    Role,
)


async def collect(
    model: ChatModel, request: ChatRequest, caller: InferenceCaller
) -> list[ChatDelta]:
    return [delta async for delta in model.stream(request, caller)]


class ChatModelContract:
    async def test_is_a_chat_model_with_a_name_and_capabilities(
        self, chat_model: ChatModel
    ) -> None:
        assert isinstance(chat_model, ChatModel)
        assert chat_model.name.strip()
        assert isinstance(chat_model.capabilities, ModelCapabilities)
        assert chat_model.capabilities.streaming

    async def test_complete_answers_as_the_assistant_with_usage(
        self, chat_model: ChatModel, question: ChatRequest, caller: InferenceCaller
    ) -> None:
        response = await chat_model.complete(question, caller)
        assert response.message.role is Role.ASSISTANT
        assert response.message.content and response.message.content.strip()
        assert response.message.tool_calls == ()
        assert response.finish_reason == "stop"
        assert response.model
        assert response.usage is not None
        assert response.usage.input_tokens > 0
        assert response.usage.output_tokens > 0

    async def test_stream_arrives_in_pieces_and_ends_with_one_final_delta(
        self, chat_model: ChatModel, question: ChatRequest, caller: InferenceCaller
    ) -> None:
        deltas = await collect(chat_model, question, caller)
        *pieces, last = deltas
        assert len([d for d in pieces if d.content]) > 1
        assert all(d.finish_reason is None for d in pieces)
        assert last.finish_reason == "stop"
        assert last.content == ""
        assert last.usage is not None
        assert last.usage.output_tokens > 0

    async def test_stream_says_what_complete_says(
        self, chat_model: ChatModel, question: ChatRequest, caller: InferenceCaller
    ) -> None:
        response = await chat_model.complete(question, caller)
        deltas = await collect(chat_model, question, caller)
        assert "".join(d.content for d in deltas) == response.message.content
        assert deltas[-1].usage == response.usage

    async def test_an_abandoned_stream_leaves_the_model_usable(
        self, chat_model: ChatModel, question: ChatRequest, caller: InferenceCaller
    ) -> None:
        stream = chat_model.stream(question, caller)
        # Streams are async generators, so a caller that stops early can release them now.
        assert isinstance(stream, AsyncGenerator)
        first = await anext(stream)
        assert first.content
        await stream.aclose()
        response = await chat_model.complete(question, caller)
        assert response.finish_reason == "stop"

    async def test_aclose_can_be_called_twice(self, chat_model: ChatModel) -> None:
        await chat_model.aclose()
        await chat_model.aclose()
