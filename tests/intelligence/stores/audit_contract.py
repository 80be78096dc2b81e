"""The contract every AuditLog adapter passes.

Mix :class:`AuditLogContract` into a test class that provides these fixtures:

- ``log``: a **fresh, empty**, opened audit log;
- ``replicas``: three more opened instances over the same storage (other processes or
  replicas of the service), appending concurrently with ``log``;
- ``tamper``: a :class:`Tamperer` that edits the storage behind the adapter's back, as
  someone with write access to the file or account could.

The suite speaks to the log through the ``AuditLog`` protocol only, and checks the chain
with :mod:`intelligence.audit_chain`, so every backend is held to the same hashes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

import pytest

from intelligence.audit_chain import GENESIS, entry_hash, link
from intelligence.contracts import AuditEntry, AuditLog, AuditQuery, AuditRecord

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def record(
    event: str = "chat.turn",
    *,
    tenant: str = "contoso",
    user: str = "alice",
    minute: int = 0,
    correlation_id: str | None = None,
    **data: Any,
) -> AuditRecord:
    return AuditRecord(
        event=event,
        tenant_id=tenant,
        user_id=user,
        correlation_id=correlation_id,
        data=data or {"question": "How many leave days?", "sources": ["leave-0"]},
        at=T0 + timedelta(minutes=minute),
    )


class Tamperer(Protocol):
    """Edits a backend's stored entries directly, bypassing the adapter."""

    async def set(self, tenant: str, seq: int, field: str, value: Any) -> None:
        """Overwrite one stored field of entry ``seq``: ``event``, ``user_id``, ``at`` (a
        datetime), ``data`` (a dict) or ``prev_hash``."""
        ...

    async def remove(self, tenant: str, seq: int) -> None: ...

    async def swap(self, tenant: str, a: int, b: int) -> None:
        """Exchange the positions of two entries; each keeps its content and hashes."""
        ...

    async def put(self, entry: AuditEntry) -> None:
        """Store ``entry`` as it is, at its position (which must be free)."""
        ...


async def appended(log: AuditLog, count: int, *, tenant: str = "contoso") -> list[AuditEntry]:
    return [
        await log.append(record(tenant=tenant, minute=i, n=i, user=f"user-{i % 2}"))
        for i in range(count)
    ]


async def everything(log: AuditLog, tenant: str) -> list[AuditEntry]:
    return list((await log.query(AuditQuery(tenant, limit=1000))).entries)


class AuditLogContract:
    # --- the chain ---------------------------------------------------------------------

    async def test_each_tenant_has_its_own_chain_from_seq_1(self, log: AuditLog) -> None:
        first = await log.append(record(tenant="contoso"))
        other = await log.append(record(tenant="fabrikam"))
        second = await log.append(record(tenant="contoso", minute=1))
        assert (first.seq, first.prev_hash) == (1, GENESIS)
        assert (other.seq, other.prev_hash) == (1, GENESIS)
        assert (second.seq, second.prev_hash) == (2, first.hash)
        for entry in (first, other, second):
            assert entry.hash == entry_hash(entry.prev_hash, entry.record, entry.seq)
        assert await log.tenants() == ["contoso", "fabrikam"]

    async def test_an_entry_reads_back_exactly_as_appended(self, log: AuditLog) -> None:
        paris = timezone(timedelta(hours=2))
        written = await log.append(
            AuditRecord(
                event="tool.call",
                tenant_id="contoso",
                user_id="alice",
                correlation_id="c-1",
                data={
                    "tool": "lookup",
                    "arguments": {"id": 7, "tags": ("a", "b")},
                    "duration_ms": 12.5,
                    "ratio": 2.0,
                    "approval_id": None,
                    "ok": True,
                    "name": "Zoë ✓",
                },
                at=datetime(2025, 3, 1, 11, 0, 0, 123456, tzinfo=paris),
            )
        )
        # Stored form: UTC, JSON values (a tuple is a list, a whole float an integer).
        assert written.record.at == datetime(2025, 3, 1, 9, 0, 0, 123456, tzinfo=UTC)
        assert written.record.at.utcoffset() == timedelta(0)
        assert written.record.data["arguments"] == {"id": 7, "tags": ["a", "b"]}
        assert written.record.data["ratio"] == 2 and written.record.data["duration_ms"] == 12.5
        assert await everything(log, "contoso") == [written]

    async def test_values_json_cannot_hold_are_stored_as_text_and_verify(
        self, log: AuditLog
    ) -> None:
        # A model may write NaN into a tool's arguments: the call is audited all the same.
        written = await log.append(
            record(
                "tool.call",
                arguments={"amount": math.nan, "cap": math.inf, "floor": -math.inf},
                price=Decimal("1.10"),
                request=UUID(int=7),
            )
        )
        assert written.record.data == {
            "arguments": {"amount": "NaN", "cap": "Infinity", "floor": "-Infinity"},
            "price": "1.10",
            "request": "00000000-0000-0000-0000-000000000007",
        }
        later = await log.append(record(minute=1))
        assert await everything(log, "contoso") == [written, later]
        result = await log.verify("contoso")
        assert (result.intact, result.entries) == (True, 2), result.problem

    async def test_a_naive_time_is_refused_and_leaves_the_chain_alone(self, log: AuditLog) -> None:
        with pytest.raises(ValueError, match="timezone"):
            await log.append(dataclasses.replace(record(), at=datetime(2025, 1, 1)))
        entry = await log.append(record())
        assert entry.seq == 1
        assert (await log.verify("contoso")).intact

    async def test_an_intact_chain_verifies(self, log: AuditLog) -> None:
        await appended(log, 5)
        await appended(log, 2, tenant="fabrikam")
        result = await log.verify("contoso")
        assert (result.intact, result.entries, result.first_bad_seq) == (True, 5, None)
        assert (await log.verify("fabrikam")).entries == 2

    async def test_a_tenant_without_entries_verifies_empty(self, log: AuditLog) -> None:
        result = await log.verify("nobody")
        assert (result.intact, result.entries) == (True, 0)
        assert await log.tenants() == []

    # --- queries -----------------------------------------------------------------------

    async def test_queries_filter_by_event_user_correlation_and_time(self, log: AuditLog) -> None:
        await log.append(record("chat.turn", minute=0, correlation_id="c-1"))
        await log.append(record("tool.call", minute=1, user="bob", correlation_id="c-1"))
        await log.append(record("tool.approval_decided", minute=2, user="bob"))
        await log.append(record("toolbox.opened", minute=3))
        await log.append(record("tool", minute=4))
        await log.append(record("tool.call", tenant="fabrikam", minute=5))

        async def seqs(**filters: Any) -> list[int]:
            page = await log.query(AuditQuery("contoso", **filters))
            return [e.seq for e in page.entries]

        assert await seqs() == [1, 2, 3, 4, 5]
        assert await seqs(event="tool.call") == [2]
        assert await seqs(event="tool.") == [2, 3]  # a prefix: not "toolbox." nor "tool"
        assert await seqs(event="tool") == [5]
        assert await seqs(user_id="bob") == [2, 3]
        assert await seqs(correlation_id="c-1") == [1, 2]
        assert await seqs(since=T0 + timedelta(minutes=1)) == [2, 3, 4, 5]
        assert await seqs(until=T0 + timedelta(minutes=2)) == [1, 2]  # until is exclusive
        late = T0 + timedelta(minutes=2)
        assert await seqs(event="tool.", user_id="bob", since=late, until=T0 + HOUR) == [3]
        # Another time zone names the same instants.
        new_york = timezone(timedelta(hours=-5))
        assert await seqs(since=(T0 + timedelta(minutes=3)).astimezone(new_york)) == [4, 5]
        fabrikam = await log.query(AuditQuery("fabrikam"))
        assert [(e.seq, e.record.tenant_id) for e in fabrikam.entries] == [(1, "fabrikam")]

    async def test_pages_follow_the_chain(self, log: AuditLog) -> None:
        await appended(log, 7)
        seen: list[int] = []
        after = 0
        pages = 0
        while True:
            page = await log.query(AuditQuery("contoso", after_seq=after, limit=3))
            seen += [e.seq for e in page.entries]
            pages += 1
            if page.next_after_seq is None:
                break
            after = page.next_after_seq
        assert (seen, pages) == ([1, 2, 3, 4, 5, 6, 7], 3)
        exact = await log.query(AuditQuery("contoso", after_seq=4, limit=3))
        assert ([e.seq for e in exact.entries], exact.next_after_seq) == ([5, 6, 7], None)
        filtered = await log.query(AuditQuery("contoso", user_id="user-1", limit=2))
        assert ([e.seq for e in filtered.entries], filtered.next_after_seq) == ([2, 4], 4)

    # --- concurrency -------------------------------------------------------------------

    async def test_concurrent_appends_from_every_instance_never_fork_the_chain(
        self, log: AuditLog, replicas: list[AuditLog]
    ) -> None:
        writers = [log, *replicas]
        results = await asyncio.gather(
            *(
                writers[i % len(writers)].append(record(minute=i, n=i, tenant=tenant))
                for i in range(40)
                for tenant in ("contoso", "fabrikam")
            )
        )
        for tenant in ("contoso", "fabrikam"):
            mine = sorted((e for e in results if e.record.tenant_id == tenant), key=lambda e: e.seq)
            assert [e.seq for e in mine] == list(range(1, 41))
            assert sorted(e.record.data["n"] for e in mine) == list(range(40))
            result = await log.verify(tenant)
            assert (result.intact, result.entries) == (True, 40), result.problem
            assert await everything(replicas[0], tenant) == mine

    async def test_an_instance_links_after_entries_another_appended_since(
        self, log: AuditLog, replicas: list[AuditLog]
    ) -> None:
        await log.append(record(minute=0))
        await replicas[0].append(record(minute=1))
        await replicas[0].append(record(minute=2))
        late = await log.append(record(minute=3))
        assert late.seq == 4
        assert (await log.verify("contoso")).intact

    # --- tamper evidence ---------------------------------------------------------------

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("data", {"n": 2, "question": "something else"}),
            ("event", "chat.nothing_happened"),
            ("user_id", "mallory"),
            ("at", T0 - timedelta(days=1)),
        ],
    )
    async def test_the_chain_detects_a_modified_record(
        self, log: AuditLog, tamper: Tamperer, field: str, value: Any
    ) -> None:
        await appended(log, 5)
        await tamper.set("contoso", 3, field, value)
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 3)
        assert result.problem and "modified" in result.problem
        assert (await log.verify("fabrikam")).intact  # other chains are unaffected

    async def test_the_chain_detects_a_removed_entry(self, log: AuditLog, tamper: Tamperer) -> None:
        await appended(log, 5)
        await tamper.remove("contoso", 3)
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 3)
        assert result.problem and "missing" in result.problem
        # Removing the first entry does not hide the tenant from a verification of all.
        await tamper.remove("contoso", 1)
        assert "contoso" in await log.tenants()
        assert (await log.verify("contoso")).first_bad_seq == 1

    async def test_the_chain_detects_swapped_entries(self, log: AuditLog, tamper: Tamperer) -> None:
        await appended(log, 5)
        await tamper.swap("contoso", 2, 4)
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 2)

    async def test_the_chain_detects_a_wrong_link(self, log: AuditLog, tamper: Tamperer) -> None:
        entries = await appended(log, 3)
        await tamper.set("contoso", 2, "prev_hash", entries[2].hash)
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 2)
        assert result.problem and "link" in result.problem

    async def test_a_reinserted_entry_with_a_recomputed_hash_breaks_the_next_link(
        self, log: AuditLog, tamper: Tamperer
    ) -> None:
        entries = await appended(log, 4)
        await tamper.remove("contoso", 2)
        await tamper.put(link(record(minute=1, n=99), 2, entries[0].hash))
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 3)
