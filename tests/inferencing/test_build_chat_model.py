from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferencing.contracts import ChatMessage, ChatModel, ChatRequest, Role
from inferencing.providers import build_chat_model
from inferencing.providers.extractive import ExtractiveAnswerer
from inferencing.providers.openai_compatible import OpenAICompatibleChatModel
from inferencing.settings import DeploymentSettings, InferencingSettings
from inferencing.simulator import ScriptedReply, SimulatorServer
from tests.inferencing.conftest import Caller


def only(settings: InferencingSettings) -> DeploymentSettings:
    (deployment,) = settings.registry()
    return deployment


async def test_extractive_is_the_default() -> None:
    model = build_chat_model(only(InferencingSettings()))
    assert isinstance(model, ExtractiveAnswerer)
    assert isinstance(model, ChatModel)
    assert not model.capabilities.generative
    await model.aclose()


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
async def test_openai_talks_to_the_configured_server_with_the_settings(
    simulator: SimulatorServer, caller: Caller, http_client: str
) -> None:
    settings = InferencingSettings(
        provider="openai",
        base_url=simulator.openai_base_url,
        api_key="sk-from-settings",
        model="gpt-4.1-mini",
    )
    model = build_chat_model(
        only(settings),
        http_client=http_client,  # type: ignore[arg-type]
        max_output_tokens=321,
        temperature=0.7,
    )
    assert isinstance(model, OpenAICompatibleChatModel)
    assert model.name == "openai:gpt-4.1-mini"
    assert model.capabilities.tool_calls and model.capabilities.generative
    assert model.capabilities.context_window == 128_000

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


async def test_the_sdk_never_retries_on_its_own(simulator: SimulatorServer, caller: Caller) -> None:
    # The gateway owns retries: a second layer in the SDK would multiply them.
    from inferencing.contracts import ProviderUnavailable
    from inferencing.simulator import Fault

    deployment = DeploymentSettings(name="d", base_url=simulator.openai_base_url, api_key="k")
    model = build_chat_model(deployment)
    simulator.script(ScriptedReply(fault=Fault(kind="unavailable")))
    with pytest.raises(ProviderUnavailable):
        await model.complete(ChatRequest([ChatMessage(Role.USER, "hi")]), caller)
    await model.aclose()
    assert len(simulator.requests()) == 1


async def test_capabilities_follow_the_deployment(simulator: SimulatorServer) -> None:
    deployment = DeploymentSettings(
        name="small",
        base_url=simulator.openai_base_url,
        api_key="k",
        supports_tools=False,
        supports_json_schema=True,
        context_window=8_192,
    )
    model = build_chat_model(deployment)
    capabilities = model.capabilities
    assert (capabilities.tool_calls, capabilities.json_schema, capabilities.context_window) == (
        False,
        True,
        8_192,
    )
    await model.aclose()


def test_openai_without_any_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="LAMINA_INFERENCING__API_KEY"):
        build_chat_model(only(InferencingSettings(provider="openai")))


async def test_azure_without_a_key_uses_an_entra_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Building must not fetch a token (that happens per request), so no network is needed.
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    settings = InferencingSettings(
        provider="azure_openai", azure_endpoint="https://contoso.openai.azure.com", model="chat"
    )
    model = build_chat_model(only(settings))
    assert isinstance(model, OpenAICompatibleChatModel)
    assert model.name == "azure_openai:chat"
    await model.aclose()


def test_azure_settings_need_an_endpoint() -> None:
    with pytest.raises(ValueError, match="azure_endpoint"):
        InferencingSettings(provider="azure_openai")
    with pytest.raises(ValueError, match=r"'eu'.*azure_endpoint"):
        DeploymentSettings(name="eu", provider="azure_openai")


# --- the registry ---------------------------------------------------------------------

REGISTRY = [
    {
        "name": "mini",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "model_version": "2024-07-18",
        "tier": "cheap",
        "input_price_per_1k": 0.00015,
        "output_price_per_1k": 0.0006,
        "fallbacks": ["large"],
    },
    {
        "name": "large",
        "provider": "azure_openai",
        "azure_endpoint": "https://contoso.openai.azure.com",
        "model": "gpt-4o",
        "retires_on": "2027-03-31",
        "region": "swedencentral",
    },
]


def test_deployments_come_from_a_json_list_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from client_api.settings import load_settings

    monkeypatch.setenv("LAMINA_INFERENCING__DEPLOYMENTS", json.dumps(REGISTRY))
    registry = load_settings().inferencing.registry()
    assert [d.name for d in registry] == ["mini", "large"]
    assert registry[0].fallbacks == ["large"]
    assert registry[1].retires_on is not None and registry[1].retires_on.isoformat() == "2027-03-31"


def test_deployments_come_from_a_yaml_file(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"deployments": REGISTRY}), "utf-8")
    registry = InferencingSettings(registry_file=path).registry()
    assert [(d.name, d.model_version, d.tier) for d in registry] == [
        ("mini", "2024-07-18", "cheap"),
        ("large", None, "any"),
    ]


def test_a_registry_file_that_does_not_validate_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps([{"name": "x", "provider": "nope"}]), "utf-8")
    with pytest.raises(ValueError, match="provider"):
        InferencingSettings(registry_file=path).registry()


@pytest.mark.parametrize(
    ("deployments", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "unique: a"),
        ([{"name": "a", "fallbacks": ["b"]}], "unknown b"),
        ([{"name": "has space"}], "name"),
    ],
)
def test_invalid_registries_are_refused(deployments: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InferencingSettings(deployments=deployments)  # type: ignore[arg-type]


def test_without_a_registry_the_top_level_fields_are_the_one_deployment() -> None:
    deployment = only(InferencingSettings(provider="openai", model="m", base_url="http://x"))
    assert (deployment.name, deployment.model, deployment.base_url) == ("openai", "m", "http://x")
