"""Long-running work as jobs: a runner that executes queued jobs in the background, and
the two kinds Lamina ships (ingestion of uploaded files, and long agent tasks).

A job's state lives in a :class:`~intelligence.contracts.JobStore`, so it outlives the
process: a server claims a queued job with a lease it renews while the job runs, and a
job whose lease ran out (its server died) is queued again and runs again on whichever
server claims it next. Cancellation is cooperative: a cancel request cancels the
handler's task (``asyncio`` cancellation), and the job ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic import TypeAdapter

from intelligence.contracts import (
    AGENT_TASK_JOB,
    INGEST_JOB,
    AnswerDelta,
    Assistant,
    InputRejected,
    IntelligenceError,
    Job,
    JobAlreadyFinished,
    JobFailure,
    JobStatus,
    JobStore,
    Principal,
    StartedTurn,
    StepEvent,
    TurnEvent,
    TurnInProgress,
    TurnRequest,
    TurnResult,
    collect_turn,
)
from knowledge.contracts import Ingestor, KnowledgeError

log = logging.getLogger(__name__)

ReportProgress = Callable[[float | None, str | None], None]
"""``report(fraction, message)``: how far a job got (0..1, or ``None`` when it cannot
tell) and what it is doing. Cheap and synchronous: the latest report is written to the
store shortly after, earlier ones it overtook are dropped."""


class JobHandler(Protocol):
    """Runs one job of a kind as ``principal`` and returns its JSON-ready result.

    Raise :class:`JobFailed` (or an :class:`IntelligenceError`) for a failure with a
    message a user may read. ``cancelled()`` tells whether a cancel was requested; the
    runner also cancels the handler's task, so a handler that awaits needs no check."""

    async def __call__(
        self,
        job: Job,
        principal: Principal,
        report_progress: ReportProgress,
        cancelled: Callable[[], bool],
    ) -> Mapping[str, Any]: ...


JobCleanup = Callable[[Job], Awaitable[None]]
"""Called once a job of the kind has ended (or was erased): remove what it left behind."""


class JobFailed(Exception):
    """A job failed for a reason its owner may read: ``code`` for clients, ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class InvalidUpload(InputRejected):
    """Uploaded files or their ACL file cannot be ingested (the message says why)."""

    code = "invalid_upload"


class _Stop(Enum):
    CANCEL = "cancel"
    """Its owner asked: the job ends ``cancelled``."""
    SHUTDOWN = "shutdown"
    """This server stops: the job goes back to the queue."""
    LOST = "lost"
    """The store says this server no longer holds the job (erased, or requeued)."""


@dataclass(frozen=True, slots=True)
class _Kind:
    run: JobHandler
    on_end: JobCleanup | None


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[Mapping[str, Any]] | None = None
    stop_reason: _Stop | None = None

    @property
    def cancel_requested(self) -> bool:
        return self.stop_reason is _Stop.CANCEL

    def stop(self, reason: _Stop) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None:
            self.task.cancel()


class _ProgressWriter:
    """A job's progress reports, written behind it: one write at a time, the latest wins."""

    def __init__(self, store: JobStore, job_id: str, worker_id: str) -> None:
        self._store, self._job_id, self._worker_id = store, job_id, worker_id
        self._pending: tuple[float | None, str | None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._write(), name=f"job-progress-{job_id}")

    def __call__(self, fraction: float | None, message: str | None = None) -> None:
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction))) if fraction == fraction else None
        self._pending = (fraction, message[:500] if message is not None else None)
        self._wake.set()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, None
            if pending is not None:
                try:
                    await self._store.set_progress(self._job_id, self._worker_id, *pending)
                except Exception:
                    log.warning("could not record the progress of job %s", self._job_id)
            if self._closed and self._pending is None:
                return

    async def close(self) -> None:
        """Write what is still pending, then stop."""
        self._closed = True
        self._wake.set()
        await self._task


class JobRunner:
    """Runs queued jobs in the background on the event loop, ``concurrency`` at a time.

    ``start()`` requeues jobs abandoned by a dead process and begins claiming; ``stop()``
    (app shutdown) cancels the running handlers and gives their jobs back to the queue.
    Jobs submitted here, queued by another server sharing the store, or requeued after
    a crash are all claimed the same way. Also a
    :class:`~intelligence.contracts.PersonalDataHolder`: erasing a user's jobs stops
    them and removes what they left behind."""

    def __init__(
        self,
        store: JobStore,
        *,
        concurrency: int = 2,
        lease_s: float = 30.0,
        poll_interval_s: float = 1.0,
        max_attempts: int = 3,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._concurrency = concurrency
        self._lease = timedelta(seconds=lease_s)
        self._poll_interval_s = poll_interval_s
        # Abandoned jobs are found this often: soon after their lease ends, but not
        # more often than the queue is polled.
        self._sweep_interval_s = max(poll_interval_s, lease_s / 3)
        self._max_attempts = max_attempts
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._kinds: dict[str, _Kind] = {}
        self._running: dict[str, _Running] = {}
        self._executions: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return self._store.name

    def register(self, kind: str, handler: JobHandler, *, on_end: JobCleanup | None = None) -> None:
        """Run jobs of ``kind`` with ``handler``; ``on_end`` cleans up after each one."""
        if kind in self._kinds:
            raise ValueError(f"job kind {kind!r} is registered already")
        self._kinds[kind] = _Kind(handler, on_end)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._kinds)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._dispatcher is not None:
            return
        self._stopping = False
        await self._sweep()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="lamina-jobs")

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop claiming, cancel the running handlers and give their jobs back."""
        self._stopping = True
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.cancel()
            with suppress(asyncio.CancelledError):
                await dispatcher
        for running in list(self._running.values()):
            running.stop(_Stop.SHUTDOWN)
        if self._executions:
            _, stuck = await asyncio.wait(set(self._executions), timeout=grace_s)
            # A handler that ignores its cancellation keeps its job until the lease ends;
            # then another server (or this one, restarted) runs it again.
            for execution in stuck:
                execution.cancel()
            if stuck:
                await asyncio.wait(stuck)

    # --- owners -----------------------------------------------------------------------

    async def submit(
        self,
        principal: Principal,
        kind: str,
        input: Mapping[str, Any],
        *,
        job_id: str | None = None,
    ) -> Job:
        """Queue a job of a registered kind, run later as ``principal``."""
        if kind not in self._kinds:
            raise ValueError(f"no handler for job kind {kind!r}")
        job = await self._store.create(principal, kind, input, job_id=job_id)
        self._wake.set()
        return job

    async def cancel(self, principal: Principal, job_id: str) -> Job | None:
        """Cancel the caller's job: a queued one ends at once, a running one is stopped
        (here at once, on another server at its next heartbeat). ``None`` when it is not
        the caller's job; raises :class:`JobAlreadyFinished` when it has ended."""
        seen = await self._store.get(principal, job_id)
        if seen is None:
            return None
        if seen.status.finished:
            raise JobAlreadyFinished(f"The job has already {_ended(seen.status)}.")
        job = await self._store.request_cancel(principal, job_id)
        if job is None:
            return None
        running = self._running.get(job.id)
        if running is not None and job.status is JobStatus.RUNNING:
            running.stop(_Stop.CANCEL)
        elif job.status is JobStatus.CANCELLED:
            await self._on_end(job)
        return job

    async def export_user(self, principal: Principal) -> list[dict[str, Any]]:
        return await self._store.export_user(principal)

    async def erase_user(self, principal: Principal) -> int:
        jobs: list[Job] = []
        cursor: str | None = None
        while True:
            page = await self._store.list_jobs(principal, limit=100, cursor=cursor)
            jobs.extend(page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        for job in jobs:
            running = self._running.get(job.id)
            if running is not None:
                running.stop(_Stop.LOST)
        erased = await self._store.erase_user(principal)
        for job in jobs:
            await self._on_end(job)
        return erased

    # --- the work ---------------------------------------------------------------------

    def _lease_until(self) -> datetime:
        return datetime.now(UTC) + self._lease

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_interval_s
        while True:
            # Cleared before looking: a job submitted while we look wakes the next wait.
            self._wake.clear()
            try:
                if loop.time() >= next_sweep:
                    await self._sweep()
                    next_sweep = loop.time() + self._sweep_interval_s
                while len(self._executions) < self._concurrency:
                    job = await self._store.claim(
                        self.worker_id, self._lease_until(), kinds=sorted(self._kinds)
                    )
                    if job is None:
                        break
                    self._spawn(job)
            except Exception:
                log.exception("claiming jobs failed; trying again shortly")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval_s)

    async def _sweep(self) -> None:
        changed = await self._store.requeue_abandoned(
            datetime.now(UTC), max_attempts=self._max_attempts
        )
        for job in changed:
            if job.status.finished:
                log.warning(
                    "job %s (%s) ended %s after its server died", job.id, job.kind, job.status
                )
                await self._on_end(job)
            else:
                log.info("job %s (%s) queued again: its server died", job.id, job.kind)
        if changed:
            self._wake.set()

    def _spawn(self, job: Job) -> None:
        execution = asyncio.create_task(self._guarded(job), name=f"job-{job.id}")
        self._executions.add(execution)

        def done(task: asyncio.Task[None]) -> None:
            self._executions.discard(task)
            self._wake.set()

        execution.add_done_callback(done)

    async def _guarded(self, job: Job) -> None:
        try:
            await self._execute(job)
        except Exception:
            # Recording the outcome failed: the lease runs out and the job runs again.
            log.exception("job %s: recording its outcome failed", job.id)

    async def _execute(self, job: Job) -> None:
        if job.cancel_requested:  # asked while it was given back to the queue
            await self._end(job, JobStatus.CANCELLED)
            return
        if self._stopping:  # claimed just as the server began to stop
            await self._store.release(job.id, self.worker_id)
            return
        kind = self._kinds[job.kind]
        running = _Running(job)
        progress = _ProgressWriter(self._store, job.id, self.worker_id)
        running.task = asyncio.create_task(
            kind.run(job, job.principal, progress, lambda: running.cancel_requested),
            name=f"job-{job.id}-handler",
        )
        self._running[job.id] = running
        heartbeat = asyncio.create_task(self._heartbeat(running), name=f"job-{job.id}-lease")
        try:
            await asyncio.wait({running.task})
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await progress.close()
            # Only this run's entry: the job may have been claimed again here meanwhile.
            if self._running.get(job.id) is running:
                del self._running[job.id]
        task = running.task
        if task.cancelled():
            match running.stop_reason:
                case _Stop.SHUTDOWN:
                    await self._store.release(job.id, self.worker_id)
                case _Stop.LOST:
                    log.info("job %s stopped: this server no longer holds it", job.id)
                case _Stop.CANCEL:
                    await self._end(job, JobStatus.CANCELLED)
                case None:
                    failure = JobFailure("interrupted", "The job was interrupted.")
                    await self._end(job, JobStatus.FAILED, error=failure)
            return
        exc = task.exception()
        if exc is not None:
            await self._end(job, JobStatus.FAILED, error=_failure(job, exc))
            return
        result = task.result()
        try:
            # The store keeps JSON: a handler's result that is not JSON is its bug.
            json.dumps(dict(result))
        except (TypeError, ValueError) as bad:
            await self._end(job, JobStatus.FAILED, error=_failure(job, bad))
            return
        await self._end(job, JobStatus.SUCCEEDED, result=result)

    async def _end(
        self,
        job: Job,
        status: JobStatus,
        *,
        result: Mapping[str, Any] | None = None,
        error: JobFailure | None = None,
    ) -> None:
        ended = await self._store.finish(job.id, self.worker_id, status, result=result, error=error)
        if ended is not None:
            await self._on_end(ended)

    async def _heartbeat(self, running: _Running) -> None:
        interval = self._lease.total_seconds() / 3
        job_id = running.job.id
        while True:
            await asyncio.sleep(interval)
            try:
                seen = await self._store.heartbeat(job_id, self.worker_id, self._lease_until())
            except Exception:
                log.warning("could not renew the lease of job %s", job_id)
                continue
            if seen is None:
                running.stop(_Stop.LOST)
                return
            if seen.cancel_requested:
                running.stop(_Stop.CANCEL)
                return

    async def _on_end(self, job: Job) -> None:
        kind = self._kinds.get(job.kind)
        if kind is None or kind.on_end is None:
            return
        try:
            await kind.on_end(job)
        except Exception:
            log.exception("cleaning up after job %s failed", job.id)


def _ended(status: JobStatus) -> str:
    return {JobStatus.SUCCEEDED: "succeeded", JobStatus.FAILED: "failed"}.get(
        status, "been cancelled"
    )


def _failure(job: Job, exc: BaseException) -> JobFailure:
    if isinstance(exc, JobFailed):
        return JobFailure(exc.code, exc.message)
    if isinstance(exc, IntelligenceError):
        code = getattr(exc, "code", None)
        if not isinstance(code, str):
            code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
        return JobFailure(code, exc.message)
    log.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
    return JobFailure("internal_error", "The job failed unexpectedly; quote its id to support.")


# --- ingestion ----------------------------------------------------------------------

UploadedFile = tuple[str, BinaryIO]
"""An uploaded file: its name (a path relative to the corpus, '/'-separated) and content."""

AclTenants = Callable[[str], frozenset[str]]
"""The tenants an ACL file's text grants access in; raises the knowledge layer's
``KnowledgeError`` when the text is no valid ACL file."""

_FILES = "files"
_ACL = "acl.yaml"


class IngestJobs:
    """Ingestion of uploaded files as jobs (kind ``ingest``).

    The files wait in ``<uploads>/<job id>/`` until the job ends (or is erased). Their
    ACL file may grant access in the uploader's tenant only; without one, only the
    uploader may read what was indexed."""

    def __init__(
        self, runner: JobRunner, ingestor: Ingestor, uploads: Path, acl_tenants: AclTenants
    ) -> None:
        self._runner = runner
        self._ingestor = ingestor
        self._uploads = uploads
        self._acl_tenants = acl_tenants
        runner.register(INGEST_JOB, self.run, on_end=self.discard)

    def folder(self, job_id: str) -> Path:
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self._uploads / job_id

    async def submit(
        self, principal: Principal, files: Sequence[UploadedFile], acl: BinaryIO | None
    ) -> Job:
        """Stage the files and queue their ingestion; raises :class:`InvalidUpload`."""
        if not files:
            raise InvalidUpload("Upload at least one file.")
        names = [_relative_name(name) for name, _ in files]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidUpload(f"Files uploaded twice: {', '.join(duplicates)}.")
        folders = {
            "/".join(name.split("/")[:end])
            for name in names
            for end in range(1, name.count("/") + 1)
        }
        clashing = sorted(folders.intersection(names))
        if clashing:
            raise InvalidUpload(
                f"{', '.join(map(repr, clashing))} is uploaded both as a file and as a folder."
            )
        if acl is None:
            acl_text = _private_acl(principal)
        else:
            # Read one byte past the cap: a larger file is refused without reading it all.
            raw = await asyncio.to_thread(acl.read, MAX_ACL_BYTES + 1)
            if len(raw) > MAX_ACL_BYTES:
                raise InvalidUpload(f"The ACL file is larger than {MAX_ACL_BYTES} bytes.")
            try:
                acl_text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidUpload("The ACL file is not UTF-8 text.") from None
        await self._check_acl(acl_text, principal)
        job_id = uuid.uuid4().hex
        folder = self.folder(job_id)
        staged = [(name, stream) for name, (_, stream) in zip(names, files, strict=True)]
        try:
            await asyncio.to_thread(_stage, folder, staged, acl_text)
            return await self._runner.submit(
                principal,
                INGEST_JOB,
                {"files": names, "acl": "uploaded" if acl is not None else "private"},
                job_id=job_id,
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise

    async def run(
        self,
        job: Job,
        principal: Principal,
        report_progress: ReportProgress,
        cancelled: Callable[[], bool],
    ) -> Mapping[str, Any]:
        folder = self.folder(job.id)
        corpus, acl = folder / _FILES, folder / _ACL
        try:
            acl_text = await asyncio.to_thread(acl.read_text, encoding="utf-8")
        except FileNotFoundError:
            raise JobFailed(
                "upload_missing", "The uploaded files are no longer there; upload them again."
            ) from None
        # Checked again: the job runs as the identity it was created with.
        await self._check_acl(acl_text, principal)

        def advance(name: str, done: int, total: int) -> None:
            report_progress(done / total if total else None, name)

        report_progress(0.0, "Reading the uploaded files")
        try:
            # Uploads live in a namespace of their uploader's: one can never replace or
            # delete a document of the tenant's corpus, or someone else's upload.
            report = await self._ingestor.ingest(
                corpus,
                acl_file=acl,
                progress=advance,
                source_prefix=upload_source_prefix(principal),
            )
        except KnowledgeError as exc:
            raise JobFailed("ingestion_failed", str(exc)) from exc
        return dataclasses.asdict(report)

    async def discard(self, job: Job) -> None:
        await asyncio.to_thread(shutil.rmtree, self.folder(job.id), True)

    async def _check_acl(self, text: str, principal: Principal) -> None:
        try:
            # Parsing YAML is CPU work: off the event loop, which serves every request.
            tenants = await asyncio.to_thread(self._acl_tenants, text)
        except KnowledgeError as exc:
            raise InvalidUpload(f"The ACL file is not valid: {exc}") from None
        foreign = sorted(tenants - {principal.tenant_id})
        if foreign:
            raise InvalidUpload(
                f"The ACL file grants access in tenant {', '.join(map(repr, foreign))}; "
                f"uploads are indexed in your own tenant ({principal.tenant_id!r}) only."
            )


MAX_ACL_BYTES = 1024 * 1024
"""An ACL file is rules, not content: a megabyte is far more than any needs."""


def upload_source_prefix(principal: Principal) -> str:
    """Where a user's uploads live in the index: ``upload://<user>/``, which no path of a
    corpus folder can spell (a relative path never holds ``//``)."""
    return f"upload://{principal.user_id}/"


def _relative_name(name: str) -> str:
    parts = name.replace("\\", "/").split("/")
    unusable = (
        not name
        or len(name) > 512
        or len(parts) > 16
        or any(
            part in ("", ".", "..") or part.startswith(".") or any(ord(c) < 32 for c in part)
            for part in parts
        )
    )
    # A name part longer than file systems allow is refused here, not by the disk.
    unusable = unusable or any(len(part.encode()) > 255 for part in parts)
    if unusable:
        raise InvalidUpload(
            f"{name!r} is not a usable file name: give a relative path of visible names, "
            "such as 'policies/leave.md'."
        )
    return "/".join(parts)


def _private_acl(principal: Principal) -> str:
    # JSON is YAML: and no user id can break out of a JSON string.
    return json.dumps(
        {"tenant": principal.tenant_id, "rules": [{"match": "**", "users": [principal.user_id]}]}
    )


def _stage(folder: Path, files: Sequence[UploadedFile], acl_text: str) -> None:
    """Write an upload where its job finds it. Blocking: runs in a worker thread."""
    corpus = folder / _FILES
    corpus.mkdir(parents=True)
    for name, stream in files:
        target = corpus / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as out:
            shutil.copyfileobj(stream, out)
    (folder / _ACL).write_text(acl_text, encoding="utf-8")


# --- agent tasks --------------------------------------------------------------------

_TURN_RESULT = TypeAdapter(TurnResult)


class AgentTasks:
    """Long turns of the assistant as jobs (kind ``agent_task``).

    The job id is the turn's idempotency key: a task run again after a crash continues
    the turn it started (or replays its answer) instead of asking twice."""

    def __init__(
        self,
        runner: JobRunner,
        assistant: Assistant,
        *,
        wait_for_running_turn_s: float = 300.0,
        retry_interval_s: float = 1.0,
    ) -> None:
        self._runner = runner
        self._assistant = assistant
        self._wait_s = wait_for_running_turn_s
        self._retry_s = retry_interval_s
        runner.register(AGENT_TASK_JOB, self.run)

    async def submit(
        self, principal: Principal, message: str, conversation_id: str | None = None
    ) -> Job:
        return await self._runner.submit(
            principal, AGENT_TASK_JOB, {"message": message, "conversation_id": conversation_id}
        )

    async def run(
        self,
        job: Job,
        principal: Principal,
        report_progress: ReportProgress,
        cancelled: Callable[[], bool],
    ) -> Mapping[str, Any]:
        request = TurnRequest(
            message=str(job.input["message"]),
            conversation_id=job.input.get("conversation_id"),
            correlation_id=job.id,
            idempotency_key=job.id,
        )
        started = await self._start(request, principal, report_progress)
        report_progress(None, "Planning")
        result = await collect_turn(_reporting(started, report_progress))
        answer: dict[str, Any] = _TURN_RESULT.dump_python(result, mode="json")
        return answer

    async def _start(
        self, request: TurnRequest, principal: Principal, report_progress: ReportProgress
    ) -> StartedTurn:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while True:
            try:
                return await self._assistant.start_turn(request, principal)
            except TurnInProgress:
                # The run before a crash still holds the turn until its lease ends.
                if loop.time() >= deadline:
                    raise
                report_progress(None, "Waiting for an earlier run of this task to end")
                await asyncio.sleep(self._retry_s)


async def _reporting(
    started: StartedTurn, report_progress: ReportProgress
) -> AsyncGenerator[TurnEvent, None]:
    """The turn's events, each step and the answer reported as progress on the way."""
    answering = False
    async with aclosing(started.events) as events:
        async for event in events:
            if isinstance(event, StepEvent) and event.outcome is None:
                report_progress(None, event.step.description)
            elif isinstance(event, AnswerDelta) and not answering:
                answering = True
                report_progress(None, "Answering")
            yield event
