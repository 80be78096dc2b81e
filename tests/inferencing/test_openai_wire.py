"""The passthrough forwarder on the wire: what it sends, and how failures are typed."""

from __future__ import annotations

import pytest

from inferencing.contracts import (
    ChatForwarder,
    ContextWindowExceeded,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderUnavailable,
)
from inferencing.providers import build_chat_model
from inferencing.settings import DeploymentSettings, TimeoutSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.inferencing.conftest import Caller
from tests.support.processes import free_port

BODY = {
    "model": "whatever-the-client-said",
    "messages": [{"role": "user", "content": "How many days of leave do I get?"}],
    "seed": 42,
    "logprobs": False,
}


def forwarder(**settings: object) -> ChatForwarder:
    model = build_chat_model(DeploymentSettings.model_validate({"name": "d", **settings}))
    assert isinstance(model, ChatForwarder)
    return model


async def test_the_body_goes_on_as_sent_but_for_the_model(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = forwarder(base_url=simulator.openai_base_url, api_key="sk-wire", model="gpt-4o-mini")
    simulator.script(ScriptedReply(content="25 days."))
    body = await model.forward(BODY, caller)
    await model.aclose()  # type: ignore[attr-defined]
    assert body["choices"][0]["message"]["content"] == "25 days."
    (sent,) = simulator.requests()
    assert sent.body == BODY | {"model": "gpt-4o-mini"}
    assert sent.headers["authorization"] == "Bearer sk-wire"


async def test_azure_deployments_are_posted_to_their_route_with_their_key_or_token(
    simulator: SimulatorServer, caller: Caller
) -> None:
    azure = {
        "provider": "azure_openai",
        "azure_endpoint": simulator.base_url,
        "model": "chat-deployment",
    }
    with_key = forwarder(**azure, api_key="azure-key")
    await with_key.forward(BODY, caller)
    await with_key.aclose()  # type: ignore[attr-defined]

    async def token() -> str:
        return "entra-token"

    with_token = build_chat_model(
        DeploymentSettings.model_validate({"name": "d", **azure}), azure_token_provider=token
    )
    assert isinstance(with_token, ChatForwarder)
    await with_token.forward(BODY, caller)
    await with_token.aclose()  # type: ignore[attr-defined]

    keyed, bearer = simulator.requests()
    for sent in (keyed, bearer):
        assert sent.path == "/openai/deployments/chat-deployment/chat/completions"
        assert sent.query["api-version"] == "2024-10-21"
        assert sent.body["model"] == BODY["model"]  # Azure reads the deployment from the URL
    assert keyed.headers["api-key"] == "azure-key" and "authorization" not in keyed.headers
    assert bearer.headers["authorization"] == "Bearer entra-token"


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(kind="rate_limited", retry_after_s=4), ProviderRateLimited),
        (Fault(kind="unavailable"), ProviderUnavailable),
        (Fault(kind="status", status_code=401), ProviderAuthenticationFailed),
    ],
)
async def test_http_failures_become_the_same_typed_errors_as_on_the_sdk_path(
    simulator: SimulatorServer, caller: Caller, fault: Fault, error: type[Exception]
) -> None:
    model = forwarder(base_url=simulator.openai_base_url, api_key="k")
    simulator.script(ScriptedReply(fault=fault))
    with pytest.raises(error) as raised:
        await model.forward(BODY, caller)
    await model.aclose()  # type: ignore[attr-defined]
    assert "simulated" not in str(raised.value).lower()
    if isinstance(raised.value, ProviderRateLimited):
        assert raised.value.retry_after_s == 4


async def test_a_context_overflow_and_a_cut_body_are_typed(
    simulator: SimulatorServer, caller: Caller
) -> None:
    from inferencing.simulator.config import ConfigUpdate, FaultProfile

    model = forwarder(base_url=simulator.openai_base_url, api_key="k", model="tiny")
    simulator.configure(ConfigUpdate(profiles={"tiny": FaultProfile(context_window=5)}))
    with pytest.raises(ContextWindowExceeded):
        await model.forward(BODY, caller)
    simulator.reset()
    simulator.script(ScriptedReply(content="cut", fault=Fault(kind="stream_cut")))
    with pytest.raises(ProviderUnavailable):
        await model.forward(BODY, caller)
    await model.aclose()  # type: ignore[attr-defined]


async def test_nobody_listening_is_unavailable_not_a_hang(caller: Caller) -> None:
    model = build_chat_model(
        DeploymentSettings(name="d", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k"),
        timeouts=TimeoutSettings(connect_s=1, total_s=2),
    )
    assert isinstance(model, ChatForwarder)
    with pytest.raises(ProviderUnavailable):
        await model.forward(BODY, caller)
    await model.aclose()
