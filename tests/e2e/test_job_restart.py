"""A job survives its server: ``lamina serve`` is killed (SIGKILL) while a task runs,
started again on the same data directory, and the task completes, its turn not doubled.

The model is the OpenAI-compatible simulator: its first reply hangs, so the task is
certainly running (waiting on the model) when the server dies."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from tests.e2e.conftest import write_corpus
from tests.support.processes import free_port, ingest_corpus, lamina_process
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

USER = {"X-Lamina-User": "ann", "X-Lamina-Groups": "alpha"}


def _job(base: str, location: str) -> dict[str, Any]:
    response = httpx.get(f"{base}{location}", headers=USER, timeout=10)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def test_a_task_running_when_its_server_is_killed_completes_after_a_restart(
    tmp_path: Path,
) -> None:
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    write_corpus(corpus)
    with SimulatorServer() as simulator:
        env = simulator_env(
            simulator,
            data,
            LAMINA_LOG_LEVEL="WARNING",
            LAMINA_INTELLIGENCE__PLANNER="deterministic",
            LAMINA_JOBS__LEASE_S="2",
            LAMINA_JOBS__POLL_INTERVAL_S="0.2",
            LAMINA_CONVERSATIONS__TURN_LEASE_S="1",
        )
        ingest_corpus(corpus, env)
        simulator.script(ScriptedReply(fault=Fault(kind="timeout", hang_s=120)))

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process(
            "serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"
        ) as first:
            accepted = httpx.post(
                f"{base}/v1/jobs/tasks",
                json={"message": "When does the cafeteria open?"},
                headers=USER,
                timeout=10,
            )
            assert accepted.status_code == 202, accepted.text
            location = accepted.headers["Location"]
            deadline = time.monotonic() + 30
            while not any(r.path.endswith("/chat/completions") for r in simulator.requests()):
                assert time.monotonic() < deadline, "the task never called the model"
                time.sleep(0.05)
            assert _job(base, location)["status"] == "running"
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"):
            deadline = time.monotonic() + 60
            job = _job(base, location)
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"the job did not end: {job}"
                time.sleep(0.1)
                job = _job(base, location)
            assert job["status"] == "succeeded", job["error"]
            assert job["attempts"] == 2
            answer = job["result"]
            assert answer["answer"]
            # The turn was run again in place, not asked a second time.
            conversations = httpx.get(f"{base}/v1/conversations", headers=USER, timeout=10)
            [conversation] = conversations.json()["items"]
            assert conversation["id"] == answer["conversation_id"]
            stored = httpx.get(
                f"{base}/v1/conversations/{conversation['id']}", headers=USER, timeout=10
            ).json()
            assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
            assert stored["messages"][1]["status"] == "complete"
