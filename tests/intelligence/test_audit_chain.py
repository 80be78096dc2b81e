"""The chain's canonical form, which auditors may recompute with their own tools, and the
in-memory audit log of the unit tests, held to the adapters' contract."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from intelligence.audit_chain import (
    GENESIS,
    canonical,
    entry_hash,
    event_bounds,
    link,
    verify_entries,
)
from intelligence.contracts import AuditEntry, AuditLog, AuditRecord
from tests.fakes import InMemoryAuditLog
from tests.intelligence.stores.audit_contract import AuditLogContract

RECORD = AuditRecord(
    event="tool.call",
    tenant_id="contoso",
    user_id="alice",
    correlation_id=None,
    data={"tool": "lookup", "args": ("Zoë", 2.0), "ms": 1.5},
    at=datetime(2025, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=1))),
)


def test_the_canonical_form_is_sorted_compact_ascii_json_in_utc() -> None:
    assert canonical(RECORD, 7) == (
        '{"at":"2025-03-01T09:00:00.000000+00:00","correlation_id":null,'
        '"data":{"args":["Zo\\u00eb",2],"ms":1.5,"tool":"lookup"},"event":"tool.call",'
        '"seq":7,"tenant_id":"contoso","user_id":"alice"}'
    )


def test_the_hash_is_sha256_of_the_previous_hash_and_the_canonical_form() -> None:
    expected = hashlib.sha256((GENESIS + canonical(RECORD, 1)).encode()).hexdigest()
    assert entry_hash(GENESIS, RECORD, 1) == expected
    assert entry_hash(GENESIS, RECORD, 2) != expected  # the position is part of it
    moved = dataclasses.replace(RECORD, at=RECORD.at.astimezone(UTC))
    assert entry_hash(GENESIS, moved, 1) == expected  # one instant, whatever its zone


def test_values_json_cannot_hold_are_hashed_as_the_text_stored_for_them() -> None:
    odd = dataclasses.replace(
        RECORD, data={"args": [math.nan, math.inf, -math.inf], "price": Decimal("0.10")}
    )
    assert '"data":{"args":["NaN","Infinity","-Infinity"],"price":"0.10"}' in canonical(odd, 1)
    stored = link(odd, 1, GENESIS)
    assert stored.record.data == {"args": ["NaN", "Infinity", "-Infinity"], "price": "0.10"}
    # What is read back (the text) hashes as what was appended (the numbers).
    assert entry_hash(GENESIS, stored.record, 1) == entry_hash(GENESIS, odd, 1) == stored.hash
    assert verify_entries("contoso", [stored]).intact


def test_event_bounds_cover_a_prefix_only() -> None:
    assert event_bounds("tool.call") is None
    low, high = event_bounds("tool.") or ("", "")
    inside = ["tool.call", "tool.approval_decided", "tool.z~"]
    outside = ["tool", "tool-x", "toolbox.open", "tools.call", "tom.call"]
    assert all(low <= event < high for event in inside)
    assert not any(low <= event < high for event in outside)


def test_verification_reports_the_first_bad_entry_only() -> None:
    first = AuditEntry(RECORD, 1, GENESIS, entry_hash(GENESIS, RECORD, 1))
    second = AuditEntry(RECORD, 2, first.hash, entry_hash(first.hash, RECORD, 2))
    broken = dataclasses.replace(second, hash="f" * 64)
    result = verify_entries("contoso", [first, broken, broken])
    assert (result.intact, result.entries, result.first_bad_seq) == (False, 2, 2)
    elsewhere = verify_entries("fabrikam", [first])
    assert (elsewhere.intact, elsewhere.first_bad_seq) == (False, 1)
    assert elsewhere.problem and "contoso" in elsewhere.problem


class InMemoryTamperer:
    def __init__(self, log: InMemoryAuditLog) -> None:
        self.log = log

    def _at(self, tenant: str, seq: int) -> int:
        return next(i for i, e in enumerate(self.log.chains[tenant]) if e.seq == seq)

    async def set(self, tenant: str, seq: int, field: str, value: Any) -> None:
        index = self._at(tenant, seq)
        entry = self.log.chains[tenant][index]
        if field == "prev_hash":
            changed = dataclasses.replace(entry, prev_hash=value)
        else:
            changed = dataclasses.replace(
                entry, record=dataclasses.replace(entry.record, **{field: value})
            )
        self.log.chains[tenant][index] = changed

    async def remove(self, tenant: str, seq: int) -> None:
        del self.log.chains[tenant][self._at(tenant, seq)]

    async def swap(self, tenant: str, a: int, b: int) -> None:
        chain = self.log.chains[tenant]
        i, j = self._at(tenant, a), self._at(tenant, b)
        chain[i], chain[j] = (
            dataclasses.replace(chain[j], seq=a),
            dataclasses.replace(chain[i], seq=b),
        )

    async def put(self, entry: AuditEntry) -> None:
        chain = self.log.chains[entry.record.tenant_id]
        chain.append(entry)
        chain.sort(key=lambda e: e.seq)


class TestInMemoryAuditLog(AuditLogContract):
    @pytest.fixture
    def log(self) -> InMemoryAuditLog:
        return InMemoryAuditLog()

    @pytest.fixture
    def replicas(self, log: InMemoryAuditLog) -> list[AuditLog]:
        return [log, log, log]  # one process: every caller shares the object

    @pytest.fixture
    def tamper(self, log: InMemoryAuditLog) -> InMemoryTamperer:
        return InMemoryTamperer(log)
