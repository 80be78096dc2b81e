"""The Idempotency-Key header over real HTTP: replayed answers, a reused key refused,
a turn running elsewhere answered with 409, and malformed keys refused.

A real Lamina app on loopback, a small corpus, the extractive answerer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from client_api.app import create_app
from intelligence.contracts import NewTurn, Principal
from intelligence.idempotency import request_hash
from intelligence.stores.sqlite import SqliteConversationStore
from tests.client_api.corpus import dev_settings, ingest_corpus
from tests.support.processes import app_in_thread

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th.\n"
QUESTION = "How many days of annual leave do I get?"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)


@pytest.fixture(scope="module")
def lamina(data: Path) -> Iterator[str]:
    with app_in_thread(create_app(dev_settings(data))) as base:
        yield base


def headers(user: str, key: str | None = None) -> dict[str, str]:
    found = {"X-Lamina-User": user}
    if key is not None:
        found["Idempotency-Key"] = key
    return found


def chat(base: str, user: str, key: str | None, message: str = QUESTION) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat", json={"message": message}, headers=headers(user, key), timeout=30
    )


def conversations(base: str, user: str) -> list[dict[str, str]]:
    items: list[dict[str, str]] = httpx.get(
        f"{base}/v1/conversations", headers=headers(user), timeout=10
    ).json()["items"]
    return items


def test_a_repeated_request_replays_the_stored_answer(lamina: str) -> None:
    first = chat(lamina, "ann", "a2c1")
    assert first.status_code == 200, first.text
    assert first.headers["X-Lamina-Idempotency"] == "new"
    again = chat(lamina, "ann", "a2c1")
    assert again.status_code == 200
    assert again.headers["X-Lamina-Idempotency"] == "replayed"
    assert again.json()["answer"] == first.json()["answer"]
    assert again.json()["message_id"] == first.json()["message_id"]
    assert again.json()["citations"] == first.json()["citations"]

    # The same turn, asked for as a stream: the stored answer, as events.
    with (
        httpx.Client(base_url=lamina, timeout=30) as client,
        connect_sse(
            client,
            "POST",
            "/v1/chat/stream",
            json={"message": QUESTION},
            headers=headers("ann", "a2c1"),
        ) as source,
    ):
        assert source.response.headers["X-Lamina-Idempotency"] == "replayed"
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse() if e.data]
    assert "".join(d["text"] for kind, d in events if kind == "delta") == first.json()["answer"]
    assert events[-1][0] == "done"
    assert events[-1][1]["message_id"] == first.json()["message_id"]
    assert len(conversations(lamina, "ann")) == 1


def test_a_key_sent_with_another_request_is_a_422_and_stores_nothing(lamina: str) -> None:
    assert chat(lamina, "bea", "k-bea").status_code == 200
    reused = chat(lamina, "bea", "k-bea", message="Where is the payroll kept?")
    assert reused.status_code == 422
    assert reused.headers["content-type"].startswith("application/problem+json")
    assert "different request" in reused.json()["detail"]
    [conversation] = conversations(lamina, "bea")
    detail = httpx.get(
        f"{lamina}/v1/conversations/{conversation['id']}", headers=headers("bea"), timeout=10
    ).json()
    assert [m["content"] for m in detail["messages"] if m["role"] == "user"] == [QUESTION]


def test_a_turn_running_elsewhere_is_a_409_with_retry_after(lamina: str, data: Path) -> None:
    async def start_elsewhere() -> None:
        # Another replica (a second store on the same database) started this turn and is
        # still answering: its lease runs for another minute.
        store = SqliteConversationStore(data / "conversations.db")
        await store.open()
        try:
            await store.begin_turn(
                Principal("contoso", "cai"),
                NewTurn(
                    question=QUESTION,
                    conversation_id=None,
                    title="t",
                    lease_until=datetime.now(UTC) + timedelta(minutes=1),
                    idempotency_key="k-cai",
                    request_hash=request_hash(QUESTION, None),
                ),
            )
        finally:
            await store.close()

    asyncio.run(start_elsewhere())
    busy = chat(lamina, "cai", "k-cai")
    assert busy.status_code == 409
    assert busy.headers["Retry-After"] == "2"
    assert busy.json()["code"] == "turn_in_progress"


@pytest.mark.parametrize("key", ["", "has space", "x" * 256])
def test_a_malformed_key_is_refused(lamina: str, key: str) -> None:
    response = chat(lamina, "dee", key)
    assert response.status_code == 422
    assert conversations(lamina, "dee") == []
