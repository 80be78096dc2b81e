"""The service in model mode: the real ``openai`` client inside Lamina talks to the
OpenAI-compatible simulator over loopback HTTP, and the API is served by uvicorn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inferencing.simulator import Fault, ScriptedReply, ScriptedToolCall, SimulatorServer
from tests.e2e.conftest import served_in_model_mode
from tests.support.sse import read_events

pytestmark = pytest.mark.slow

EMPLOYEE = {"X-Lamina-User": "ann", "X-Lamina-Groups": "alpha", "X-Lamina-Roles": "employee"}


@pytest.fixture(scope="module")
def base_url(simulator: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One attempt a call: the scripted failures below must reach the caller.
    with served_in_model_mode(simulator, tmp_path_factory) as url:
        yield url


@pytest.fixture
def client(base_url: str, simulator: SimulatorServer) -> Iterator[httpx.Client]:
    simulator.reset()
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def _chat_requests(simulator: SimulatorServer) -> list[dict[str, object]]:
    return [r.body for r in simulator.requests() if r.path.endswith("/chat/completions")]


def _tool_outcome(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The outcome of the (one) tool step in a turn's events."""
    ended = next(d for n, d in events if n == "step" and d["outcome"] and d["step"]["tool"])
    outcome: dict[str, Any] = ended["outcome"]
    return outcome


def test_the_model_plans_a_tool_call_and_answers_from_its_result(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="lookup_employee", arguments={"query": "Lee"})]
        ),
        ScriptedReply(content="I have what I need."),  # planning again, seeing the result
        ScriptedReply(content="Lee Gu is on extension 4202."),
    )
    events = read_events(
        client,
        "/v1/chat/stream",
        json_body={"message": "What is Lee's phone extension?"},
        headers=EMPLOYEE,
    )
    names = [name for name, _ in events]
    assert names[-1] == "done"
    plan = events[0][1]["plan"]
    assert plan["planner"] == "model:openai:gpt-sim"
    assert [s["kind"] for s in plan["steps"]] == ["call_tool", "answer"]
    assert _tool_outcome(events)["status"] == "ok"
    answer = "".join(d["text"] for n, d in events if n == "delta")
    assert answer == "Lee Gu is on extension 4202."

    planning, replanning, answering = _chat_requests(simulator)
    offered = {t["function"]["name"] for t in planning["tools"]}  # type: ignore[index]
    assert {"search_knowledge", "lookup_employee"} <= offered
    # Asked again, the model sees its call's result and may chain another.
    shown = [m for m in replanning["messages"] if m["role"] == "tool"]  # type: ignore[index]
    assert "4202" in shown[0]["content"]
    # The round trip: the answer request carries the model's call and the tool's real result.
    messages = answering["messages"]  # type: ignore[index]
    call = next(m for m in messages if m.get("tool_calls"))
    result = next(m for m in messages if m["role"] == "tool")
    assert result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert json.loads(result["content"])[0]["phone_ext"] == "4202"
    assert answering["stream"] is True


def test_a_caller_without_the_role_is_refused_the_tool(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="lookup_employee", arguments={"query": "Lee"})]
        ),
        ScriptedReply(content="I cannot use that."),  # planning again, seeing the refusal
        ScriptedReply(content="I cannot look that up for you."),
    )
    guest = {"X-Lamina-User": "gus", "X-Lamina-Groups": "alpha"}
    events = read_events(
        client, "/v1/chat/stream", json_body={"message": "Lee's extension?"}, headers=guest
    )
    planning, _, answering = _chat_requests(simulator)
    offered = {t["function"]["name"] for t in planning["tools"]}  # type: ignore[index]
    assert "lookup_employee" not in offered
    assert _tool_outcome(events)["status"] == "refused"
    assert "4202" not in json.dumps(answering)


def test_a_stream_cut_mid_answer_is_a_typed_sse_error_and_the_turn_is_kept(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(content="I will search."),  # planning: no function call
        ScriptedReply(
            content="The cafeteria opens at half past seven on weekdays.",
            fault=Fault(kind="stream_cut", after_chunks=3),
        ),
    )
    events = read_events(
        client,
        "/v1/chat/stream",
        json_body={"message": "When does the cafeteria open?"},
        headers=EMPLOYEE,
    )
    names = [name for name, _ in events]
    assert "delta" in names
    assert names[-1] == "error"
    assert "done" not in names
    error = events[-1][1]
    assert error["code"] == "model_unavailable"
    assert error["correlation_id"]
    assert "Traceback" not in error["message"]

    conversation_id = client.get("/v1/conversations", headers=EMPLOYEE).json()["items"][0]["id"]
    messages = client.get(f"/v1/conversations/{conversation_id}", headers=EMPLOYEE).json()[
        "messages"
    ]
    assert messages[0]["content"] == "When does the cafeteria open?"
    assert messages[1]["status"] == "interrupted"
    assert messages[1]["content"] == "".join(d["text"] for n, d in events if n == "delta")


def test_provider_failure_on_json_route_is_a_502_problem(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(
        ScriptedReply(content="plan"),
        ScriptedReply(fault=Fault(kind="unavailable")),
    )
    response = client.post("/v1/chat", json={"message": "cafeteria hours"}, headers=EMPLOYEE)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert "503" not in response.text  # no raw provider error reaches the user


def test_openapi_schema_documents_every_route(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert {
        "/v1/chat",
        "/v1/chat/stream",
        "/v1/conversations",
        "/v1/conversations/{conversation_id}",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/usage",
        "/healthz",
        "/readyz",
    } <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    stream = schema["paths"]["/v1/chat/stream"]["post"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert "ChatAnswer" in schema["components"]["schemas"]
