"""``GET /v1/conversations/{id}/turns/{turn}/explain`` and ``POST …/feedback`` over real
HTTP: the explanation is the plan the stream showed, with the steps, sources, prompt and
trace of that turn, for its owner only; a rating is audited and counted once per answer
and change.

A real Lamina app on loopback in this process (its metrics reach the session's in-memory
reader), a small corpus under access rules, the extractive answerer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from client_api.app import create_app
from client_api.problems import CORRELATION_HEADER
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.telemetry import MetricsProbe

HANDBOOK = "# Leave\n\nEvery employee gets 27 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th; annual leave is paid as usual.\n"
QUESTION = "How many days of annual leave do I get?"


@pytest.fixture(scope="module")
def lamina(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with app_in_thread(create_app(dev_settings(data))) as base:
        yield base


def streamed_turn(base: str, user: str) -> tuple[list[tuple[str, Any]], str]:
    """The events of one streamed turn, and its correlation id."""
    with (
        httpx.Client(base_url=base, timeout=30) as client,
        connect_sse(
            client, "POST", "/v1/chat/stream", json={"message": QUESTION}, headers=dev_headers(user)
        ) as source,
    ):
        assert source.response.status_code == 200
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse() if e.data]
        return events, source.response.headers[CORRELATION_HEADER]


def explain(base: str, user: str, conversation: str, turn: str) -> httpx.Response:
    return httpx.get(
        f"{base}/v1/conversations/{conversation}/turns/{turn}/explain",
        headers=dev_headers(user),
        timeout=10,
    )


def rate(base: str, user: str, conversation: str, turn: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/conversations/{conversation}/turns/{turn}/feedback",
        json=body,
        headers=dev_headers(user),
        timeout=10,
    )


def test_explain_returns_the_plan_the_stream_showed(lamina: str) -> None:
    events, correlation = streamed_turn(lamina, "ann")
    plans = [data["plan"] for kind, data in events if kind == "plan"]
    [done] = [data for kind, data in events if kind == "done"]
    [citations] = [data["citations"] for kind, data in events if kind == "citations"]

    response = explain(lamina, "ann", done["conversation_id"], done["message_id"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["plan"] == plans[-1]
    assert (body["turn_id"], body["conversation_id"]) == (
        done["message_id"],
        done["conversation_id"],
    )
    assert (body["status"], body["question"], body["error"]) == ("complete", QUESTION, None)
    assert body["trace_id"] == correlation
    assert [s["step_id"] for s in body["steps"]] == [s["id"] for s in plans[-1]["steps"]]
    assert all(s["status"] == "ok" and s["duration_ms"] >= 0 for s in body["steps"])
    cited = [s for s in body["sources"] if s["cited"]]
    assert [(s["chunk_id"], s["ref"]) for s in cited] == [
        (c["chunk_id"], c["ref"]) for c in citations
    ]
    assert all(isinstance(s["score"], float) and s["index"] for s in body["sources"])
    # Ann is not in finance: the payroll page matched, but she learns neither which
    # page nor even that one was withheld (a count would let her probe query by query).
    assert body["retrieval"] == {
        "searches": 1,
        "returned": len(body["sources"]),
        "indexes": [body["sources"][0]["index"]],
    }
    assert "payroll" not in response.text
    assert all(s["source"].startswith("handbook/") for s in body["sources"])
    assert body["prompts"] == {"answer": "grounded_answer@v1"}
    [call] = body["model_calls"]
    # As the gateway routed it.
    assert (call["purpose"], call["finish_reason"]) == ("answer", "stop")
    assert call["deployment"] and call["model"]
    assert [p["check"] for p in body["policy"]] == ["input_safety", "output_safety"]


def test_another_users_or_an_unknown_turn_is_not_found(lamina: str) -> None:
    events, _ = streamed_turn(lamina, "ann")
    [done] = [data for kind, data in events if kind == "done"]
    conversation, turn = done["conversation_id"], done["message_id"]
    [question] = [
        m["id"]
        for m in httpx.get(
            f"{lamina}/v1/conversations/{conversation}", headers=dev_headers("ann"), timeout=10
        ).json()["messages"]
        if m["role"] == "user"
    ]

    for user, conversation_id, turn_id in [
        ("bob", conversation, turn),  # someone else's answer
        ("ann", conversation, "0" * 32),
        ("ann", "0" * 32, turn),
        ("ann", conversation, question),  # a question is not an answer
    ]:
        response = explain(lamina, user, conversation_id, turn_id)
        assert response.status_code == 404, (user, conversation_id, turn_id)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert rate(lamina, user, conversation_id, turn_id, rating="negative").status_code == 404


def test_a_rating_is_audited_and_counted_under_the_answers_prompt_once_per_change(
    lamina: str, metrics: MetricsProbe
) -> None:
    events, _ = streamed_turn(lamina, "cy")
    [done] = [data for kind, data in events if kind == "done"]
    conversation, turn = done["conversation_id"], done["message_id"]

    rated = rate(lamina, "cy", conversation, turn, rating="negative", comment="Too short")
    assert rated.status_code == 204, rated.text
    for _ in range(3):  # repeated: stored once, counted once
        assert rate(lamina, "cy", conversation, turn, rating="positive").status_code == 204
    prompt = {"lamina.prompt.id": "grounded_answer@v1"}
    for rating in ("negative", "positive"):
        counted = {"lamina.feedback.rating": rating, **prompt}
        assert metrics.amount("lamina.quality.feedback", **counted) == 1

    audit = httpx.get(
        f"{lamina}/v1/audit",
        params={"event": "chat.feedback", "user_id": "cy"},
        headers=dev_headers("auditor", roles="Lamina.Auditor"),
        timeout=10,
    )
    assert audit.status_code == 200, audit.text
    recorded = [e["data"] for e in audit.json()["entries"]]
    assert [(d["message_id"], d["rating"], d["comment"], d["previous"]) for d in recorded] == [
        (turn, "negative", "Too short", None),
        (turn, "positive", None, "negative"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"rating": "meh"},
        {"rating": "positive", "comment": "x" * 1001},
        {"rating": "positive", "stars": 5},
        {},
    ],
)
def test_a_malformed_rating_is_refused(lamina: str, body: dict[str, Any]) -> None:
    events, _ = streamed_turn(lamina, "dee")
    [done] = [data for kind, data in events if kind == "done"]
    response = rate(lamina, "dee", done["conversation_id"], done["message_id"], **body)
    assert response.status_code == 422
