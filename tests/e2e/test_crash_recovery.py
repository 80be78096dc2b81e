"""A server killed with SIGKILL in the middle of a streamed answer loses nothing and
doubles nothing: after a restart the question is there, the answer is marked
interrupted, and the client's retry with the same Idempotency-Key finishes the turn,
exactly once. ``lamina serve`` processes, the real ``openai`` client in the server,
the simulator streaming slowly so the kill lands mid-answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from inferencing.simulator import ConfigUpdate, SimulatorConfig, SimulatorServer
from tests.support.processes import free_port, lamina_process, run_lamina
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

USER = {"X-Lamina-User": "dana", "X-Lamina-Groups": "hr", "X-Lamina-Roles": "employee"}
ANSWER = " ".join(f"word{i}" for i in range(60)) + " [1]"
QUESTION = {"message": "How many days of annual leave do employees get?"}


def chat_requests(simulator: SimulatorServer) -> int:
    return sum(r.path.endswith("/chat/completions") for r in simulator.requests())


def conversation(base: str, conversation_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/conversations/{conversation_id}", headers=USER, timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_kill_9_mid_answer_then_retry_with_the_same_key_finishes_once(tmp_path: Path) -> None:
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    corpus.mkdir()
    (corpus / "leave.md").write_text("# Leave\n\nEmployees receive 27 days of annual leave.\n")
    (corpus / "acl.yaml").write_text('tenant: contoso\nrules:\n  - match: "**"\n    groups: [hr]\n')
    # Four words a second: the answer takes ~15 s to stream, so the kill lands mid-answer.
    config = SimulatorConfig(default_reply=ANSWER, tokens_per_second=4)
    with SimulatorServer(config) as simulator:
        env = simulator_env(
            simulator,
            data,
            LAMINA_INTELLIGENCE__PLANNER="deterministic",
            LAMINA_CONVERSATIONS__TURN_LEASE_S="2",
            LAMINA_CONVERSATIONS__SWEEP_INTERVAL_S="1",
        )
        assert run_lamina("ingest", str(corpus), env=env).returncode == 0
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        headers = {**USER, "Idempotency-Key": "turn-7f3c"}

        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz") as (
            first
        ):
            started: dict[str, Any] = {}
            deltas = 0
            with (
                httpx.Client(base_url=base, timeout=30) as client,
                connect_sse(client, "POST", "/v1/chat/stream", json=QUESTION, headers=headers) as s,
            ):
                assert s.response.headers["X-Lamina-Idempotency"] == "new"
                for event in s.iter_sse():
                    if event.event == "plan":
                        started = json.loads(event.data)
                    if event.event == "delta":
                        deltas += 1
                        if deltas == 3:
                            first.kill()  # SIGKILL: no shutdown hook runs
                            first.wait(timeout=10)
                            break
            assert started, "the stream began"
        assert deltas == 3
        assert chat_requests(simulator) == 1

        simulator.configure(ConfigUpdate(tokens_per_second=None))
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"):
            listed = httpx.get(f"{base}/v1/conversations", headers=USER, timeout=10).json()
            [summary] = listed["items"]
            # The lease of the killed turn runs out; the restarted server marks it.
            deadline = time.monotonic() + 30
            while True:
                messages = conversation(base, summary["id"])["messages"]
                if messages[-1]["status"] == "interrupted" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert [(m["role"], m["status"]) for m in messages] == [
                ("user", "complete"),
                ("assistant", "interrupted"),
            ]
            assert messages[0]["content"] == QUESTION["message"]
            reply_id = messages[1]["id"]

            retried = httpx.post(f"{base}/v1/chat", json=QUESTION, headers=headers, timeout=60)
            assert retried.status_code == 200, retried.text
            assert retried.headers["X-Lamina-Idempotency"] == "retried"
            body = retried.json()
            assert body["answer"] == ANSWER
            assert (body["conversation_id"], body["message_id"]) == (summary["id"], reply_id)
            assert chat_requests(simulator) == 2

            # Sent once more: the stored answer, not a third model call.
            again = httpx.post(f"{base}/v1/chat", json=QUESTION, headers=headers, timeout=60)
            assert again.headers["X-Lamina-Idempotency"] == "replayed"
            assert again.json()["answer"] == ANSWER
            assert again.json()["message_id"] == reply_id
            assert chat_requests(simulator) == 2

            final = conversation(base, summary["id"])["messages"]
            assert [(m["role"], m["status"]) for m in final] == [
                ("user", "complete"),
                ("assistant", "complete"),
            ]
            assert final[1]["content"] == ANSWER
            assert len(httpx.get(f"{base}/v1/conversations", headers=USER).json()["items"]) == 1
