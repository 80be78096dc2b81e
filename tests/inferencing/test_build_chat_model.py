from __future__ import annotations

import pytest

from inferencing.contracts import ChatMessage, ChatModel, ChatRequest, Role
from inferencing.providers import build_chat_model
from inferencing.providers.extractive import ExtractiveAnswerer
from inferencing.providers.openai_compatible import OpenAICompatibleChatModel
from inferencing.settings import InferencingSettings
from inferencing.simulator import ScriptedReply, SimulatorServer
from tests.inferencing.conftest import Caller


async def test_extractive_is_the_default() -> None:
    model = build_chat_model(InferencingSettings())
    assert isinstance(model, ExtractiveAnswerer)
    assert isinstance(model, ChatModel)
    assert not model.capabilities.generative
    await model.aclose()


async def test_openai_talks_to_the_configured_server_with_the_settings(
    simulator: SimulatorServer, caller: Caller
) -> None:
    settings = InferencingSettings(
        provider="openai",
        base_url=simulator.openai_base_url,
        api_key="sk-from-settings",
        model="gpt-4.1-mini",
        max_output_tokens=321,
        temperature=0.7,
        max_retries=0,
    )
    model = build_chat_model(settings)
    assert isinstance(model, OpenAICompatibleChatModel)
    assert model.name == "openai:gpt-4.1-mini"
    assert model.capabilities.tool_calls and model.capabilities.generative

    simulator.script(ScriptedReply(content="ok"))
    response = await model.complete(ChatRequest([ChatMessage(Role.USER, "hi")]), caller)
    await model.aclose()

    assert response.message.content == "ok"
    (sent,) = simulator.requests()
    assert sent.headers["authorization"] == "Bearer sk-from-settings"
    assert (sent.body["model"], sent.body["max_tokens"], sent.body["temperature"]) == (
        "gpt-4.1-mini",
        321,
        0.7,
    )


async def test_capabilities_follow_supports_tools(simulator: SimulatorServer) -> None:
    settings = InferencingSettings(
        provider="openai",
        base_url=simulator.openai_base_url,
        api_key="k",
        supports_tools=False,
    )
    model = build_chat_model(settings)
    assert not model.capabilities.tool_calls
    await model.aclose()


def test_openai_without_any_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="LAMINA_INFERENCING__API_KEY"):
        build_chat_model(InferencingSettings(provider="openai"))


async def test_azure_without_a_key_uses_an_entra_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Building must not fetch a token (that happens per request), so no network is needed.
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    settings = InferencingSettings(
        provider="azure_openai", azure_endpoint="https://contoso.openai.azure.com", model="chat"
    )
    model = build_chat_model(settings)
    assert isinstance(model, OpenAICompatibleChatModel)
    assert model.name == "azure_openai:chat"
    await model.aclose()


def test_azure_settings_need_an_endpoint() -> None:
    with pytest.raises(ValueError, match="azure_endpoint"):
        InferencingSettings(provider="azure_openai")
