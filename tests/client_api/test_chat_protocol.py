"""The Microsoft AI chat protocol (``POST /chat``, ``POST /chat/stream``) over real HTTP.

A real Lamina app on loopback in dev identity mode, a small corpus under access rules,
the model on the OpenAI-compatible simulator and the rules planner (so the thoughts are
stable). The shapes are pinned by snapshot files under ``snapshots/chat_protocol/``,
with ids, timestamps and correlation ids normalised; ``LAMINA_UPDATE_SNAPSHOTS=1``
writes them anew from the current responses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_api.app import create_app
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing

SNAPSHOTS = Path(__file__).parent / "snapshots" / "chat_protocol"
UPDATE = os.environ.get("LAMINA_UPDATE_SNAPSHOTS") == "1"

HANDBOOK = "# Leave\n\nEvery employee gets 27 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th of each month.\n"
QUESTION = "How many days of annual leave do I get?"
ANSWER = "You get 27 days of annual leave a year [1]."

# Values that differ from run to run, by the key that holds them.
_VOLATILE = {"session_state", "conversation_id", "message_id", "approval_id", "expires_at"}
_CORRELATION = re.compile(r"\(correlation id [^)]*\)")


@dataclass
class Lamina:
    base_url: str
    simulator: SimulatorServer

    def post(self, path: str, body: dict[str, Any], user: str = "ann") -> httpx.Response:
        return httpx.post(
            f"{self.base_url}{path}", json=body, headers=dev_headers(user), timeout=30
        )


@pytest.fixture(scope="module")
def lamina(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lamina]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with SimulatorServer() as simulator:
        settings = dev_settings(
            data,
            inferencing=simulated_inferencing(simulator),
            intelligence={"planner": "deterministic"},
        )
        with app_in_thread(create_app(settings)) as base:
            yield Lamina(base, simulator)


@pytest.fixture(autouse=True)
def fresh_simulator(lamina: Lamina) -> None:
    lamina.simulator.reset()


def request(question: str = QUESTION, session_state: str | None = None) -> dict[str, Any]:
    """A request as azure-search-openai-demo's frontend sends it."""
    return {
        "messages": [{"role": "user", "content": question}],
        "context": {
            "overrides": {
                "top": 3,
                "temperature": 0.3,
                "retrieval_mode": "hybrid",
                "semantic_ranker": True,
                "suggest_followup_questions": True,
            }
        },
        "session_state": session_state,
    }


def normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: f"<{k}>" if k in _VOLATILE and v is not None else normalised(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, str):
        return _CORRELATION.sub("(correlation id <id>)", value)
    return value


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    """Every line of the body, each of which must be one JSON object."""
    assert response.headers["content-type"] == "application/x-ndjson"
    text = response.text
    assert text.endswith("\n")
    return [json.loads(line) for line in text.removesuffix("\n").split("\n")]


def assert_matches_snapshot(name: str, content: str) -> None:
    path = SNAPSHOTS / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    assert path.exists(), f"no snapshot {path}: run with LAMINA_UPDATE_SNAPSHOTS=1"
    assert content == path.read_text()


def as_json(value: Any) -> str:
    return json.dumps(normalised(value), indent=2, sort_keys=True) + "\n"


def as_ndjson(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(normalised(line), sort_keys=True) + "\n" for line in lines)


def test_chat_answers_in_the_protocols_shape(lamina: Lamina) -> None:
    lamina.simulator.script(ScriptedReply(content=ANSWER))
    response = lamina.post("/chat", request())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": ANSWER}
    assert body["context"]["data_points"]["text"] == [
        "[1] handbook/leave.md: Every employee gets 27 days of annual leave a year."
    ]
    assert body["context"]["thoughts"][0]["title"] == "Plan"
    assert isinstance(body["session_state"], str)
    assert_matches_snapshot("chat.json", as_json(body))


def test_chat_stream_is_ndjson_in_the_protocols_shape(lamina: Lamina) -> None:
    lamina.simulator.script(ScriptedReply(content=ANSWER))
    response = lamina.post("/chat/stream", request())
    assert response.status_code == 200, response.text
    lines = ndjson(response)
    first, *middle, last = lines
    assert first["delta"] == {"role": "assistant"} and "data_points" in first["context"]
    assert "".join(line["delta"]["content"] for line in middle) == ANSWER
    assert [c["source"] for c in last["context"]["data_points"]["citations"]] == [
        "handbook/leave.md"
    ]
    assert first["session_state"] == last["session_state"]
    assert_matches_snapshot("chat_stream.ndjson", as_ndjson(lines))


def test_a_model_failure_mid_stream_ends_with_an_error_line(lamina: Lamina) -> None:
    lamina.simulator.script(
        ScriptedReply(content=ANSWER, fault=Fault(kind="stream_cut", after_chunks=2))
    )
    response = lamina.post("/chat/stream", request())
    assert response.status_code == 200
    lines = ndjson(response)
    # The plan and the search that ran come first, as in a stream that succeeds.
    assert lines[0]["context"]["thoughts"][0]["title"] == "Plan"
    assert set(lines[-1]) == {"error"} and "correlation id" in lines[-1]["error"]
    assert all("error" not in line for line in lines[:-1])
    assert_matches_snapshot("chat_stream_error.ndjson", as_ndjson(lines))


def test_session_state_continues_the_conversation(lamina: Lamina) -> None:
    lamina.simulator.script(ScriptedReply(content=ANSWER), ScriptedReply(content="Yes [1]."))
    first = lamina.post("/chat", request()).json()
    second = lamina.post(
        "/chat", request("Is that per year?", session_state=first["session_state"])
    ).json()
    assert second["session_state"] == first["session_state"]
    contents = [m.get("content") for m in lamina.simulator.requests()[-1].body["messages"]]
    assert QUESTION in contents and contents[-1] == "Is that per year?"
    # Someone else's conversation is not found, as any unknown one.
    other = lamina.post("/chat", request(session_state=first["session_state"]), user="bob")
    assert other.status_code == 404


def test_the_protocol_needs_an_identity_and_a_question(lamina: Lamina) -> None:
    anonymous = httpx.post(f"{lamina.base_url}/chat/stream", json=request(), timeout=10)
    assert anonymous.status_code == 401
    not_a_question = request()
    not_a_question["messages"].append({"role": "assistant", "content": "Hello"})
    assert lamina.post("/chat/stream", not_a_question).status_code == 422
    assert lamina.simulator.requests() == []


def test_an_overlong_session_state_is_an_invalid_request(lamina: Lamina) -> None:
    # The same ceiling as POST /v1/chat's conversation_id, checked before any work.
    for path in ("/chat", "/chat/stream"):
        refused = lamina.post(path, request(session_state="0" * 65))
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        [error] = refused.json()["errors"]
        assert error["loc"] == ["body", "session_state"]
        assert error["type"] == "string_too_long"
    assert lamina.simulator.requests() == []
