"""The job runner against a real SQLite job store: progress, cancellation, failures,
abandoned jobs run again; and the two kinds, ingestion (the real pipeline and index)
and agent tasks (the orchestrator over in-memory fakes)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from intelligence.contracts import (
    AGENT_TASK_JOB,
    INGEST_JOB,
    AnswerFailed,
    Job,
    JobAlreadyFinished,
    JobStatus,
    Principal,
    TurnRequest,
    collect_turn,
)
from intelligence.jobs import (
    AgentTasks,
    IngestJobs,
    InvalidUpload,
    JobFailed,
    JobRunner,
    ReportProgress,
)
from intelligence.orchestrator import Orchestrator
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.stores.sqlite_jobs import SqliteJobStore
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import RetrievalQuery
from knowledge.ingestion.acl import AccessRules
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from knowledge.settings import KnowledgeSettings
from tests.fakes import ScriptedChatModel, chunk, text_reply
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.support.lifecycle import opened

ALICE = Principal("contoso", "alice", groups=frozenset({"hr"}))
BOB = Principal("contoso", "bob", groups=frozenset({"finance"}))
WORK = "work"


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` holds (polling), or fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def ended(store: SqliteJobStore, principal: Principal, job_id: str) -> Job:
    async def done() -> bool:
        job = await store.get(principal, job_id)
        return job is not None and job.status.finished

    await eventually(done, what=f"job {job_id} to end")
    job = await store.get(principal, job_id)
    assert job is not None
    return job


class Gate:
    """A handler that reports progress, then waits until the test lets it finish."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.running = 0
        self.most_running = 0
        self.principals: list[Principal] = []

    async def __call__(
        self,
        job: Job,
        principal: Principal,
        report_progress: ReportProgress,
        cancelled: Callable[[], bool],
    ) -> Mapping[str, Any]:
        self.principals.append(principal)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            report_progress(0.25, "a quarter")
            self.started.set()
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = cancelled()
            raise
        finally:
            self.running -= 1
        return {"echo": dict(job.input)}


async def gate_started(runner: JobRunner, **options: Any) -> Gate:
    """A new ``Gate`` registered as ``runner``'s handler of WORK jobs, and ``runner`` started."""
    gate = Gate()
    runner.register(WORK, gate, **options)
    await runner.start()
    return gate


async def running_job(runner: JobRunner, gate: Gate) -> Job:
    """Alice's WORK job, submitted and waited for until ``gate`` runs it."""
    job = await runner.submit(ALICE, WORK, {})
    await asyncio.wait_for(gate.started.wait(), 10)
    return job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    async with opened(SqliteJobStore(tmp_path / "jobs.db")) as s:
        yield s


NewRunner = Callable[..., JobRunner]


@pytest.fixture
async def new_runner(store: SqliteJobStore) -> AsyncIterator[NewRunner]:
    """Makes runners on the test's store, each as one server runs it (polling every 50 ms);
    every runner made is stopped when the test ends."""
    made: list[JobRunner] = []

    def make(*, concurrency: int = 1, lease_s: float = 1.0) -> JobRunner:
        made.append(
            JobRunner(store, concurrency=concurrency, lease_s=lease_s, poll_interval_s=0.05)
        )
        return made[-1]

    yield make
    for runner in made:
        await runner.stop()


@pytest.fixture
def runner(new_runner: NewRunner) -> JobRunner:
    return new_runner(concurrency=2)


# --- the runner ------------------------------------------------------------------------


async def test_a_job_reports_progress_and_ends_with_its_result(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    gate = await gate_started(runner)
    job = await runner.submit(ALICE, WORK, {"n": 1})
    assert job.status is JobStatus.QUEUED

    async def progressed() -> bool:
        seen = await store.get(ALICE, job.id)
        return seen is not None and seen.progress == 0.25

    await eventually(progressed, what="progress")
    running = await store.get(ALICE, job.id)
    assert running is not None
    assert (running.status, running.progress_message) == (JobStatus.RUNNING, "a quarter")
    gate.release.set()
    done = await ended(store, ALICE, job.id)
    assert (done.status, done.result, done.progress) == (
        JobStatus.SUCCEEDED,
        {"echo": {"n": 1}},
        1.0,
    )
    assert gate.principals == [ALICE]  # it ran as the principal that created it


async def test_at_most_concurrency_jobs_run_at_once(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    gate = await gate_started(runner)
    jobs = [await runner.submit(ALICE, WORK, {"n": n}) for n in range(5)]

    async def two_running() -> bool:
        return gate.running == 2

    await eventually(two_running, what="two jobs to run")
    gate.release.set()
    for job in jobs:
        assert (await ended(store, ALICE, job.id)).status is JobStatus.SUCCEEDED
    assert gate.most_running == 2


async def test_cancelling_a_running_job_stops_its_task_and_ends_it_cancelled(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    gate = await gate_started(runner)
    job = await running_job(runner, gate)
    assert await runner.cancel(BOB, job.id) is None  # not Bob's
    flagged = await runner.cancel(ALICE, job.id)
    assert flagged is not None
    assert flagged.cancel_requested
    done = await ended(store, ALICE, job.id)
    assert done.status is JobStatus.CANCELLED
    assert gate.cancelled  # the handler saw the cancel request as it stopped
    with pytest.raises(JobAlreadyFinished, match="cancelled"):
        await runner.cancel(ALICE, job.id)


async def test_a_cancel_requested_on_another_server_stops_the_job_at_its_heartbeat(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    gate = await gate_started(runner)
    job = await running_job(runner, gate)
    await store.request_cancel(ALICE, job.id)  # as another server's API would
    assert (await ended(store, ALICE, job.id)).status is JobStatus.CANCELLED


async def test_cancelling_a_queued_job_ends_it_before_it_runs(new_runner: NewRunner) -> None:
    gate = Gate()
    runner = new_runner()
    runner.register(WORK, gate)
    ends: list[str] = []

    async def on_end(job: Job) -> None:
        ends.append(job.id)

    runner.register("other", gate, on_end=on_end)
    job = await runner.submit(ALICE, "other", {})  # not started: it stays queued
    cancelled = await runner.cancel(ALICE, job.id)
    assert cancelled is not None
    assert cancelled.status is JobStatus.CANCELLED
    assert ends == [job.id]  # what it left behind is cleaned up
    await runner.start()
    await runner.stop()
    assert gate.principals == []


async def test_a_failure_is_recorded_with_a_clear_error(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    async def refuses(job: Job, *_: object) -> Mapping[str, Any]:
        raise JobFailed("ingestion_failed", "acl.yaml: rules.0.match: field required")

    async def answer_fails(job: Job, *_: object) -> Mapping[str, Any]:
        raise AnswerFailed("The model is unavailable.", "model_unavailable")

    async def crashes(job: Job, *_: object) -> Mapping[str, Any]:
        raise RuntimeError("secret internals: /srv/lamina/db at 10.0.0.4")

    runner.register("refuses", refuses)
    runner.register("answer_fails", answer_fails)
    runner.register("crashes", crashes)
    await runner.start()
    first = await runner.submit(ALICE, "refuses", {})
    second = await runner.submit(ALICE, "answer_fails", {})
    third = await runner.submit(ALICE, "crashes", {})

    failed = await ended(store, ALICE, first.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert (failed.error.code, failed.error.message) == (
        "ingestion_failed",
        "acl.yaml: rules.0.match: field required",
    )
    model = await ended(store, ALICE, second.id)
    assert model.error is not None
    assert (model.error.code, model.error.message) == (
        "model_unavailable",
        "The model is unavailable.",
    )
    crash = await ended(store, ALICE, third.id)
    assert crash.status is JobStatus.FAILED
    assert crash.error is not None
    assert crash.error.code == "internal_error"
    assert "secret" not in crash.error.message  # no internals reach the job's owner


async def test_a_job_abandoned_by_a_dead_server_runs_again_to_completion(
    store: SqliteJobStore, new_runner: NewRunner
) -> None:
    gate = Gate()
    gate.release.set()
    job = await store.create(ALICE, WORK, {"n": 7})
    # What a server that died mid-job leaves behind: the job running under its lease.
    died = await store.claim(
        "dead-server", datetime.now(UTC) + timedelta(seconds=0.5), kinds=[WORK]
    )
    assert died is not None

    restarted = new_runner()
    restarted.register(WORK, gate)
    await restarted.start()
    done = await ended(store, ALICE, job.id)
    assert (done.status, done.result, done.attempts) == (
        JobStatus.SUCCEEDED,
        {"echo": {"n": 7}},
        2,
    )


async def test_a_stopping_server_gives_its_running_jobs_back_to_the_queue(
    store: SqliteJobStore, new_runner: NewRunner
) -> None:
    first = new_runner(lease_s=30.0)
    job = await running_job(first, await gate_started(first))
    await first.stop()
    queued = await store.get(ALICE, job.id)
    assert queued is not None
    assert (queued.status, queued.attempts) == (JobStatus.QUEUED, 0)

    # The next server takes it at once: no lease to wait out.
    again = Gate()
    again.release.set()
    second = new_runner(lease_s=30.0)
    second.register(WORK, again)
    await second.start()
    assert (await ended(store, ALICE, job.id)).status is JobStatus.SUCCEEDED


async def test_a_server_that_lost_its_job_stops_running_it(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    gate = await gate_started(runner)
    job = await running_job(runner, gate)
    assert await store.erase_user(ALICE) == 1  # e.g. erased through another server

    async def stopped() -> bool:
        return gate.running == 0

    await eventually(stopped, what="the lost job to stop")
    assert await store.get(ALICE, job.id) is None


async def test_erasing_a_user_stops_their_jobs_and_cleans_up(
    runner: JobRunner, store: SqliteJobStore
) -> None:
    cleaned: list[str] = []

    async def on_end(job: Job) -> None:
        cleaned.append(job.id)

    running = await running_job(runner, await gate_started(runner, on_end=on_end))
    bobs = await runner.submit(BOB, WORK, {})
    assert [e["id"] for e in await runner.export_user(ALICE)] == [running.id]
    assert await runner.erase_user(ALICE) == 1
    assert cleaned == [running.id]
    assert await runner.export_user(ALICE) == []
    assert await store.get(BOB, bobs.id) is not None


# --- ingestion ---------------------------------------------------------------------------

ACL_FOR_HR = b"""
tenant: contoso
rules:
  - match: "policies/**"
    groups: [hr]
"""


def _acl_tenants(text: str) -> frozenset[str]:
    return AccessRules.parse(text, source="ACL file").tenants


def _staged(uploads: Path) -> list[Path]:
    """What waits in the uploads folder."""
    return list(uploads.iterdir()) if uploads.exists() else []


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    async with opened(SqliteKnowledgeIndex(tmp_path / "knowledge.db")) as i:
        yield i


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def ingest(runner: JobRunner, index: SqliteKnowledgeIndex, uploads: Path) -> IngestJobs:
    pipeline = IngestionPipeline(index, KnowledgeSettings())
    return IngestJobs(runner, pipeline, uploads, _acl_tenants)


async def test_uploaded_files_are_ingested_under_their_acl_and_then_removed(
    runner: JobRunner,
    store: SqliteJobStore,
    ingest: IngestJobs,
    index: SqliteKnowledgeIndex,
    uploads: Path,
) -> None:
    await runner.start()
    files = [
        ("policies/remote.md", io.BytesIO(b"# Remote work\n\nStaff may work remotely on Fridays.")),
        ("policies/travel.md", io.BytesIO(b"# Travel\n\nBook trains for trips under 500 km.")),
        ("notes/todo.md", io.BytesIO(b"# Todo\n\nNo rule matches this file.")),
    ]
    job = await ingest.submit(ALICE, files, io.BytesIO(ACL_FOR_HR))
    assert dict(job.input) == {
        "files": ["policies/remote.md", "policies/travel.md", "notes/todo.md"],
        "acl": "uploaded",
    }
    done = await ended(store, ALICE, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None
    assert done.result["files_seen"] == 3
    assert done.result["files_indexed"] == 2
    assert done.result["skipped"] == [{"path": "notes/todo.md", "reason": "no access rule matches"}]

    # The staged files are removed once the job's end is recorded, just after it.
    async def removed() -> bool:
        return _staged(uploads) == []

    await eventually(removed, what="the staged upload to be removed")

    retriever = SecurityTrimmedRetriever(index)
    query = RetrievalQuery("work remotely on Fridays")
    found = await retriever.retrieve(query, ALICE)
    assert [p.chunk.source for p in found.passages][:1] == ["upload://alice/policies/remote.md"]
    assert (await retriever.retrieve(query, BOB)).passages == ()


async def test_without_an_acl_file_only_the_uploader_may_read_the_upload(
    runner: JobRunner, store: SqliteJobStore, ingest: IngestJobs, index: SqliteKnowledgeIndex
) -> None:
    await runner.start()
    job = await ingest.submit(
        BOB, [("q3-forecast.md", io.BytesIO(b"# Forecast\n\nRevenue grows nine percent."))], None
    )
    assert job.input["acl"] == "private"
    assert (await ended(store, BOB, job.id)).status is JobStatus.SUCCEEDED
    retriever = SecurityTrimmedRetriever(index)
    query = RetrievalQuery("revenue forecast")
    assert (await retriever.retrieve(query, BOB)).passages
    assert (await retriever.retrieve(query, ALICE)).passages == ()


@pytest.mark.parametrize(
    ("files", "acl", "message"),
    [
        ([], None, "at least one file"),
        ([("../escape.md", b"x")], None, "not a usable file name"),
        ([("/etc/passwd", b"x")], None, "not a usable file name"),
        ([(".hidden.md", b"x")], None, "not a usable file name"),
        ([("a.md", b"x"), ("a.md", b"y")], None, "twice"),
        ([("a", b"x"), ("a/b.md", b"y")], None, "both as a file and as a folder"),
        ([("x" * 256 + ".md", b"x")], None, "not a usable file name"),
        (
            [("a.md", b"x")],
            b"tenant: fabrikam\nrules:\n  - match: '**'\n    public: true\n",
            "fabrikam",
        ),
        ([("a.md", b"x")], b"rules: [", "not valid"),
    ],
)
async def test_an_unusable_upload_is_refused_before_a_job_exists(
    ingest: IngestJobs,
    store: SqliteJobStore,
    uploads: Path,
    files: list[tuple[str, bytes]],
    acl: bytes | None,
    message: str,
) -> None:
    with pytest.raises(InvalidUpload, match=message):
        await ingest.submit(
            ALICE,
            [(name, io.BytesIO(content)) for name, content in files],
            io.BytesIO(acl) if acl is not None else None,
        )
    assert (await store.list_jobs(ALICE)).items == ()
    assert _staged(uploads) == []


async def test_an_ingestion_whose_files_are_gone_fails_clearly(
    runner: JobRunner, store: SqliteJobStore, ingest: IngestJobs, uploads: Path
) -> None:
    job = await ingest.submit(ALICE, [("a.md", io.BytesIO(b"# A\n\nText."))], None)
    await ingest.discard(job)  # e.g. the uploads volume was wiped
    await runner.start()
    failed = await ended(store, ALICE, job.id)
    assert failed.error is not None
    assert failed.error.code == "upload_missing"


# --- agent tasks -------------------------------------------------------------------------


@pytest.fixture
async def conversations(tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
    async with opened(SqliteConversationStore(tmp_path / "conversations.db")) as s:
        yield s


def _assistant(conversations: SqliteConversationStore, model: ScriptedChatModel) -> Orchestrator:
    return orchestrator_over_fakes(
        conversations,
        model,
        chunks=[chunk("leave", "Employees receive 27 days of annual leave.", public=True)],
    )


async def test_an_agent_task_runs_a_turn_as_its_owner_and_keeps_the_answer(
    runner: JobRunner, store: SqliteJobStore, conversations: SqliteConversationStore
) -> None:
    model = ScriptedChatModel([text_reply("You receive 27 days of annual leave [1].")])
    tasks = AgentTasks(runner, _assistant(conversations, model))
    await runner.start()
    job = await tasks.submit(ALICE, "How many days of annual leave do I get?")
    assert job.kind == AGENT_TASK_JOB
    done = await ended(store, ALICE, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None
    assert done.result["answer"] == "You receive 27 days of annual leave [1]."
    assert [c["source"] for c in done.result["citations"]] == ["leave.md"]
    messages = await conversations.messages(ALICE, done.result["conversation_id"])
    assert [m.role for m in messages] == ["user", "assistant"]


async def test_an_agent_task_run_again_after_a_crash_does_not_ask_twice(
    store: SqliteJobStore, conversations: SqliteConversationStore, new_runner: NewRunner
) -> None:
    model = ScriptedChatModel([text_reply("You receive 27 days of annual leave [1].")])
    assistant = _assistant(conversations, model)
    job = await store.create(
        ALICE, AGENT_TASK_JOB, {"message": "How many leave days?", "conversation_id": None}
    )
    # The first run finished its turn, then its server died before recording the job.
    first_run = TurnRequest("How many leave days?", correlation_id=job.id, idempotency_key=job.id)
    await collect_turn((await assistant.start_turn(first_run, ALICE)).events)
    await store.claim(
        "dead-server", datetime.now(UTC) + timedelta(seconds=0.2), kinds=[AGENT_TASK_JOB]
    )

    runner = new_runner()
    AgentTasks(runner, assistant)
    await runner.start()
    done = await ended(store, ALICE, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None
    assert done.result["answer"] == "You receive 27 days of annual leave [1]."
    assert len(model.requests) == 1  # the model was asked once
    [conversation] = (await conversations.list_conversations(ALICE)).items
    assert [m.role for m in await conversations.messages(ALICE, conversation.id)] == [
        "user",
        "assistant",
    ]


async def test_an_agent_task_for_a_refused_message_fails_with_the_reason(
    runner: JobRunner, store: SqliteJobStore, conversations: SqliteConversationStore
) -> None:
    tasks = AgentTasks(runner, _assistant(conversations, ScriptedChatModel()))
    await runner.start()
    job = await tasks.submit(ALICE, "Tell me", conversation_id="not-a-conversation")
    failed = await ended(store, ALICE, job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "conversation_not_found"
    assert INGEST_JOB not in runner.kinds


async def test_an_acl_file_over_a_megabyte_is_refused_unread(
    ingest: IngestJobs, store: SqliteJobStore
) -> None:
    huge = io.BytesIO(b"# " + b"x" * (1024 * 1024))
    with pytest.raises(InvalidUpload, match="larger than"):
        await ingest.submit(ALICE, [("a.md", io.BytesIO(b"# A\n\ntext"))], huge)
    assert (await store.list_jobs(ALICE)).items == ()
