"""The OpenAI-compatible facade's logical models, with the real ``openai`` client.

A real Lamina app on loopback: a small corpus under access rules, the model on the
OpenAI-compatible simulator, the model planner, an installed high-risk plugin, and a
Lamina API key as the client's ``api_key``, as an unchanged OpenAI application would
hold it. ``lamina-rag`` answers from the documents with citations and offers no tool;
``lamina-agent`` plans tool calls and pauses for approval; a deployment's name is a
gateway passthrough.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from client_api.app import create_app
from client_api.auth.api_keys import open_api_key_store
from client_api.settings import LaminaSettings
from inferencing.simulator import ScriptedReply, ScriptedToolCall, SimulatorServer
from tests.client_api.corpus import dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing
from tools.contracts import RiskLevel
from tools.plugins import tool

HANDBOOK = "# Leave\n\nEvery employee gets 27 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th of each month.\n"
QUESTION = "How many days of annual leave do I get?"
ANSWER = "You get 27 days of annual leave a year [1]."
DEPLOYMENT = "openai"
"""The one deployment of ``simulated_inferencing``, named after its provider."""

DELETED: list[str] = []
"""Every run of :func:`delete_mailbox`, in this process."""


@tool(risk=RiskLevel.HIGH, roles={"Lamina.User"})
def delete_mailbox(owner: str) -> dict[str, str]:
    """Delete a user's mailbox. This cannot be undone."""
    DELETED.append(owner)
    return {"deleted": owner}


def _install_plugin(root: Path) -> None:
    """A distribution whose ``lamina.tools`` entry point names :func:`delete_mailbox`."""
    dist = root / "mailbox_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mailbox-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[lamina.tools]\nmail = {__name__}:delete_mailbox\n")


def _issue_key(settings: LaminaSettings, name: str, roles: list[str]) -> str:
    async def issue() -> str:
        async with AsyncExitStack() as stack:
            store = await open_api_key_store(settings, stack)
            return (await store.create("contoso", name, roles=roles)).key

    return asyncio.run(issue())


@dataclass
class Lamina:
    base_url: str
    simulator: SimulatorServer
    key: str
    models_only_key: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=key or self.key, max_retries=0, timeout=30
        )


@pytest.fixture(scope="module")
def lamina(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lamina]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    plugin = tmp_path_factory.mktemp("plugin")
    _install_plugin(plugin)
    with SimulatorServer() as simulator, pytest.MonkeyPatch.context() as env:
        env.syspath_prepend(str(plugin))  # the entry point is discovered at start-up
        settings = dev_settings(
            data,
            inferencing=simulated_inferencing(simulator),
            intelligence={"planner": "model"},
        )
        # A key for a gateway-only client: it may name deployments, not the assistant.
        settings.auth.role_permissions["Gateway.Client"] = ["models"]
        key = _issue_key(settings, "helpdesk-app", ["Lamina.User", "employee"])
        models_only = _issue_key(settings, "batch-job", ["Gateway.Client"])
        with app_in_thread(create_app(settings)) as base:
            yield Lamina(base, simulator, key, models_only)


@pytest.fixture(autouse=True)
def fresh_simulator(lamina: Lamina) -> None:
    lamina.simulator.reset()
    DELETED.clear()


def test_models_lists_the_logical_models_first_then_the_deployments(lamina: Lamina) -> None:
    ids = [model.id for model in lamina.client().models.list()]
    assert ids == ["lamina-rag", "lamina-agent", "auto", DEPLOYMENT]
    # A caller who may use the gateway but not chat sees only what it may name.
    assert [m.id for m in lamina.client(lamina.models_only_key).models.list()] == [
        "auto",
        DEPLOYMENT,
    ]


def test_lamina_rag_answers_from_the_documents_with_citations_in_the_extension(
    lamina: Lamina,
) -> None:
    lamina.simulator.script(ScriptedReply(content=ANSWER))
    completion = lamina.client().chat.completions.create(
        model="lamina-rag", messages=[{"role": "user", "content": QUESTION}]
    )
    assert completion.object == "chat.completion"
    assert completion.model == "lamina-rag"
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    extension = (completion.model_extra or {})["lamina"]
    [citation] = extension["citations"]
    assert (citation["ref"], citation["source"]) == (1, "handbook/leave.md")
    assert "27 days" in citation["snippet"]
    assert completion.id == f"chatcmpl-{extension['message_id']}"
    # Grounded only: rules planned it, so the one model call is the answer, offered no tool,
    # and grounded on the passage the caller may read (never the finance-only page).
    [answer_call] = lamina.simulator.requests()
    assert "tools" not in answer_call.body
    prompt = " ".join(str(m.get("content")) for m in answer_call.body["messages"])
    assert "27 days" in prompt and "Salaries" not in prompt


def test_a_conversation_continues_when_the_request_names_it(lamina: Lamina) -> None:
    client = lamina.client()
    lamina.simulator.script(ScriptedReply(content=ANSWER), ScriptedReply(content="Yes [1]."))
    first = client.chat.completions.create(
        model="lamina-rag", messages=[{"role": "user", "content": QUESTION}]
    )
    conversation = (first.model_extra or {})["lamina"]["conversation_id"]
    second = client.chat.completions.create(
        model="lamina-rag",
        messages=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "Is that per year?"},
        ],
        extra_body={"lamina": {"conversation_id": conversation}},
    )
    assert (second.model_extra or {})["lamina"]["conversation_id"] == conversation
    # The stored history reached the model with the follow-up.
    answer_call = lamina.simulator.requests()[-1]
    contents = [m.get("content") for m in answer_call.body["messages"]]
    assert contents[-3:-1] == [QUESTION, "You get 27 days of annual leave a year (source: Leave)."]
    assert contents[-1] == "Is that per year?"


def test_lamina_rag_streams_chunks_and_ends_with_the_extension(lamina: Lamina) -> None:
    lamina.simulator.script(ScriptedReply(content=ANSWER))
    chunks = list(
        lamina.client().chat.completions.create(
            model="lamina-rag",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == "stop"
    extension = (last.model_extra or {})["lamina"]
    assert [c["source"] for c in extension["citations"]] == ["handbook/leave.md"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_lamina_agent_calls_a_tool_the_caller_may_use(lamina: Lamina) -> None:
    lamina.simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="lookup_employee", arguments={"query": "Megan"})]
        ),
        ScriptedReply(content="I have what I need."),
        ScriptedReply(content="Megan Bowen works in Sales, extension 4101."),
    )
    completion = lamina.client().chat.completions.create(
        model="lamina-agent", messages=[{"role": "user", "content": "Who is Megan?"}]
    )
    assert completion.choices[0].message.content == "Megan Bowen works in Sales, extension 4101."
    planning = lamina.simulator.requests()[0].body
    assert "lookup_employee" in {t["function"]["name"] for t in planning["tools"]}
    answer_call = lamina.simulator.requests()[-1].body
    assert any("megan.bowen@contoso.com" in str(m.get("content")) for m in answer_call["messages"])


def test_lamina_agent_answers_a_paused_turn_with_the_approval_instead_of_hanging(
    lamina: Lamina,
) -> None:
    lamina.simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="delete_mailbox", arguments={"owner": "lee"})]
        )
    )
    completion = lamina.client().chat.completions.create(
        model="lamina-agent", messages=[{"role": "user", "content": "Delete Lee's mailbox."}]
    )
    content = completion.choices[0].message.content or ""
    approval = (completion.model_extra or {})["lamina"]["approval"]
    assert (approval["tool"], approval["arguments"]) == ("delete_mailbox", {"owner": "lee"})
    assert f"POST /v1/approvals/{approval['approval_id']}" in content
    assert completion.choices[0].finish_reason == "stop"
    assert DELETED == []


def test_a_deployment_name_is_a_gateway_passthrough(lamina: Lamina) -> None:
    lamina.simulator.script(ScriptedReply(content="Paris."))
    completion = lamina.client().chat.completions.create(
        model=DEPLOYMENT,
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
        ],
        extra_body={"lamina": {"conversation_id": "ignored-here"}},
    )
    assert completion.choices[0].message.content == "Paris."
    assert (completion.model_extra or {})["lamina"]["route"]["deployment"] == DEPLOYMENT
    # The messages went to the model as sent: no retrieval, no assistant prompt, and
    # Lamina's own extension stays with Lamina.
    [sent] = lamina.simulator.requests()
    assert [m["content"] for m in sent.body["messages"]] == [
        "Answer in one word.",
        "Capital of France?",
    ]
    assert "lamina" not in sent.body


def test_a_bad_or_missing_key_is_an_authentication_error(lamina: Lamina) -> None:
    for key in ("lam_aaaaaaaaaaaa_" + "A" * 43, "not-a-key"):
        with pytest.raises(openai.AuthenticationError) as raised:
            lamina.client(key).chat.completions.create(
                model="lamina-rag", messages=[{"role": "user", "content": QUESTION}]
            )
        assert raised.value.status_code == 401
    assert lamina.simulator.requests() == []


def test_unknown_models_and_conversations_are_not_found(lamina: Lamina) -> None:
    client = lamina.client()
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.chat.completions.create(
            model="gpt-nonexistent", messages=[{"role": "user", "content": QUESTION}]
        )
    assert unknown_model.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="lamina-rag",
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"lamina": {"conversation_id": "0" * 32}},
        )


def test_a_logical_model_needs_the_chat_permission(lamina: Lamina) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        lamina.client(lamina.models_only_key).chat.completions.create(
            model="lamina-rag", messages=[{"role": "user", "content": QUESTION}]
        )
    assert "chat" in refused.value.message
    assert lamina.simulator.requests() == []


def test_the_last_message_must_be_the_users_question(lamina: Lamina) -> None:
    with pytest.raises(openai.BadRequestError):
        lamina.client().chat.completions.create(
            model="lamina-rag",
            messages=[
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ANSWER},
            ],
        )


def test_an_overlong_conversation_id_is_refused_in_openais_error_shape(lamina: Lamina) -> None:
    # The same ceiling as POST /v1/chat's conversation_id, checked before any work.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        lamina.client().chat.completions.create(
            model="lamina-rag",
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"lamina": {"conversation_id": "0" * 65}},
        )
    assert refused.value.status_code == 422
    assert refused.value.type == "invalid_request_error"
    assert lamina.simulator.requests() == []
