from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import AGENT_TASK_JOB, JobStatus
from intelligence.stores.sqlite_jobs import SqliteJobStore
from tests.intelligence.stores.job_contract import ALICE, KINDS, RETENTION, JobStoreContract
from tests.support.lifecycle import opened


class TestSqliteJobStore(JobStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
        async with opened(SqliteJobStore(tmp_path / "jobs.db", retention=RETENTION)) as store:
            yield store


async def test_of_claims_racing_from_several_connections_exactly_one_wins(tmp_path: Path) -> None:
    """Two servers sharing the file: each has its own connection."""
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(opened(SqliteJobStore(tmp_path / "jobs.db")))
            for _ in range(4)
        ]
        for _ in range(5):
            job = await stores[0].create(ALICE, AGENT_TASK_JOB, {})
            lease = datetime.now(UTC) + timedelta(minutes=1)
            claims = await asyncio.gather(
                *(s.claim(f"w{n}", lease, kinds=KINDS) for n, s in enumerate(stores))
            )
            assert [c.id for c in claims if c is not None] == [job.id]


async def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    async with opened(SqliteJobStore(tmp_path / "jobs.db")) as first:
        job = await first.create(ALICE, AGENT_TASK_JOB, {"message": "Remember me"})
        claimed = await first.claim("w1", datetime.now(UTC) + timedelta(seconds=5), kinds=KINDS)
        assert claimed is not None

    async with opened(SqliteJobStore(tmp_path / "jobs.db")) as second:
        seen = await second.get(ALICE, job.id)
        assert seen is not None
        assert (seen.status, seen.worker_id, seen.principal) == (JobStatus.RUNNING, "w1", ALICE)
        [requeued] = await second.requeue_abandoned(
            datetime.now(UTC) + timedelta(minutes=1), max_attempts=3
        )
        assert requeued.id == job.id


async def test_a_naive_lease_is_refused(tmp_path: Path) -> None:
    async with opened(SqliteJobStore(tmp_path / "jobs.db")) as store:
        await store.create(ALICE, AGENT_TASK_JOB, {})
        with pytest.raises(ValueError, match="naive"):
            await store.claim("w1", datetime.now(), kinds=KINDS)
