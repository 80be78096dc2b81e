"""Embedded SQLite adapter for the job store (its own file, ``<data_dir>/jobs.db``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from intelligence.contracts import (
    Job,
    JobFailure,
    JobPage,
    JobStatus,
    Principal,
    RetentionPolicy,
)
from intelligence.stores.sqlite_common import SerialisedSqliteStore, retention_scopes
from intelligence.stores.stamps import now_stamp, stamp

_KEEP_FOREVER = RetentionPolicy()

_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    input TEXT NOT NULL,
    progress REAL,
    progress_message TEXT,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_until TEXT
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (tenant_id, user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created_at, id);
"""

T = TypeVar("T")

_RUNNING = JobStatus.RUNNING.value
_QUEUED = JobStatus.QUEUED.value
_CANCELLED = JobStatus.CANCELLED.value
_FAILED = JobStatus.FAILED.value

ABANDONED = "abandoned"
"""The error code of a job given up after its process died ``max_attempts`` times."""


def _principal_json(principal: Principal) -> str:
    return json.dumps(
        {
            "tenant_id": principal.tenant_id,
            "user_id": principal.user_id,
            "groups": sorted(principal.groups),
            "roles": sorted(principal.roles),
            "name": principal.name,
            "scopes": sorted(principal.scopes),
            "auth_method": principal.auth_method,
        }
    )


def _principal(text: str) -> Principal:
    data = json.loads(text)
    return Principal(
        tenant_id=data["tenant_id"],
        user_id=data["user_id"],
        groups=frozenset(data["groups"]),
        roles=frozenset(data["roles"]),
        name=data["name"],
        scopes=frozenset(data["scopes"]),
        auth_method=data["auth_method"],
    )


def _job(row: aiosqlite.Row) -> Job:
    error = (
        JobFailure(row["error_code"], row["error_message"] or "")
        if row["error_code"] is not None
        else None
    )
    return Job(
        id=row["id"],
        kind=row["kind"],
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        status=JobStatus(row["status"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        input=json.loads(row["input"]),
        principal=_principal(row["principal"]),
        progress=row["progress"],
        progress_message=row["progress_message"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        error=error,
        cancel_requested=bool(row["cancel_requested"]),
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        lease_until=datetime.fromisoformat(row["lease_until"]) if row["lease_until"] else None,
    )


def export_view(job: Job) -> dict[str, Any]:
    """A job as a data-subject export gives it."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status.value,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "input": dict(job.input),
        "progress": job.progress,
        "progress_message": job.progress_message,
        "result": dict(job.result) if job.result is not None else None,
        "error": {"code": job.error.code, "message": job.error.message} if job.error else None,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "run_as": json.loads(_principal_json(job.principal)),
    }


async def _shielded(write: Coroutine[Any, Any, T]) -> T:
    """Run a write to its end even when its caller is cancelled (a job's heartbeat is,
    at any moment): a transaction cut off between BEGIN and COMMIT would leave the shared
    connection inside it."""
    return await asyncio.shield(write)


class SqliteJobStore(SerialisedSqliteStore):
    """Jobs in one SQLite file. Its operations take the connection one at a time, and
    writes are ``BEGIN IMMEDIATE`` transactions (see :class:`SerialisedSqliteStore`), so
    that of racing claims, from this process or another, exactly one wins."""

    _kind = "job store"

    def __init__(self, path: Path, *, retention: RetentionPolicy = _KEEP_FOREVER) -> None:
        super().__init__()
        self._path = path
        self._retention = retention

    @property
    def name(self) -> str:
        return "jobs"

    async def open(self) -> None:
        if self._db is not None:
            return
        await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
        # Autocommit: each write below opens its own IMMEDIATE transaction.
        db = await aiosqlite.connect(self._path, isolation_level=None, timeout=30.0)
        db.row_factory = aiosqlite.Row
        try:
            await db.executescript(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _update(self, query: str, params: Sequence[object]) -> list[Job]:
        """Run one ``UPDATE ... RETURNING *`` and return the rows it changed."""
        return await _shielded(self._returning(query, params))

    async def _returning(self, query: str, params: Sequence[object]) -> list[Job]:
        async with self._writing() as db, db.execute(query, params) as rows:
            return [_job(row) for row in await rows.fetchall()]

    # --- owners ---------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        kind: str,
        input: Mapping[str, Any],
        *,
        job_id: str | None = None,
    ) -> Job:
        return await _shielded(self._insert(principal, kind, input, job_id or uuid.uuid4().hex))

    async def _insert(
        self, principal: Principal, kind: str, input: Mapping[str, Any], job_id: str
    ) -> Job:
        now = now_stamp()
        async with self._writing() as db:
            await db.execute(
                "INSERT INTO jobs (id, kind, tenant_id, user_id, principal, status,"
                " created_at, updated_at, input) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    kind,
                    principal.tenant_id,
                    principal.user_id,
                    _principal_json(principal),
                    _QUEUED,
                    now,
                    now,
                    json.dumps(dict(input)),
                ),
            )
            async with db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as rows:
                row = await rows.fetchone()
        assert row is not None
        return _job(row)

    async def get(self, principal: Principal, job_id: str) -> Job | None:
        async with (
            self._reading() as db,
            db.execute(
                "SELECT * FROM jobs WHERE id = ? AND tenant_id = ? AND user_id = ?",
                (job_id, principal.tenant_id, principal.user_id),
            ) as rows,
        ):
            row = await rows.fetchone()
        return _job(row) if row else None

    async def list_jobs(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> JobPage:
        items, next_cursor = await self._newest_first(
            "jobs", "created_at", principal, limit=limit, cursor=cursor
        )
        return JobPage(tuple(_job(row) for row in items), next_cursor)

    async def request_cancel(self, principal: Principal, job_id: str) -> Job | None:
        # SET expressions all see the row as it was: a queued job ends at once, a
        # running one is flagged for its worker, a finished one stays as it is.
        changed = await self._update(
            "UPDATE jobs SET"
            " status = CASE WHEN status = ? THEN ? ELSE status END,"
            " cancel_requested = CASE WHEN status IN (?, ?) THEN 1 ELSE cancel_requested END,"
            " updated_at = CASE WHEN status IN (?, ?) THEN ? ELSE updated_at END"
            " WHERE id = ? AND tenant_id = ? AND user_id = ? RETURNING *",
            (
                _QUEUED,
                _CANCELLED,
                _QUEUED,
                _RUNNING,
                _QUEUED,
                _RUNNING,
                now_stamp(),
                job_id,
                principal.tenant_id,
                principal.user_id,
            ),
        )
        return changed[0] if changed else None

    # --- workers --------------------------------------------------------------------

    async def claim(
        self, worker_id: str, lease_until: datetime, *, kinds: Sequence[str]
    ) -> Job | None:
        if not kinds:
            return None
        marks = ", ".join("?" for _ in kinds)
        changed = await self._update(
            "UPDATE jobs SET status = ?, worker_id = ?, lease_until = ?,"
            " attempts = attempts + 1, updated_at = ?"
            " WHERE id = (SELECT id FROM jobs WHERE status = ?"
            f" AND kind IN ({marks}) ORDER BY created_at, id LIMIT 1)"
            " AND status = ? RETURNING *",
            (_RUNNING, worker_id, stamp(lease_until), now_stamp(), _QUEUED, *kinds, _QUEUED),
        )
        return changed[0] if changed else None

    async def heartbeat(self, job_id: str, worker_id: str, lease_until: datetime) -> Job | None:
        changed = await self._update(
            "UPDATE jobs SET lease_until = ?"
            " WHERE id = ? AND worker_id = ? AND status = ? RETURNING *",
            (stamp(lease_until), job_id, worker_id, _RUNNING),
        )
        return changed[0] if changed else None

    async def set_progress(
        self, job_id: str, worker_id: str, progress: float | None, message: str | None
    ) -> bool:
        changed = await self._update(
            "UPDATE jobs SET progress = ?, progress_message = ?, updated_at = ?"
            " WHERE id = ? AND worker_id = ? AND status = ? RETURNING *",
            (progress, message, now_stamp(), job_id, worker_id, _RUNNING),
        )
        return bool(changed)

    async def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        result: Mapping[str, Any] | None = None,
        error: JobFailure | None = None,
    ) -> Job | None:
        if not status.finished:
            raise ValueError(f"a job cannot finish as {status.value}")
        changed = await self._update(
            "UPDATE jobs SET status = ?, result = ?, error_code = ?, error_message = ?,"
            " progress = CASE WHEN ? THEN 1.0 ELSE progress END,"
            " updated_at = ?, worker_id = NULL, lease_until = NULL"
            " WHERE id = ? AND worker_id = ? AND status = ? RETURNING *",
            (
                status.value,
                json.dumps(dict(result)) if result is not None else None,
                error.code if error else None,
                error.message if error else None,
                status is JobStatus.SUCCEEDED,
                now_stamp(),
                job_id,
                worker_id,
                _RUNNING,
            ),
        )
        return changed[0] if changed else None

    async def release(self, job_id: str, worker_id: str) -> bool:
        changed = await self._update(
            "UPDATE jobs SET status = CASE WHEN cancel_requested THEN ? ELSE ? END,"
            " attempts = MAX(attempts - 1, 0), worker_id = NULL, lease_until = NULL,"
            " updated_at = ?"
            " WHERE id = ? AND worker_id = ? AND status = ? RETURNING *",
            (_CANCELLED, _QUEUED, now_stamp(), job_id, worker_id, _RUNNING),
        )
        return bool(changed)

    async def requeue_abandoned(self, now: datetime, *, max_attempts: int) -> list[Job]:
        message = (
            f"The job was interrupted {max_attempts} times (its server stopped while it ran) "
            "and was given up."
        )
        return await self._update(
            "UPDATE jobs SET"
            " status = CASE WHEN cancel_requested THEN ? WHEN attempts >= ? THEN ? ELSE ? END,"
            " error_code = CASE WHEN cancel_requested THEN NULL"
            "   WHEN attempts >= ? THEN ? ELSE NULL END,"
            " error_message = CASE WHEN cancel_requested THEN NULL"
            "   WHEN attempts >= ? THEN ? ELSE NULL END,"
            " progress = NULL, progress_message = NULL,"
            " worker_id = NULL, lease_until = NULL, updated_at = ?"
            " WHERE status = ? AND lease_until < ? RETURNING *",
            (
                _CANCELLED,
                max_attempts,
                _FAILED,
                _QUEUED,
                max_attempts,
                ABANDONED,
                max_attempts,
                message,
                now_stamp(),
                _RUNNING,
                stamp(now),
            ),
        )

    # --- data-subject rights ------------------------------------------------------------

    async def export_user(self, principal: Principal) -> list[dict[str, Any]]:
        async with (
            self._reading() as db,
            db.execute(
                "SELECT * FROM jobs WHERE tenant_id = ? AND user_id = ? ORDER BY created_at, id",
                (principal.tenant_id, principal.user_id),
            ) as rows,
        ):
            found = await rows.fetchall()
        return [export_view(_job(row)) for row in found]

    async def purge_expired(self, now: datetime) -> int:
        finished = [status.value for status in JobStatus if status.finished]
        purged = 0
        async with self._writing() as db:
            for where, params, seconds in retention_scopes(self._retention):
                cursor = await db.execute(
                    f"DELETE FROM jobs WHERE {where} AND updated_at < ?"
                    f" AND status IN ({', '.join('?' * len(finished))})",
                    [*params, stamp(now - timedelta(seconds=seconds)), *finished],
                )
                purged += cursor.rowcount
        return purged

    async def erase_user(self, principal: Principal) -> int:
        return await _shielded(self._delete_user(principal))

    async def _delete_user(self, principal: Principal) -> int:
        async with self._writing() as db:
            cursor = await db.execute(
                "DELETE FROM jobs WHERE tenant_id = ? AND user_id = ?",
                (principal.tenant_id, principal.user_id),
            )
        return cursor.rowcount
