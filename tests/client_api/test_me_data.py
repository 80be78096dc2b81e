"""``GET`` and ``DELETE /v1/me/data`` on a real server: a person's data is exported, then
erased from every store, and the test reads each store the server used directly (the
SQLite files of its data directory, every key of its Redis) to find nothing of them.

The server runs on loopback with Redis-backed state (answer cache, approvals, usage,
rate limits), the real ``openai`` client against the scripted simulator, and the
sample high-risk tool ``servicedesk-create_ticket`` so a turn waits for an approval.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from client_api.app import create_app
from client_api.auth.api_keys import RedisApiKeyStore
from inferencing.gateway.metering import ERASED_USER
from inferencing.simulator import ScriptedReply, ScriptedToolCall, SimulatorServer
from tests.client_api.corpus import dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.redis_server import RedisServer, private_redis
from tests.support.simulator import simulated_inferencing
from tests.support.sse import read_events

ANN = "ann-0d9c41"
BOB = "bob-71e4aa"
ANN_LEAVE = "How many days of annual leave do I get? (ref ann-q-3141)"
ANN_TICKET_NOTE = "Screen cracked on my laptop, ref ann-q-2718"
ANN_TICKET = f"Please open a service-desk ticket. {ANN_TICKET_NOTE}"
BOB_LEAVE = "Who answers questions about leave? (ref bob-q-1618)"
ANN_TRACES = (ANN, "ann-q-3141", "ann-q-2718")
"""What must be found nowhere once Ann's data is erased (but in the audit log)."""

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th.\n"
LIMIT_PREFIX = "lamina:limits:"


def headers(user: str, roles: str = "employee") -> dict[str, str]:
    return {"X-Lamina-User": user, "X-Lamina-Roles": roles, "X-Lamina-Tenant": "contoso"}


ADMIN = headers("usage-admin", "Lamina.Admin")


@dataclass
class Deployment:
    base_url: str
    data: Path
    redis: RedisServer
    simulator: SimulatorServer


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with private_redis() as server, SimulatorServer() as simulator:
        settings = dev_settings(
            data,
            redis={"url": server.url, "command_timeout_s": 2.0, "connect_timeout_s": 2.0},
            answer_cache={"enabled": True, "backend": "redis"},
            tools={"approvals": {"backend": "redis"}},
            limits={"user_requests_per_minute": 1000, "user_tokens_per_day": 10_000_000},
            inferencing=simulated_inferencing(simulator),
        )
        with app_in_thread(create_app(settings)) as base:
            yield Deployment(base, data, server, simulator)


def search_then_answer(simulator: SimulatorServer, query: str, answer: str) -> None:
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="search_knowledge", arguments={"query": query})]
        ),
        ScriptedReply(content="I have what I need."),
        ScriptedReply(content=answer),
    )


def chat(client: httpx.Client, user: str, message: str) -> list[tuple[str, dict[str, Any]]]:
    return read_events(
        client, "/v1/chat/stream", json_body={"message": message}, headers=headers(user)
    )


def usage(client: httpx.Client, by: str) -> list[dict[str, Any]]:
    response = client.get("/v1/usage", params={"by": by, "since": "1d"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["rows"]
    return rows


# --- reading the stores directly ----------------------------------------------------------


def sqlite_rows(data: Path) -> dict[str, str]:
    """Every row of every table of every SQLite file in ``data``, as text, by file/table."""
    found: dict[str, str] = {}
    for path in sorted(data.glob("*.db")):
        with sqlite3.connect(path) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                rows = db.execute(f'SELECT * FROM "{table}"').fetchall()
                found[f"{path.name}/{table}"] = repr(rows)
    return found


def redis_keys(server: RedisServer) -> dict[str, str]:
    """Every key of the server's Redis with what it holds, as text."""
    client = redis.Redis.from_url(server.url)
    try:
        found: dict[str, str] = {}
        for raw in client.scan_iter("*"):
            key = raw.decode()
            kind = client.type(raw).decode()
            value: Any
            if kind == "string":
                value = client.get(raw)
            elif kind == "hash":
                value = client.hgetall(raw)
            elif kind == "zset":
                value = client.zrange(raw, 0, -1, withscores=True)
            elif kind == "set":
                value = client.smembers(raw)
            elif kind == "list":
                value = client.lrange(raw, 0, -1)
            else:
                value = f"<{kind}>"
            found[key] = repr(value)
        return found
    finally:
        client.close()


def mentions(text: str, traces: tuple[str, ...]) -> list[str]:
    return [trace for trace in traces if trace in text]


def ttl_ms(server: RedisServer, key: str) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.pttl(key))
    finally:
        client.close()


# --- the test ------------------------------------------------------------------------------


def test_a_person_exports_then_erases_their_data_and_nothing_of_them_is_left(
    deployment: Deployment,
) -> None:
    simulator = deployment.simulator
    with httpx.Client(base_url=deployment.base_url, timeout=30) as client:
        # Ann asks a question (conversation, answer cache, usage) ...
        simulator.reset()
        search_then_answer(simulator, ANN_LEAVE, "You get 25 days a year [1].")
        events = chat(client, ANN, ANN_LEAVE)
        done = events[-1]
        assert done[0] == "done", events
        assert done[1]["cache"]["status"] == "miss"
        # ... and asks for a high-risk ticket, which waits for an approval.
        simulator.script(
            ScriptedReply(
                tool_calls=[
                    ScriptedToolCall(
                        name="servicedesk-create_ticket",
                        arguments={"title": "Broken laptop screen", "description": ANN_TICKET_NOTE},
                    )
                ]
            )
        )
        paused = chat(client, ANN, ANN_TICKET)
        assert paused[-1][0] == "approval_required", paused
        # Bob asks too.
        search_then_answer(simulator, BOB_LEAVE, "HR answers leave questions [1].")
        assert chat(client, BOB, BOB_LEAVE)[-1][0] == "done"

        tenant_before = usage(client, "tenant")
        deployments_before = usage(client, "deployment")
        assert any(row["key"] == f"contoso/{ANN}" for row in usage(client, "user"))

        # The export shows Ann's data in every store, and nothing of Bob's.
        exported = client.get("/v1/me/data", headers=headers(ANN))
        assert exported.status_code == 200, exported.text
        body = exported.json()
        assert (body["tenant_id"], body["user_id"]) == ("contoso", ANN)
        stores = body["stores"]
        assert {"conversations", "answer_cache", "approvals", "usage"} <= set(stores)
        questions = [
            m["content"]
            for c in stores["conversations"]
            for m in c["messages"]
            if m["role"] == "user"
        ]
        assert sorted(questions) == sorted([ANN_LEAVE, ANN_TICKET])
        [cached] = stores["answer_cache"]
        assert cached["answer"] == "You get 25 days a year [1]."
        assert ANN_LEAVE in json.dumps(cached["plan"])
        [approval] = stores["approvals"]
        assert approval["status"] == "pending"
        assert approval["arguments"]["description"] == ANN_TICKET_NOTE
        assert sum(detail["calls"] for detail in stores["usage"]) >= 4
        assert "bob" not in json.dumps(body)

        # Ann erases her data.
        erased = client.delete("/v1/me/data", headers=headers(ANN))
        assert erased.status_code == 200, erased.text
        counts = erased.json()["erased"]
        assert counts["conversations"] == 2
        assert counts["answer_cache"] == 1
        assert counts["approvals"] == 1
        assert counts["usage"] == sum(detail["calls"] for detail in stores["usage"])

        after = client.get("/v1/me/data", headers=headers(ANN)).json()["stores"]
        assert all(not items for items in after.values()), after
        assert client.get("/v1/conversations", headers=headers(ANN)).json()["items"] == []

        # Totals for chargeback are unchanged; only the per-person row moved.
        assert usage(client, "tenant") == tenant_before
        assert usage(client, "deployment") == deployments_before
        users = {row["key"] for row in usage(client, "user")}
        assert f"contoso/{ANN}" not in users
        assert {f"contoso/{ERASED_USER}", f"contoso/{BOB}"} <= users

        # Bob's data is intact.
        bobs = client.get("/v1/me/data", headers=headers(BOB)).json()["stores"]
        assert [c["messages"][0]["content"] for c in bobs["conversations"]] == [BOB_LEAVE]
        assert len(bobs["answer_cache"]) == 1 and bobs["usage"]

    # Every SQLite file of the data directory: no row names Ann or holds her questions,
    # but the audit log, which is the append-only record of who asked what.
    rows = sqlite_rows(deployment.data)
    assert {"conversations.db/messages", "usage.db/usage", "audit.db/audit_log"} <= set(rows)
    leftovers = {name: mentions(text, ANN_TRACES) for name, text in rows.items()}
    assert {name for name, found in leftovers.items() if found} == {"audit.db/audit_log"}
    assert any(BOB in text for name, text in rows.items() if name != "audit.db/audit_log")
    with sqlite3.connect(deployment.data / "audit.db") as db:
        records = db.execute(
            "SELECT data FROM audit_log WHERE event = 'privacy.erase' AND user_id = ?", (ANN,)
        ).fetchall()
    [(data,)] = records
    assert json.loads(data)["counts"] == counts
    assert mentions(data, ANN_TRACES[1:]) == []

    # Every key of the Redis: none names Ann or holds her questions, but the rate-limit
    # counters, which hold only numbers and expire with their window.
    keys = redis_keys(deployment.redis)
    assert any(key.startswith("lamina:answer-cache:") for key in keys)
    assert any(key.startswith("lamina:usage:") for key in keys)
    left = {key for key, held in keys.items() if mentions(key + held, ANN_TRACES)}
    assert all(key.startswith(LIMIT_PREFIX) for key in left), sorted(left)
    for key in left:
        assert mentions(keys[key], ANN_TRACES) == [], key
        assert ttl_ms(deployment.redis, key) > 0, key
    assert any(mentions(key + held, (BOB, "bob-q-1618")) for key, held in keys.items())


def test_a_service_caller_may_not_export_or_erase(deployment: Deployment) -> None:
    async def issue() -> str:
        client = redis.asyncio.Redis.from_url(deployment.redis.url)
        try:
            issued = await RedisApiKeyStore(client).create(
                "contoso", "nightly-report", roles=["Lamina.User"]
            )
            return issued.key
        finally:
            await client.aclose()

    key = asyncio.run(issue())
    with httpx.Client(base_url=deployment.base_url, timeout=30) as client:
        for method in ("GET", "DELETE"):
            response = client.request(method, "/v1/me/data", headers={"api-key": key})
            assert response.status_code == 403, response.text
            assert response.json()["code"] == "person_required"


def test_export_and_erasure_need_a_caller(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.base_url, timeout=30) as client:
        assert client.get("/v1/me/data").status_code == 401
        assert client.delete("/v1/me/data").status_code == 401
