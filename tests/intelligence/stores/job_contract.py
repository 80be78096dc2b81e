"""The contract every JobStore adapter passes.

Mix :class:`JobStoreContract` into a test class that provides a ``store`` fixture: a
**fresh, empty**, opened store per test, built with :data:`RETENTION`
(``requeue_abandoned`` and ``purge_expired`` act on all tenants, and what they return is
asserted). The suite speaks to the store through the ``JobStore``
protocol only, so it runs unchanged against every backend.

Clock assumptions: leases are judged against the ``now`` the caller passes (the suite
passes instants far in the future instead of waiting); datetimes an adapter returns are
timezone-aware.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from intelligence.contracts import (
    AGENT_TASK_JOB,
    INGEST_JOB,
    Job,
    JobFailure,
    JobStatus,
    JobStore,
    Principal,
    RetentionPolicy,
)

ALICE = Principal("contoso", "alice", groups=frozenset({"hr"}), roles=frozenset({"Lamina.User"}))
BOB = Principal("contoso", "bob")
ALICE_ELSEWHERE = Principal("fabrikam", "alice")

RETENTION = RetentionPolicy(tenants={"fabrikam": 3600.0})
"""The retention policy every adapter's ``store`` fixture is built with: finished jobs of
tenant ``fabrikam`` are kept an hour; the others forever."""

KINDS = (INGEST_JOB, AGENT_TASK_JOB)
LATER = timedelta(minutes=5)


def _soon() -> datetime:
    return datetime.now(UTC) + LATER


def _long_after() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


async def _claimed(store: JobStore) -> Job:
    """A new ingestion job of Alice's, claimed by worker ``w1`` (the store held no other)."""
    await store.create(ALICE, INGEST_JOB, {})
    claimed = await store.claim("w1", _soon(), kinds=KINDS)
    assert claimed is not None
    return claimed


class JobStoreContract:
    # --- owners ---------------------------------------------------------------------

    async def test_a_new_job_is_queued_with_its_input_and_the_principal_it_runs_as(
        self, store: JobStore
    ) -> None:
        job = await store.create(ALICE, AGENT_TASK_JOB, {"message": "Summarise", "n": [1, 2]})
        assert job.status is JobStatus.QUEUED
        assert (job.kind, job.tenant_id, job.user_id) == (AGENT_TASK_JOB, "contoso", "alice")
        assert dict(job.input) == {"message": "Summarise", "n": [1, 2]}
        assert job.principal == ALICE
        assert job.created_at.tzinfo is not None
        assert (job.progress, job.result, job.error, job.cancel_requested) == (
            None,
            None,
            None,
            False,
        )
        assert await store.get(ALICE, job.id) == job

    async def test_a_job_may_be_created_under_a_given_id(self, store: JobStore) -> None:
        job = await store.create(ALICE, INGEST_JOB, {}, job_id="a1b2c3")
        assert job.id == "a1b2c3"

    async def test_another_users_job_does_not_exist_for_the_caller(self, store: JobStore) -> None:
        job = await store.create(ALICE, INGEST_JOB, {"files": ["a.md"]})
        assert await store.get(BOB, job.id) is None
        assert await store.get(ALICE_ELSEWHERE, job.id) is None
        assert (await store.list_jobs(BOB)).items == ()
        assert await store.request_cancel(BOB, job.id) is None
        assert (await store.get(ALICE, job.id)) == job  # untouched by Bob's cancel

    async def test_jobs_are_listed_newest_first_in_pages(self, store: JobStore) -> None:
        made = [await store.create(ALICE, AGENT_TASK_JOB, {"n": n}) for n in range(5)]
        await store.create(BOB, AGENT_TASK_JOB, {"n": "bob"})
        first = await store.list_jobs(ALICE, limit=3)
        assert [j.input["n"] for j in first.items] == [4, 3, 2]
        assert first.next_cursor is not None
        rest = await store.list_jobs(ALICE, limit=3, cursor=first.next_cursor)
        assert [j.input["n"] for j in rest.items] == [1, 0]
        assert rest.next_cursor is None
        assert {j.id for j in (*first.items, *rest.items)} == {j.id for j in made}

    async def test_a_bad_cursor_is_a_value_error(self, store: JobStore) -> None:
        with pytest.raises(ValueError, match="cursor"):
            await store.list_jobs(ALICE, cursor="not-a-cursor")

    # --- claims and leases ------------------------------------------------------------

    async def test_a_claim_takes_the_oldest_queued_job_of_the_kinds_asked(
        self, store: JobStore
    ) -> None:
        ingest = await store.create(ALICE, INGEST_JOB, {})
        task = await store.create(BOB, AGENT_TASK_JOB, {})
        claimed = await store.claim("w1", _soon(), kinds=[AGENT_TASK_JOB])
        assert claimed is not None
        assert claimed.id == task.id
        assert (claimed.status, claimed.worker_id, claimed.attempts) == (
            JobStatus.RUNNING,
            "w1",
            1,
        )
        assert claimed.lease_until is not None
        assert claimed.principal == BOB
        again = await store.claim("w1", _soon(), kinds=KINDS)
        assert again is not None
        assert again.id == ingest.id
        assert await store.claim("w1", _soon(), kinds=KINDS) is None

    async def test_of_racing_claims_for_one_job_exactly_one_wins(self, store: JobStore) -> None:
        job = await store.create(ALICE, INGEST_JOB, {})
        claims = await asyncio.gather(
            *(store.claim(f"w{n}", _soon(), kinds=KINDS) for n in range(8))
        )
        won = [c for c in claims if c is not None]
        assert len(won) == 1
        assert won[0].id == job.id

    async def test_a_heartbeat_extends_the_lease_of_the_worker_holding_the_job(
        self, store: JobStore
    ) -> None:
        claimed = await _claimed(store)
        later = _long_after()
        seen = await store.heartbeat(claimed.id, "w1", later)
        assert seen is not None
        assert seen.lease_until is not None
        assert abs(seen.lease_until - later) < timedelta(milliseconds=1)
        assert await store.heartbeat(claimed.id, "someone-else", later) is None

    async def test_progress_is_recorded_for_the_worker_holding_the_job(
        self, store: JobStore
    ) -> None:
        claimed = await _claimed(store)
        assert await store.set_progress(claimed.id, "w1", 0.5, "handbook/leave.md")
        assert not await store.set_progress(claimed.id, "w2", 0.9, "not mine")
        seen = await store.get(ALICE, claimed.id)
        assert seen is not None
        assert (seen.progress, seen.progress_message) == (0.5, "handbook/leave.md")

    async def test_finishing_records_the_result_once(self, store: JobStore) -> None:
        claimed = await _claimed(store)
        report = {"files_seen": 2, "files_indexed": 1, "skipped": [{"path": "x", "reason": "y"}]}
        ended = await store.finish(claimed.id, "w1", JobStatus.SUCCEEDED, result=report)
        assert ended is not None
        assert ended.status is JobStatus.SUCCEEDED
        assert ended.result == report
        assert ended.progress == 1.0
        assert ended.lease_until is None
        # Ended: no worker holds it any more.
        assert await store.finish(claimed.id, "w1", JobStatus.FAILED) is None
        assert await store.heartbeat(claimed.id, "w1", _soon()) is None
        assert await store.get(ALICE, claimed.id) == ended

    async def test_a_failure_keeps_its_code_and_message(self, store: JobStore) -> None:
        claimed = await _claimed(store)
        failure = JobFailure("ingestion_failed", "ACL file not found: acl.yaml")
        ended = await store.finish(claimed.id, "w1", JobStatus.FAILED, error=failure)
        assert ended is not None
        assert (ended.status, ended.error, ended.result) == (JobStatus.FAILED, failure, None)

    async def test_a_released_job_is_queued_again_without_counting_the_attempt(
        self, store: JobStore
    ) -> None:
        claimed = await _claimed(store)
        assert await store.release(claimed.id, "w1")
        seen = await store.get(ALICE, claimed.id)
        assert seen is not None
        assert (seen.status, seen.attempts, seen.worker_id) == (JobStatus.QUEUED, 0, None)
        assert not await store.release(claimed.id, "w1")

    # --- cancellation -------------------------------------------------------------------

    async def test_cancelling_a_queued_job_ends_it_at_once(self, store: JobStore) -> None:
        job = await store.create(ALICE, INGEST_JOB, {})
        cancelled = await store.request_cancel(ALICE, job.id)
        assert cancelled is not None
        assert (cancelled.status, cancelled.cancel_requested) == (JobStatus.CANCELLED, True)
        assert await store.claim("w1", _soon(), kinds=KINDS) is None

    async def test_cancelling_a_running_job_flags_it_for_its_worker(self, store: JobStore) -> None:
        claimed = await _claimed(store)
        flagged = await store.request_cancel(ALICE, claimed.id)
        assert flagged is not None
        assert (flagged.status, flagged.cancel_requested) == (JobStatus.RUNNING, True)
        beat = await store.heartbeat(claimed.id, "w1", _soon())
        assert beat is not None
        assert beat.cancel_requested
        ended = await store.finish(claimed.id, "w1", JobStatus.CANCELLED)
        assert ended is not None
        assert ended.status is JobStatus.CANCELLED

    async def test_cancelling_a_finished_job_changes_nothing(self, store: JobStore) -> None:
        claimed = await _claimed(store)
        ended = await store.finish(claimed.id, "w1", JobStatus.SUCCEEDED, result={"ok": True})
        seen = await store.request_cancel(ALICE, claimed.id)
        assert seen == ended

    # --- abandoned jobs ------------------------------------------------------------------

    async def test_only_jobs_whose_lease_ended_are_requeued(self, store: JobStore) -> None:
        await store.create(ALICE, INGEST_JOB, {"n": 1})
        await store.create(BOB, INGEST_JOB, {"n": 2})
        await store.create(ALICE_ELSEWHERE, INGEST_JOB, {"n": 3})  # stays queued
        short = await store.claim("dead", datetime.now(UTC) + timedelta(seconds=30), kinds=KINDS)
        long = await store.claim("alive", datetime.now(UTC) + timedelta(days=2), kinds=KINDS)
        assert short is not None
        assert long is not None
        assert await store.requeue_abandoned(datetime.now(UTC), max_attempts=3) == []
        requeued = await store.requeue_abandoned(_long_after(), max_attempts=3)
        assert [(j.id, j.status) for j in requeued] == [(short.id, JobStatus.QUEUED)]
        assert requeued[0].worker_id is None
        # The dead worker lost it; the live one keeps its own.
        assert await store.heartbeat(short.id, "dead", _soon()) is None
        assert await store.heartbeat(long.id, "alive", _soon()) is not None
        # Queued again, it is claimed again, its attempt counted.
        again = await store.claim("w2", _soon(), kinds=KINDS)
        assert again is not None
        assert (again.id, again.attempts) == (short.id, 2)

    async def test_a_job_abandoned_too_often_fails(self, store: JobStore) -> None:
        job = await store.create(ALICE, AGENT_TASK_JOB, {})
        for attempt in range(1, 3):
            claimed = await store.claim(f"w{attempt}", _soon(), kinds=KINDS)
            assert claimed is not None
            assert claimed.attempts == attempt
            await store.requeue_abandoned(_long_after(), max_attempts=2)
        seen = await store.get(ALICE, job.id)
        assert seen is not None
        assert seen.status is JobStatus.FAILED
        assert seen.error is not None
        assert seen.error.code == "abandoned"

    async def test_an_abandoned_job_with_a_cancel_request_ends_cancelled(
        self, store: JobStore
    ) -> None:
        await store.create(ALICE, INGEST_JOB, {})
        claimed = await store.claim("dead", _soon(), kinds=KINDS)
        assert claimed is not None
        await store.request_cancel(ALICE, claimed.id)
        [ended] = await store.requeue_abandoned(_long_after(), max_attempts=3)
        assert ended.status is JobStatus.CANCELLED

    # --- data-subject rights ---------------------------------------------------------------

    async def test_export_gives_the_callers_jobs_oldest_first(self, store: JobStore) -> None:
        first = await store.create(ALICE, INGEST_JOB, {"files": ["a.md"]})
        second = await store.create(ALICE, AGENT_TASK_JOB, {"message": "Hi"})
        await store.create(BOB, AGENT_TASK_JOB, {"message": "not Alice's"})
        exported = await store.export_user(ALICE)
        assert [e["id"] for e in exported] == [first.id, second.id]
        assert exported[1]["input"] == {"message": "Hi"}
        assert exported[1]["status"] == "queued"

    async def test_erasing_a_user_deletes_their_jobs_only(self, store: JobStore) -> None:
        await store.create(ALICE, INGEST_JOB, {})
        await store.create(ALICE, AGENT_TASK_JOB, {})
        claimed = await store.claim("w1", _soon(), kinds=KINDS)
        assert claimed is not None
        bobs = await store.create(BOB, AGENT_TASK_JOB, {})
        theirs = await store.create(ALICE_ELSEWHERE, AGENT_TASK_JOB, {})
        assert await store.erase_user(ALICE) == 2
        assert (await store.list_jobs(ALICE)).items == ()
        assert await store.export_user(ALICE) == []
        # A worker running an erased job learns it holds nothing any more.
        assert await store.heartbeat(claimed.id, "w1", _soon()) is None
        assert await store.get(BOB, bobs.id) is not None
        assert await store.get(ALICE_ELSEWHERE, theirs.id) is not None
        assert await store.erase_user(ALICE) == 0

    async def test_the_store_names_itself(self, store: JobStore) -> None:
        assert store.name == "jobs"

    # --- retention ------------------------------------------------------------------

    async def test_purge_deletes_only_finished_jobs_past_their_tenants_retention(
        self, store: JobStore
    ) -> None:
        done = await store.create(ALICE_ELSEWHERE, AGENT_TASK_JOB, {"message": "old question"})
        claimed = await store.claim("w1", _soon(), kinds=KINDS)
        assert claimed is not None and claimed.id == done.id
        await store.finish(done.id, "w1", JobStatus.SUCCEEDED, result={"answer": "old"})
        waiting = await store.create(ALICE_ELSEWHERE, AGENT_TASK_JOB, {})
        forever = await store.create(ALICE, AGENT_TASK_JOB, {})
        await store.request_cancel(ALICE, forever.id)  # finished: cancelled while queued

        # Within the hour: nothing goes.
        assert await store.purge_expired(datetime.now(UTC) + timedelta(minutes=30)) == 0
        # Past it: fabrikam's finished job goes; a queued job never goes, nor contoso's.
        assert await store.purge_expired(_long_after()) == 1
        assert await store.get(ALICE_ELSEWHERE, done.id) is None
        assert await store.get(ALICE_ELSEWHERE, waiting.id) is not None
        assert await store.get(ALICE, forever.id) is not None
