"""The OpenAI-compatible passthrough, usage reports and readiness, over real HTTP.

A real Lamina app on loopback, JWT authentication against a loopback identity
provider, two deployments on the OpenAI-compatible simulator, and the real
``openai`` client as the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from client_api.app import create_app
from client_api.cli import app as cli
from client_api.settings import LaminaSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.support.identity import (
    AUDIENCE,
    TENANT,
    IdentityProvider,
    running_identity_provider,
)
from tests.support.processes import app_in_thread

ADMIN = "Lamina.Admin"


@dataclass
class Service:
    base_url: str
    idp: IdentityProvider
    simulator: SimulatorServer
    settings: LaminaSettings

    def token(self, user: str = "adele", **claims: Any) -> str:
        return self.idp.token(user, **claims)

    def openai(self, user: str = "adele", **claims: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.token(user, **claims), max_retries=0
        )

    def get(self, path: str, user: str = "adele", **claims: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(user, **claims)}"}
        return httpx.get(f"{self.base_url}{path}", headers=headers, timeout=10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with SimulatorServer() as simulator, running_identity_provider() as idp:
        settings = LaminaSettings(
            data_dir=tmp_path_factory.mktemp("data"),
            log_level="WARNING",
            auth={
                "mode": "jwt",
                "openid_config_url": idp.config_url,
                "audience": AUDIENCE,
                "allowed_tenants": [TENANT, "fabrikam"],
                "issuers": [idp.v2_issuer_template],
            },
            inferencing={
                "usage_flush_s": 0.05,
                "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05},
                "deployments": [
                    {
                        "name": "primary",
                        "base_url": simulator.openai_base_url,
                        "api_key": "sk-sim",
                        "model": "gpt-4o-mini",
                        "model_version": "2024-07-18",
                        "priority": 1,
                        "input_price_per_1k": 0.15,
                        "output_price_per_1k": 0.6,
                        "fallbacks": ["backup"],
                    },
                    {
                        "name": "backup",
                        "base_url": simulator.openai_base_url,
                        "api_key": "sk-sim",
                        "model": "gpt-4o",
                    },
                    {"name": "legacy", "retires_on": "2020-01-01", "api_key": "k"},
                ],
            },
        )
        with app_in_thread(create_app(settings)) as base_url:
            yield Service(base_url, idp, simulator, settings)


@pytest.fixture(autouse=True)
def fresh_simulator(service: Service) -> None:
    service.simulator.reset()


QUESTION: list[Any] = [{"role": "user", "content": "How many days of leave do I get?"}]


def test_an_openai_client_works_unchanged_through_the_gateway(service: Service) -> None:
    service.simulator.script(ScriptedReply(content="You get 25 days."))
    raw = service.openai().chat.completions.with_raw_response.create(
        model="primary", messages=QUESTION
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "You get 25 days."
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert raw.headers["x-lamina-deployment"] == "primary"
    assert raw.headers["x-lamina-model-version"] == "2024-07-18"
    route = (completion.model_extra or {})["lamina"]["route"]
    assert route["attempts"] == [{"deployment": "primary", "outcome": "ok"}]
    (sent,) = service.simulator.requests()
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.headers["authorization"] == "Bearer sk-sim"  # the caller's token stays here


def test_streaming_through_the_gateway_ends_with_the_route(service: Service) -> None:
    service.simulator.script(ScriptedReply(content="Twenty five days of leave."))
    chunks = list(
        service.openai().chat.completions.create(
            model="auto", messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Twenty five days of leave."
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished and (finished[-1].model_extra or {})["lamina"]["route"]["deployment"] == (
        "primary"
    )
    assert any(c.usage is not None for c in chunks)


def test_a_failing_deployment_fails_over_and_says_so(service: Service) -> None:
    service.simulator.script(
        ScriptedReply(fault=Fault(kind="unavailable")), ScriptedReply(content="From the backup.")
    )
    completion = service.openai().chat.completions.create(model="primary", messages=QUESTION)
    assert completion.choices[0].message.content == "From the backup."
    route = (completion.model_extra or {})["lamina"]["route"]
    assert route["deployment"] == "backup"
    assert [a["outcome"] for a in route["attempts"]] == ["ProviderUnavailable", "ok"]


def test_when_every_attempt_fails_the_client_gets_a_typed_error_with_a_correlation_id(
    service: Service,
) -> None:
    service.simulator.script(*[ScriptedReply(fault=Fault(kind="unavailable")) for _ in range(8)])
    with pytest.raises(openai.APIStatusError) as raised:
        service.openai().chat.completions.create(model="primary", messages=QUESTION)
    error = raised.value
    assert error.status_code == 503
    assert "correlation id" in error.message
    assert error.response.headers["x-correlation-id"] in error.message
    assert "simulat" not in error.message.lower()  # the provider's own words stay inside


def test_unknown_and_retired_models_are_not_found_and_not_listed(service: Service) -> None:
    client = service.openai()
    for model in ("no-such-model", "legacy"):
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model=model, messages=QUESTION)
        assert raised.value.status_code in (404, 503)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert not_found.value.code == "model_not_found"
    listed = [m.id for m in client.models.list()]
    assert listed == ["lamina-rag", "lamina-agent", "auto", "primary", "backup"]
    assert service.simulator.requests() == []


def test_the_passthrough_needs_a_valid_token(service: Service) -> None:
    anonymous = httpx.post(f"{service.base_url}/v1/chat/completions", json={}, timeout=10)
    assert anonymous.status_code == 401
    forged = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        forged.chat.completions.create(model="primary", messages=QUESTION)
    assert service.simulator.requests() == []


def test_malformed_requests_are_refused_before_any_model_call(service: Service) -> None:
    headers = {"Authorization": f"Bearer {service.token()}"}
    for body in (
        {"model": "primary"},
        {"model": "primary", "messages": []},
        {"messages": QUESTION},
    ):
        response = httpx.post(
            f"{service.base_url}/v1/chat/completions", json=body, headers=headers, timeout=10
        )
        assert response.status_code == 422, body
    assert service.simulator.requests() == []


def test_usage_is_reported_to_admins_of_their_own_tenant_only(service: Service) -> None:
    service.simulator.script(ScriptedReply(content="one"), ScriptedReply(content="two"))
    service.openai("adele").chat.completions.create(model="primary", messages=QUESTION)
    service.openai("bo", tenant="fabrikam").chat.completions.create(
        model="primary", messages=QUESTION
    )

    assert service.get("/v1/usage").status_code == 403
    report = service.get("/v1/usage?by=user&since=1h", roles=(ADMIN,))
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["tenant_id"] == TENANT
    keys = [row["key"] for row in body["rows"]]
    assert any(key.endswith("/adele") for key in keys)
    assert not any("fabrikam" in key for key in keys)
    by_model = service.get("/v1/usage?by=model&since=1h", roles=(ADMIN,)).json()["rows"]
    assert "gpt-4o-mini@2024-07-18" in [row["key"] for row in by_model]
    assert all(row["cost"] > 0 for row in by_model if row["key"].startswith("gpt-4o-mini"))
    assert service.get("/v1/usage?since=yesterday", roles=(ADMIN,)).status_code == 422
    too_far = service.get("/v1/usage?since=9999999d", roles=(ADMIN,))
    assert too_far.status_code == 422
    assert "calendar" in too_far.json()["detail"]


def test_lamina_usage_prints_the_chargeback_table(service: Service) -> None:
    service.simulator.script(ScriptedReply(content="counted"))
    service.openai("carol").chat.completions.create(model="primary", messages=QUESTION)
    service.get("/v1/usage", roles=(ADMIN,))  # flushes the server's buffered records
    env = {"LAMINA_DATA_DIR": str(service.settings.data_dir)}
    result = CliRunner().invoke(cli, ["usage", "--by", "tenant", "--since", "1d"], env=env)
    assert result.exit_code == 0, result.output
    tenants = [line.split()[1] for line in result.output.splitlines() if line.startswith("│")]
    assert TENANT in tenants and "fabrikam" in tenants and "total" in tenants
    wrong = CliRunner().invoke(cli, ["usage", "--by", "planet"], env=env)
    assert wrong.exit_code == 2


def test_readiness_shows_where_gateway_state_lives_and_the_breakers(service: Service) -> None:
    checks = httpx.get(f"{service.base_url}/readyz", timeout=10).json()["checks"]
    assert checks["gateway_state"] == "in-process"
    assert checks["usage_ledger"] == "sqlite"
    assert {checks["breaker.primary"], checks["breaker.backup"]} <= {"closed", "open", "half_open"}


def test_streamed_chunks_name_the_model_as_the_non_streaming_reply_does(service: Service) -> None:
    """OpenAI clients read ``model`` from every chunk (SDKs, LangChain's metadata): it must
    be the provider's model name, the one a non-streaming reply carries, never empty."""
    service.simulator.script(ScriptedReply(content="Twenty five days."))
    completion = service.openai().chat.completions.create(model="primary", messages=QUESTION)
    service.simulator.script(ScriptedReply(content="Twenty five days."))
    chunks = list(
        service.openai().chat.completions.create(
            model="primary", messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    assert completion.model == "gpt-4o-mini"
    assert chunks and {chunk.model for chunk in chunks} == {completion.model}
