"""Jobs over real HTTP: uploads ingested in the background and then answered from,
agent tasks, polling, cancellation, owner scoping, permissions and the upload cap.

A real Lamina app on loopback (dev identity headers), the extractive answerer; the
cancellation of a running task uses the OpenAI-compatible simulator, whose scripted
fault keeps the model call open until the task is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_api.app import create_app
from client_api.auth.permissions import ROLE_PERMISSIONS
from client_api.settings import LaminaSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th of each month.\n"
REMOTE = (
    "# Remote work\n\nStaff of the remote pilot may work from the lighthouse office "
    "on Fridays, with their manager's consent.\n"
)
ACL = b"""
tenant: contoso
rules:
  - match: "policies/**"
    groups: [pilot]
"""
MAX_UPLOAD = 20_000
CONTENT_OWNER = "Lamina.ContentOwner"
READER = "Lamina.Reader"


OWNER = dev_headers("olga", roles=CONTENT_OWNER)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)


@pytest.fixture(scope="module")
def lamina(data: Path) -> Iterator[str]:
    roles = {role: [p.value for p in granted] for role, granted in ROLE_PERMISSIONS.items()}
    settings = LaminaSettings(
        data_dir=data,
        log_level="WARNING",
        auth={"mode": "dev", "role_permissions": {**roles, READER: ["conversations"]}},
        jobs={"max_upload_bytes": MAX_UPLOAD, "lease_s": 3, "poll_interval_s": 0.1},
    )
    with app_in_thread(create_app(settings)) as base:
        yield base


@pytest.fixture
def client(lamina: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lamina, timeout=30) as c:
        yield c


def poll(client: httpx.Client, location: str, hdrs: dict[str, str]) -> dict[str, Any]:
    """GET the job until it has ended; its last state."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = client.get(location, headers=hdrs)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{location} did not end within 30 s")


def upload(
    client: httpx.Client,
    files: list[tuple[str, bytes]],
    acl: bytes | None = ACL,
    hdrs: dict[str, str] = OWNER,
) -> httpx.Response:
    parts: list[tuple[str, tuple[str, bytes, str]]] = [
        ("files", (name, content, "text/markdown")) for name, content in files
    ]
    if acl is not None:
        parts.append(("acl", ("acl.yaml", acl, "application/yaml")))
    return client.post("/v1/jobs/ingest", files=parts, headers=hdrs)


def sources(answer: dict[str, Any]) -> set[str]:
    return {citation["source"] for citation in answer["citations"]}


# --- ingestion ---------------------------------------------------------------------------


def test_an_upload_is_accepted_ingested_and_then_answered_from_for_those_the_acl_allows(
    client: httpx.Client, data: Path
) -> None:
    accepted = upload(client, [("policies/remote.md", REMOTE.encode())])
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert accepted.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["kind"], job["input"]) == (
        "ingest",
        {"files": ["policies/remote.md"], "acl": "uploaded"},
    )
    assert job["status"] in ("queued", "running")

    done = poll(client, accepted.headers["Location"], OWNER)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0
    assert done["result"] == {
        "files_seen": 1,
        "files_indexed": 1,
        "chunks_indexed": done["result"]["chunks_indexed"],
        "skipped": [],
        "files_unchanged": 0,
        "access_updated": 0,
        "files_removed": 0,
    }
    assert done["result"]["chunks_indexed"] >= 1
    assert not (data / "uploads" / job["id"]).exists()  # the files are gone with the job

    question = {"message": "Who may work from the lighthouse office on Fridays?"}
    pilot = client.post("/v1/chat", json=question, headers=dev_headers("pia", groups="pilot"))
    assert pilot.status_code == 200, pilot.text
    # Cited from the uploader's own namespace of the index.
    assert "upload://olga/policies/remote.md" in sources(pilot.json())
    assert "lighthouse office" in pilot.json()["answer"]
    outsider = client.post("/v1/chat", json=question, headers=dev_headers("oscar", groups="sales"))
    assert outsider.status_code == 200
    assert "upload://olga/policies/remote.md" not in sources(outsider.json())
    assert "lighthouse" not in outsider.json()["answer"]


def test_an_acl_granting_access_in_another_tenant_is_refused(client: httpx.Client) -> None:
    foreign = b"tenant: fabrikam\nrules:\n  - match: '**'\n    public: true\n"
    response = upload(client, [("policies/x.md", b"# X\n\nText.")], acl=foreign)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "invalid_upload"
    assert "fabrikam" in response.json()["detail"]


def test_a_file_name_climbing_out_of_the_upload_is_refused(client: httpx.Client) -> None:
    response = upload(client, [("../../etc/cron.d/x", b"boom")])
    assert response.status_code == 422
    assert "not a usable file name" in response.json()["detail"]


def test_an_oversized_upload_is_refused_with_413(client: httpx.Client) -> None:
    over_the_job_cap = upload(client, [("big.md", b"a " * MAX_UPLOAD)])
    assert over_the_job_cap.status_code == 413
    assert "LAMINA_JOBS__MAX_UPLOAD_BYTES" in over_the_job_cap.json()["detail"]
    far_over = upload(client, [("huge.md", b"a" * (2 * 1024 * 1024))])
    assert far_over.status_code == 413
    assert "LAMINA_JOBS__MAX_UPLOAD_BYTES" in far_over.json()["detail"]
    listed = client.get("/v1/jobs", headers=OWNER).json()["items"]
    assert not any(set(job["input"]["files"]) & {"big.md", "huge.md"} for job in listed)


@pytest.mark.parametrize("roles", ["", "Lamina.User", READER])
def test_uploading_needs_the_ingest_permission(client: httpx.Client, roles: str) -> None:
    response = upload(client, [("policies/x.md", b"# X")], hdrs=dev_headers("uma", roles=roles))
    assert response.status_code == 403
    assert response.json()["missing_permission"] == "ingest"


# --- agent tasks --------------------------------------------------------------------------


def test_an_agent_task_runs_in_the_background_and_its_answer_is_kept(
    client: httpx.Client,
) -> None:
    ann = dev_headers("ann")
    accepted = client.post(
        "/v1/jobs/tasks", json={"message": "How many days of annual leave?"}, headers=ann
    )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["kind"] == "agent_task"
    done = poll(client, accepted.headers["Location"], ann)
    assert done["status"] == "succeeded", done["error"]
    answer = done["result"]
    assert "25 days" in answer["answer"]
    assert "handbook/leave.md" in sources(answer)
    stored = client.get(f"/v1/conversations/{answer['conversation_id']}", headers=ann).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]

    follow_up = client.post(
        "/v1/jobs/tasks",
        json={"message": "And when are salaries paid?", "conversation_id": "not-mine"},
        headers=ann,
    )
    assert follow_up.status_code == 404


def test_a_task_needs_the_chat_permission(client: httpx.Client) -> None:
    reader = dev_headers("rae", roles=READER)  # may read conversations, not chat
    response = client.post("/v1/jobs/tasks", json={"message": "Hi"}, headers=reader)
    assert response.status_code == 403
    assert response.json()["missing_permission"] == "chat"


# --- owners, cancellation ------------------------------------------------------------------


def test_a_job_is_its_owners_alone(client: httpx.Client) -> None:
    ann, bob = dev_headers("ann-2"), dev_headers("bob-2")
    accepted = client.post("/v1/jobs/tasks", json={"message": "Leave days?"}, headers=ann)
    location = accepted.headers["Location"]
    assert client.get(location, headers=bob).status_code == 404
    assert client.post(f"{location}/cancel", headers=bob).status_code == 404
    other_tenant = dev_headers("ann-2", tenant="fabrikam")
    assert client.get(location, headers=other_tenant).status_code == 404
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    mine = client.get("/v1/jobs", headers=ann).json()["items"]
    assert [job["id"] for job in mine] == [accepted.json()["id"]]
    poll(client, location, ann)
    assert client.get("/v1/jobs/no-such-job", headers=ann).status_code == 404
    assert client.get(location).status_code == 401


def test_cancelling_a_job_that_has_ended_is_409(client: httpx.Client) -> None:
    cy = dev_headers("cy")
    accepted = client.post("/v1/jobs/tasks", json={"message": "Leave days?"}, headers=cy)
    location = accepted.headers["Location"]
    assert poll(client, location, cy)["status"] == "succeeded"
    refused = client.post(f"{location}/cancel", headers=cy)
    assert refused.status_code == 409
    assert refused.json()["code"] == "job_finished"


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer() as sim:
        yield sim


@pytest.fixture(scope="module")
def model_lamina(
    simulator: SimulatorServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    settings = dev_settings(
        tmp_path_factory.mktemp("model-data"),
        inferencing=simulated_inferencing(simulator),
        intelligence={"planner": "deterministic"},
        jobs={"poll_interval_s": 0.1},
    )
    with app_in_thread(create_app(settings)) as base:
        yield base


def test_cancelling_a_running_task_stops_it(model_lamina: str, simulator: SimulatorServer) -> None:
    simulator.reset()
    simulator.script(ScriptedReply(fault=Fault(kind="timeout", hang_s=60)))
    dee = dev_headers("dee")
    with httpx.Client(base_url=model_lamina, timeout=30) as client:
        accepted = client.post("/v1/jobs/tasks", json={"message": "Write the report"}, headers=dee)
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["Location"]
        deadline = time.monotonic() + 30
        while not simulator.requests():  # the task is waiting on the model now
            assert time.monotonic() < deadline, "the task never called the model"
            time.sleep(0.05)
        assert client.get(location, headers=dee).json()["status"] == "running"

        cancelling = client.post(f"{location}/cancel", headers=dee)
        assert cancelling.status_code == 202
        assert cancelling.json()["cancel_requested"] is True
        done = poll(client, location, dee)
        assert done["status"] == "cancelled"
        assert done["result"] is None


def test_my_jobs_are_exported_and_erased_with_my_data(client: httpx.Client) -> None:
    eve = dev_headers("eve", roles=CONTENT_OWNER)
    accepted = client.post("/v1/jobs/tasks", json={"message": "Leave days?"}, headers=eve)
    poll(client, accepted.headers["Location"], eve)
    exported = client.get("/v1/me/data", headers=eve).json()["stores"]["jobs"]
    assert [job["id"] for job in exported] == [accepted.json()["id"]]
    assert exported[0]["input"]["message"] == "Leave days?"
    erased = client.delete("/v1/me/data", headers=eve)
    assert erased.status_code == 200, erased.text
    assert erased.json()["erased"]["jobs"] == 1
    assert client.get(accepted.headers["Location"], headers=eve).status_code == 404
    assert client.get("/v1/jobs", headers=eve).json()["items"] == []


def test_an_upload_never_replaces_a_document_of_the_tenants_corpus(
    client: httpx.Client,
) -> None:
    # The corpus holds handbook/leave.md for everyone; an upload under the same name is
    # the uploader's own document, beside it.
    forged = b"# Leave\n\nEvery employee gets 2 days of annual leave a year.\n"
    accepted = upload(client, [("handbook/leave.md", forged)], acl=None)
    assert accepted.status_code == 202, accepted.text
    assert poll(client, accepted.headers["Location"], OWNER)["status"] == "succeeded"

    question = {"message": "How many days of annual leave do employees get?"}
    answer = client.post("/v1/chat", json=question, headers=dev_headers("ann")).json()
    assert "handbook/leave.md" in sources(answer)
    assert "25 days" in answer["answer"] and "2 days" not in answer["answer"]
    # The uploader sees both, each under its own source.
    mine = client.post("/v1/chat", json=question, headers=OWNER).json()
    assert {"handbook/leave.md", "upload://olga/handbook/leave.md"} <= sources(mine)
