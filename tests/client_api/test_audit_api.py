"""``GET /v1/audit`` and ``/v1/audit/verify`` on a real server: only an auditor reads the
log, only their own tenant's, and what people do through the API is in it.

A real Lamina app on loopback (dev identity headers), its model the OpenAI-compatible
simulator; one job at a time, so that a task waiting on a hung model call keeps an upload
queued until it is cancelled.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_api.app import create_app
from client_api.auth.permissions import ADMIN_ROLE, AUDITOR_ROLE, CONTENT_OWNER_ROLE, USER_ROLE
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from intelligence.contracts import AuditRecord
from intelligence.stores.sqlite_audit import SqliteAuditLog
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.lifecycle import opened
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th.\n"
AUDITOR = dev_headers("audrey", roles=AUDITOR_ROLE)
FABRIKAM_AUDITOR = dev_headers("fay", roles=AUDITOR_ROLE, tenant="fabrikam")
NOW = datetime.now(UTC)


@dataclass
class Served:
    base_url: str
    data: Path
    simulator: SimulatorServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with SimulatorServer() as simulator:
        settings = dev_settings(
            data,
            inferencing=simulated_inferencing(simulator),
            intelligence={"planner": "deterministic"},
            jobs={"concurrency": 1, "poll_interval_s": 0.1},
        )
        with app_in_thread(create_app(settings)) as base:
            yield Served(base, data, simulator)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        yield c


def entries(client: httpx.Client, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/audit", params={"limit": 1000, **params}, headers=headers)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["entries"]
    return found


def chat(client: httpx.Client, simulator: SimulatorServer, headers: dict[str, str]) -> str:
    simulator.reset()
    simulator.script(ScriptedReply(content="Every employee gets 25 days."))
    answer = client.post("/v1/chat", json={"message": "How many leave days?"}, headers=headers)
    assert answer.status_code == 200, answer.text
    conversation_id: str = answer.json()["conversation_id"]
    return conversation_id


# --- who may read it ---------------------------------------------------------------------------


@pytest.mark.parametrize("roles", [ADMIN_ROLE, USER_ROLE, f"{ADMIN_ROLE},{USER_ROLE}"])
def test_without_the_auditor_role_the_log_is_forbidden(client: httpx.Client, roles: str) -> None:
    for path in ("/v1/audit", "/v1/audit/verify"):
        refused = client.get(path, headers=dev_headers("adam", roles=roles))
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["missing_permission"] == "audit.read"


def test_an_auditor_reads_and_verifies_the_log(client: httpx.Client) -> None:
    listed = client.get("/v1/audit", headers=AUDITOR)
    assert listed.status_code == 200, listed.text
    assert listed.json()["tenant_id"] == "contoso"
    verified = client.get("/v1/audit/verify", headers=AUDITOR)
    assert verified.status_code == 200, verified.text
    assert verified.json()["intact"] is True


# --- what is in it -------------------------------------------------------------------------------


def test_a_deleted_conversation_is_recorded_for_its_tenants_auditor_only(
    client: httpx.Client, served: Served
) -> None:
    alice = dev_headers("alice", roles=USER_ROLE)
    conversation = chat(client, served.simulator, alice)
    deleted = client.delete(f"/v1/conversations/{conversation}", headers=alice)
    assert deleted.status_code == 204
    chat(client, served.simulator, dev_headers("fred", roles=USER_ROLE, tenant="fabrikam"))

    contoso = entries(client, AUDITOR)
    turns = [e for e in contoso if e["event"] == "chat.turn"]
    assert any(e["data"]["conversation_id"] == conversation for e in turns)
    [deletion] = [e for e in contoso if e["event"] == "conversation.deleted"]
    assert (deletion["user_id"], deletion["data"]) == ("alice", {"conversation_id": conversation})
    assert deletion["correlation_id"] == deleted.headers["X-Correlation-ID"]
    assert {"fred"} & {e["user_id"] for e in contoso} == set()
    assert [e["seq"] for e in contoso] == list(range(1, len(contoso) + 1))
    assert all(later["prev_hash"] == earlier["hash"] for earlier, later in pairwise(contoso))

    fabrikam = entries(client, FABRIKAM_AUDITOR)
    assert {e["user_id"] for e in fabrikam} == {"fred"}
    assert fabrikam[0]["seq"] == 1  # its own chain
    assert entries(client, AUDITOR, event="conversation.") == [deletion]


def test_uploads_and_cancellations_are_recorded(client: httpx.Client, served: Served) -> None:
    owner = dev_headers("olga", roles=CONTENT_OWNER_ROLE)
    served.simulator.reset()
    served.simulator.script(ScriptedReply(fault=Fault(kind="timeout", hang_s=60)))
    task = client.post("/v1/jobs/tasks", json={"message": "Write the report"}, headers=owner)
    assert task.status_code == 202, task.text
    deadline = time.monotonic() + 30
    while not served.simulator.requests():  # the one job slot is taken now
        assert time.monotonic() < deadline, "the task never called the model"
        time.sleep(0.05)
    upload = client.post(
        "/v1/jobs/ingest",
        files=[("files", ("notes/trip.md", b"# Trip\n\nBy train.\n", "text/markdown"))],
        headers=owner,
    )
    assert upload.status_code == 202, upload.text
    for accepted in (upload, task):
        cancelled = client.post(f"{accepted.headers['Location']}/cancel", headers=owner)
        assert cancelled.status_code == 202, cancelled.text

    recorded = {e["event"]: e for e in entries(client, AUDITOR, user_id="olga")}
    assert recorded["ingest.submitted"]["data"] == {
        "job_id": upload.json()["id"],
        "files": ["notes/trip.md"],
        "acl": "private",
        "bytes": len(b"# Trip\n\nBy train.\n"),
    }
    assert recorded["ingest.cancelled"]["data"] == {"job_id": upload.json()["id"]}
    assert recorded["task.cancelled"]["data"] == {"job_id": task.json()["id"]}


# --- queries -------------------------------------------------------------------------------------


def test_pages_follow_next_after_seq(client: httpx.Client, served: Served) -> None:
    chat(client, served.simulator, dev_headers("paula", roles=USER_ROLE))
    everything = entries(client, AUDITOR)
    seen: list[int] = []
    after = 0
    while True:
        page = client.get("/v1/audit", params={"after_seq": after, "limit": 2}, headers=AUDITOR)
        assert page.status_code == 200, page.text
        seen += [e["seq"] for e in page.json()["entries"]]
        after = page.json()["next_after_seq"]
        if after is None:
            break
    assert seen == [e["seq"] for e in everything] and len(seen) >= 2


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"since": "last tuesday"}, "since must be a span ago"),
        ({"until": "soon"}, "until must be a span ago"),
        ({"since": "9999999d"}, "since '9999999d' is outside the calendar"),
        ({"since": "99999999999999d"}, "since '99999999999999d' is outside the calendar"),
        # In range as written, out of range in UTC, which is how the stores compare it.
        ({"since": "0001-01-01T00:00:00+01:00"}, "outside the calendar"),
        ({"until": "9999-12-31T23:59:59-01:00"}, "until '9999-12-31T23:59:59-01:00' is outside"),
        ({"since": "2025-03-02", "until": "2025-03-01"}, "since must be before until"),
        ({"event": "."}, "event must be"),
        ({"limit": 0}, None),
        ({"after_seq": -1}, None),
        ({"limit": 1001}, None),
    ],
)
def test_bad_parameters_are_422_problems(
    client: httpx.Client, params: dict[str, Any], detail: str | None
) -> None:
    refused = client.get("/v1/audit", params=params, headers=AUDITOR)
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    if detail is not None:
        assert detail in refused.json()["detail"]


def test_the_tenant_is_never_a_parameter(client: httpx.Client) -> None:
    mine = entries(client, FABRIKAM_AUDITOR, tenant_id="contoso", tenant="contoso")
    assert {e["user_id"] for e in mine} <= {"fred"}


# --- tamper evidence ------------------------------------------------------------------------


def test_verify_names_the_first_entry_modified_in_the_file(
    client: httpx.Client, served: Served
) -> None:
    async def append_elsewhere() -> None:
        # Another process (as `lamina keys` does) appends to the server's log file.
        async with opened(SqliteAuditLog(served.data / "audit.db")) as log:
            for n in range(3):
                await log.append(
                    AuditRecord("admin.key_created", "northwind", "cli:ops", None, {"n": n}, NOW)
                )

    asyncio.run(append_elsewhere())
    auditor = dev_headers("nina", roles=AUDITOR_ROLE, tenant="northwind")
    assert client.get("/v1/audit/verify", headers=auditor).json()["intact"] is True
    with closing(sqlite3.connect(served.data / "audit.db")) as db, db:
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute(
            "UPDATE audit_log SET data = '{\"n\":7}' WHERE tenant_id = 'northwind' AND seq = 2"
        )
    result = client.get("/v1/audit/verify", headers=auditor).json()
    assert (result["intact"], result["first_bad_seq"], result["entries"]) == (False, 2, 2)
    assert "modified" in result["problem"]
    # Other tenants' chains are untouched.
    assert client.get("/v1/audit/verify", headers=AUDITOR).json()["intact"] is True
