"""Crash safety: ``lamina`` processes killed with SIGKILL (no shutdown hook, no flush, no
rollback) in the middle of their work, then started again on the same data directory.

Nothing accepted may be lost and nothing may be left half-done in a way a reader could
mistake for done:

- **streams** — several answers streaming at once when the server dies. Every question
  whose request was accepted (the server stores it before the answer starts) is in its
  conversation after the restart, once; every reply is either complete and whole, or
  marked interrupted (holding at most the part that was streamed); the conversation
  goes on.
- **ingestion** — an upload job indexing a corpus in the server, and a ``lamina ingest``
  run, each killed part-way (the test checks that part of the corpus, and only part,
  was written). The knowledge index passes SQLite's and FTS5's integrity checks and its
  own invariants, answers searches, and once the job has run again (or ``lamina
  ingest --sync`` has) holds exactly the documents and chunks of a clean ingest of the
  same corpus: none missing, none twice, none cut short.

Real processes throughout: the simulator for the model, hashing embeddings for speed.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from inferencing.simulator import ConfigUpdate, SimulatorConfig, SimulatorServer
from tests.e2e.conftest import write_corpus
from tests.support.processes import (
    REPO,
    free_port,
    ingest_corpus,
    lamina_env,
    lamina_process,
    run_lamina,
)
from tests.support.simulator import simulator_env
from tests.support.sqlite_inspection import (
    index_inconsistencies,
    indexed_documents,
    integrity_problems,
)

pytestmark = pytest.mark.slow

ANSWER = " ".join(f"word{i}" for i in range(60)) + " [1]"
USER = {"X-Lamina-User": "ann", "X-Lamina-Groups": "alpha", "X-Lamina-Roles": "Lamina.User"}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def kill(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


# --- streams ------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed turn, read in a thread until the server dies under it."""

    question: str
    conversation_id: str | None = None
    accepted: threading.Event = field(default_factory=threading.Event)
    deltas: int = 0
    done: bool = False

    def run(self, base: str) -> None:
        body: dict[str, Any] = {"message": self.question}
        if self.conversation_id is not None:
            body["conversation_id"] = self.conversation_id
        try:
            with (
                httpx.Client(base_url=base, timeout=60) as client,
                connect_sse(client, "POST", "/v1/chat/stream", json=body, headers=USER) as source,
            ):
                if source.response.status_code != 200:
                    return
                self.accepted.set()
                for event in source.iter_sse():
                    self.deltas += event.event == "delta"
                    self.done = event.event == "done"
        except httpx.HTTPError:
            pass  # the server died under the stream: what this test is about


def conversations(base: str) -> dict[str, list[dict[str, Any]]]:
    """Every conversation of ``USER``: its messages, by conversation id."""
    with httpx.Client(base_url=base, headers=USER, timeout=10) as client:
        listed = client.get("/v1/conversations", params={"limit": 100})
        listed.raise_for_status()
        return {
            summary["id"]: client.get(f"/v1/conversations/{summary['id']}").json()["messages"]
            for summary in listed.json()["items"]
        }


def test_a_kill_during_several_streams_loses_no_question_and_shows_no_half_reply_as_done(
    tmp_path: Path,
) -> None:
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    write_corpus(corpus)
    with SimulatorServer(SimulatorConfig(default_reply=ANSWER)) as simulator:
        env = simulator_env(
            simulator,
            data,
            LAMINA_LOG_LEVEL="WARNING",
            LAMINA_INTELLIGENCE__PLANNER="deterministic",
            LAMINA_CONVERSATIONS__TURN_LEASE_S="2",
            LAMINA_CONVERSATIONS__SWEEP_INTERVAL_S="1",
        )
        ingest_corpus(corpus, env)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process(
            "serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"
        ) as first:
            # Turns that finish before the crash, in three conversations.
            finished: dict[str, list[str]] = {}
            for n in range(3):
                answered = httpx.post(
                    f"{base}/v1/chat",
                    json={"message": f"When does the cafeteria open? (finished {n})"},
                    headers=USER,
                    timeout=30,
                )
                assert answered.status_code == 200, answered.text
                assert answered.json()["answer"] == ANSWER
                finished[answered.json()["conversation_id"]] = [f"finished {n}"]

            # Four words a second: each answer takes ~15 s, so the kill lands mid-answer.
            simulator.configure(ConfigUpdate(tokens_per_second=4))
            streams = [
                Stream(f"And on Saturdays? (follow-up {n})", conversation_id)
                for n, conversation_id in enumerate(finished)
            ] + [Stream(f"Where is the Aurora launch team? (new {n})") for n in range(3)]
            threads = [threading.Thread(target=s.run, args=(base,), daemon=True) for s in streams]
            for thread in threads:
                thread.start()
            wait_for(lambda: all(s.deltas >= 2 for s in streams), "every answer is streaming")
            kill(first)
            for thread in threads:
                thread.join(timeout=30)
        assert all(s.accepted.is_set() and not s.done for s in streams)
        assert integrity_problems(data / "conversations.db") == []

        simulator.configure(ConfigUpdate(tokens_per_second=None))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"):
            # The leases of the killed turns run out; the restarted server marks them.
            wait_for(
                lambda: all(
                    m["status"] != "streaming"
                    for messages in conversations(base).values()
                    for m in messages
                ),
                "no reply is streaming any more",
            )
            stored = conversations(base)
            assert len(stored) == 6, f"{len(stored)} conversations: {list(stored)}"

            # Every accepted question is there, once, as the last of its conversation
            # (the one it continued, or a new one).
            asked = [
                (conversation_id, m["content"])
                for conversation_id, messages in stored.items()
                for m in messages
                if m["role"] == "user"
            ]
            for stream in streams:
                [(conversation_id, _)] = [q for q in asked if q[1] == stream.question]
                assert stream.conversation_id in (None, conversation_id), stream.question
                assert stored[conversation_id][-2]["content"] == stream.question
            for conversation_id in finished:
                messages = stored[conversation_id]
                assert [m["role"] for m in messages] == ["user", "assistant"] * 2, messages
                assert (messages[1]["status"], messages[1]["content"]) == ("complete", ANSWER)

            # Replies: complete and whole, or interrupted holding a prefix of the answer.
            for conversation_id, messages in stored.items():
                assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
                last = messages[-1]
                assert last["status"] == "interrupted", (conversation_id, last)
                assert ANSWER.startswith(last["content"]), last["content"]
                for reply in messages[1:-1:2]:
                    assert (reply["status"], reply["content"]) == ("complete", ANSWER)

            # The conversation goes on after the crash.
            resumed = str(streams[0].conversation_id)
            again = httpx.post(
                f"{base}/v1/chat",
                json={"message": "Thanks. One more thing?", "conversation_id": resumed},
                headers=USER,
                timeout=30,
            )
            assert again.status_code == 200, again.text
            assert again.json()["answer"] == ANSWER
            assert conversations(base)[resumed][-1]["status"] == "complete"


# --- ingestion ----------------------------------------------------------------------------

CORPUS_FILES = 300
OWNER = {
    "X-Lamina-User": "olga",
    "X-Lamina-Groups": "staff",
    "X-Lamina-Roles": "Lamina.ContentOwner",
}
ACL = 'tenant: contoso\nrules:\n  - match: "**"\n    groups: [staff]\n'


def code_word(n: int) -> str:
    return f"kestrel{n:03d}"


def write_large_corpus(root: Path) -> list[str]:
    """``CORPUS_FILES`` notes of several chunks each, each naming its own code word; the
    relative paths."""
    rng = random.Random(7)
    vocabulary = [f"term{i}" for i in range(3000)]
    names: list[str] = []
    for n in range(CORPUS_FILES):
        name = f"team{n % 10}/note{n:03d}.md"
        paragraphs = [" ".join(rng.choices(vocabulary, k=80)) for _ in range(10)]
        text = f"# Note {n}\n\nThe code word of note {n} is {code_word(n)}.\n\n" + "\n\n".join(
            paragraphs
        )
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
        names.append(name)
    (root / "acl.yaml").write_text(ACL)
    return names


@dataclass
class Corpus:
    root: Path
    names: list[str]
    clean: dict[str, Any]
    """What a clean, uninterrupted ``lamina ingest`` of the corpus indexes, by source."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    names = write_large_corpus(root)
    data = tmp_path_factory.mktemp("clean")
    ingest = run_lamina(
        "ingest", str(root), env=lamina_env(LAMINA_DATA_DIR=str(data)), timeout_s=300
    )
    assert ingest.returncode == 0, ingest.stderr + ingest.stdout
    clean = indexed_documents(data / "knowledge.db")
    assert sorted(clean) == sorted(names)
    return Corpus(root, names, dict(clean))


def indexed_count(index: Path) -> int:
    """Documents committed to the index so far (0 before it exists)."""
    if not index.exists():
        return 0
    try:
        with closing(sqlite3.connect(index, timeout=5)) as db:
            (count,) = db.execute("SELECT count(*) FROM documents").fetchone()
    except sqlite3.OperationalError:  # the schema is still being created
        return 0
    return int(count)


def assert_sound(index: Path) -> None:
    assert integrity_problems(index) == []
    assert index_inconsistencies(index) == []


def test_a_kill_during_an_upload_job_leaves_a_sound_index_and_the_job_runs_again(
    corpus: Corpus, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    index = data / "knowledge.db"
    env = lamina_env(
        LAMINA_DATA_DIR=str(data),
        LAMINA_AUTH__MODE="dev",
        LAMINA_LOG_LEVEL="WARNING",
        LAMINA_JOBS__LEASE_S="2",
        LAMINA_JOBS__POLL_INTERVAL_S="0.2",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz") as first:
        files = [
            ("files", (name, (corpus.root / name).read_bytes(), "text/markdown"))
            for name in corpus.names
        ]
        files.append(("acl", ("acl.yaml", ACL.encode(), "application/yaml")))
        accepted = httpx.post(f"{base}/v1/jobs/ingest", files=files, headers=OWNER, timeout=60)
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["Location"]
        job_id = accepted.json()["id"]
        wait_for(lambda: indexed_count(index) >= 20, "the job has indexed a few documents")
        kill(first)
    written = indexed_count(index)
    assert 20 <= written < CORPUS_FILES, f"the kill did not land mid-ingest: {written} written"
    assert_sound(index)
    prefix = "upload://olga/"
    partial = indexed_documents(index, source_prefix=prefix)
    # What was committed is whole: each document as a clean ingest makes it.
    assert {source: corpus.clean[source] for source in partial} == partial

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"),
        httpx.Client(base_url=base, headers=OWNER, timeout=30) as client,
    ):
        # Searching works while the job waits for its lease to run out.
        early = client.post("/v1/chat", json={"message": "What is the code word of note 0?"})
        assert early.status_code == 200, early.text

        def ended() -> bool:
            return client.get(location).json()["status"] in ("succeeded", "failed", "cancelled")

        wait_for(ended, "the interrupted job has run again and ended")
        job = client.get(location).json()
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job
        assert job["result"]["files_unchanged"] == written, job["result"]
        assert job["result"]["files_indexed"] == CORPUS_FILES - written, job["result"]
        # Removed once the job has ended (just after its status is written).
        wait_for(lambda: not (data / "uploads" / job_id).exists(), "the upload is removed")

        last = CORPUS_FILES - 1
        found = client.post(
            "/v1/chat", json={"message": f"What is the code word of note {last}?"}
        ).json()
        assert code_word(last) in found["answer"], found
        assert f"{prefix}{corpus.names[last]}" in {c["source"] for c in found["citations"]}

    assert_sound(index)
    assert indexed_documents(index, source_prefix=prefix) == corpus.clean


def test_a_kill_during_lamina_ingest_leaves_a_sound_index_that_a_sync_run_completes(
    corpus: Corpus, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    index = data / "knowledge.db"
    env = lamina_env(LAMINA_DATA_DIR=str(data))
    ingest = subprocess.Popen(
        [sys.executable, "-m", "client_api.cli", "ingest", str(corpus.root)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(lambda: indexed_count(index) >= 20, "lamina ingest has indexed a few documents")
    finally:
        kill(ingest)
    written = indexed_count(index)
    assert 20 <= written < CORPUS_FILES, f"the kill did not land mid-ingest: {written} written"
    assert_sound(index)
    partial = indexed_documents(index)
    assert {source: corpus.clean[source] for source in partial} == partial

    asked = run_lamina(
        "ask", "What is the code word of note 0?", "--user", "sam", "--groups", "staff", env=env
    )
    assert asked.returncode == 0, asked.stderr
    assert code_word(0) in asked.stdout

    rerun = run_lamina("ingest", "--sync", str(corpus.root), env=env, timeout_s=300)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert f"Indexed {CORPUS_FILES - written} of {CORPUS_FILES} files" in rerun.stdout
    assert_sound(index)
    assert indexed_documents(index) == corpus.clean
