"""A model that answers with no text is never a complete answer.

A provider can return an empty completion: a reply of tool calls to a request that
offered none (a gateway failing over to a deployment that plays a scripted agent
reply, as the soak benchmark saw), an empty ``content``, a silent filter. Before, the
turn stored ``""`` as a complete answer and sent ``done`` after no delta (``POST
/v1/chat`` answered 200 with ``"answer": ""``). Now the answer is asked for once more;
a second empty reply fails the turn clearly: an SSE ``error`` event, or a problem
response, with code ``empty_answer`` and a correlation id, the question kept.

Lamina's real ``openai`` client talks to the simulator over loopback HTTP; rules plan
the questions (planner ``escalate``), so every model call here is an answer call.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from inferencing.simulator import ScriptedReply, ScriptedToolCall, SimulatorServer
from tests.e2e.conftest import PUBLIC_FACT, served_in_model_mode
from tests.support.sse import read_events

pytestmark = pytest.mark.slow

EMPLOYEE = {"X-Lamina-User": "ann", "X-Lamina-Groups": "alpha", "X-Lamina-Roles": "employee"}
QUESTION = "When does the cafeteria open?"
# What an agent's scripted reply looks like to an answer request: a call, no text.
TOOL_CALL = ScriptedReply(
    tool_calls=[ScriptedToolCall(name="servicedesk-create_ticket", arguments={"title": "x"})]
)
NO_TEXT = ScriptedReply(content="")


@pytest.fixture(scope="module")
def base_url(simulator: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_in_model_mode(
        simulator, tmp_path_factory, intelligence={"planner": "escalate"}
    ) as url:
        yield url


@pytest.fixture
def client(base_url: str, simulator: SimulatorServer) -> Iterator[httpx.Client]:
    simulator.reset()
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def _answer_requests(simulator: SimulatorServer) -> int:
    return sum(1 for r in simulator.requests() if r.path.endswith("/chat/completions"))


def _stored_reply(client: httpx.Client, conversation_id: str) -> dict[str, object]:
    conversation = client.get(f"/v1/conversations/{conversation_id}", headers=EMPLOYEE)
    user, reply = conversation.json()["messages"]
    assert user["content"] == QUESTION
    stored: dict[str, object] = reply
    return stored


def test_an_answer_without_text_is_asked_for_again(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    """The first reply is a tool call with no text: the stream carries the second."""
    simulator.script(TOOL_CALL, ScriptedReply(content=f"It opens early: {PUBLIC_FACT} [1]"))
    events = read_events(
        client, "/v1/chat/stream", json_body={"message": QUESTION}, headers=EMPLOYEE
    )
    names = [name for name, _ in events]
    assert names[-1] == "done", names
    answer = "".join(data["text"] for name, data in events if name == "delta")
    assert answer.startswith("It opens early")
    assert _answer_requests(simulator) == 2
    reply = _stored_reply(client, events[-1][1]["conversation_id"])
    assert reply["status"] == "complete" and reply["content"] == answer


def test_a_stream_whose_answers_stay_empty_ends_with_an_error_event(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(TOOL_CALL, NO_TEXT)
    events = read_events(
        client, "/v1/chat/stream", json_body={"message": QUESTION}, headers=EMPLOYEE
    )
    names = [name for name, _ in events]
    assert "done" not in names and "delta" not in names
    assert names[-1] == "error"
    error = events[-1][1]
    assert error["code"] == "empty_answer" and error["retryable"]
    assert error["correlation_id"]
    conversation_id = client.get("/v1/conversations", headers=EMPLOYEE).json()["items"][0]["id"]
    reply = _stored_reply(client, conversation_id)
    assert reply["status"] == "failed" and reply["content"] == ""


def test_a_chat_whose_answers_stay_empty_is_a_problem_not_a_success(
    client: httpx.Client, simulator: SimulatorServer
) -> None:
    simulator.script(NO_TEXT, TOOL_CALL)
    response = client.post("/v1/chat", json={"message": QUESTION}, headers=EMPLOYEE)
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["x-correlation-id"]
    assert response.json()["code"] == "empty_answer"
    assert _answer_requests(simulator) == 2
