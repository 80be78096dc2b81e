"""Export and erasure across the stores that keep data about people: every holder is
gone through, a failing one is named (and never reported as done), and both actions
leave an audit record with counts and never the content."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from intelligence.contracts import Principal
from intelligence.personal_data import (
    ConversationData,
    PersonalData,
    PersonalDataIncomplete,
    json_ready,
)
from intelligence.stores.sqlite import SqliteConversationStore
from tests.fakes import InMemoryAuditLog
from tests.intelligence.stores.conversation_contract import finished_turn

ANN = Principal(tenant_id="contoso", user_id="ann")
BOB = Principal(tenant_id="contoso", user_id="bob")
SECRET = "my salary is 91,000"


@dataclass
class NotesHolder:
    """A store of notes per person, in memory."""

    name: str
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, principal: Principal, note: str) -> None:
        self.notes.setdefault((principal.tenant_id, principal.user_id), []).append(note)

    async def export_user(self, principal: Principal) -> Any:
        return list(self.notes.get((principal.tenant_id, principal.user_id), []))

    async def erase_user(self, principal: Principal) -> int:
        return len(self.notes.pop((principal.tenant_id, principal.user_id), []))


@dataclass
class UnreachableHolder:
    """A store whose backend cannot be reached."""

    name: str = "usage"

    async def export_user(self, principal: Principal) -> Any:
        raise ConnectionError(f"cannot reach the ledger holding {SECRET}")

    async def erase_user(self, principal: Principal) -> int:
        raise ConnectionError("cannot reach the ledger")


@pytest.fixture
def notes() -> NotesHolder:
    holder = NotesHolder("notes")
    holder.add(ANN, SECRET)
    holder.add(ANN, "second note")
    holder.add(BOB, "bob's note")
    return holder


async def test_export_gives_one_key_per_holder_and_audits_counts_only(notes: NotesHolder) -> None:
    other = NotesHolder("drafts")
    audit = InMemoryAuditLog()
    data = PersonalData([notes, other], audit)

    exported = await data.export(ANN, "cid-1")

    assert exported == {"notes": [SECRET, "second note"], "drafts": []}
    [record] = audit.records
    assert (record.event, record.tenant_id, record.user_id) == ("privacy.export", "contoso", "ann")
    assert record.correlation_id == "cid-1"
    assert record.data == {"counts": {"notes": 2, "drafts": 0}, "failed": []}
    assert SECRET not in repr(record)


async def test_erase_goes_through_every_holder_and_audits_the_counts(notes: NotesHolder) -> None:
    audit = InMemoryAuditLog()
    data = PersonalData([notes], audit)

    assert await data.erase(ANN, "cid-2") == {"notes": 2}

    assert await data.export(BOB, None) == {"notes": ["bob's note"]}
    assert await data.export(ANN, None) == {"notes": []}
    erased = [r for r in audit.records if r.event == "privacy.erase"]
    assert [r.data for r in erased] == [{"counts": {"notes": 2}, "failed": []}]
    assert erased[0].correlation_id == "cid-2"


async def test_a_failing_holder_does_not_stop_the_others_and_is_named(notes: NotesHolder) -> None:
    later = NotesHolder("drafts")
    later.add(ANN, "a draft")
    audit = InMemoryAuditLog()
    data = PersonalData([UnreachableHolder(), notes, later], audit)

    with pytest.raises(PersonalDataIncomplete) as raised:
        await data.erase(ANN, "cid-3")

    incomplete = raised.value
    assert incomplete.failed == ("usage",)
    assert incomplete.erased == {"notes": 2, "drafts": 1}
    assert "usage" in incomplete.message and "ask again" in incomplete.message
    assert notes.notes.get(("contoso", "ann")) is None
    assert later.notes.get(("contoso", "ann")) is None
    [record] = audit.records
    assert record.event == "privacy.erase"
    assert record.data == {"counts": {"notes": 2, "drafts": 1}, "failed": ["usage"]}


async def test_an_export_missing_a_store_is_refused_not_passed_off_as_complete(
    notes: NotesHolder,
) -> None:
    audit = InMemoryAuditLog()
    data = PersonalData([notes, UnreachableHolder()], audit)

    with pytest.raises(PersonalDataIncomplete) as raised:
        await data.export(ANN, None)

    assert raised.value.action == "export" and raised.value.failed == ("usage",)
    [record] = audit.records
    assert record.data == {"counts": {"notes": 2}, "failed": ["usage"]}
    assert SECRET not in repr(record)


def test_holders_need_distinct_names(notes: NotesHolder) -> None:
    with pytest.raises(ValueError, match="notes"):
        PersonalData([notes, NotesHolder("notes")], InMemoryAuditLog())
    assert PersonalData([notes, UnreachableHolder()], InMemoryAuditLog()).holders == (
        "notes",
        "usage",
    )


class Colour(StrEnum):
    RED = "red"


@dataclass(frozen=True)
class Value:
    at: datetime
    colour: Colour
    tags: frozenset[str]
    pairs: tuple[tuple[str, int], ...]


def test_json_ready_turns_stored_values_into_plain_json() -> None:
    at = datetime(2025, 5, 1, 12, 30, tzinfo=UTC)
    value = Value(at, Colour.RED, frozenset({"b", "a"}), (("x", 1),))
    exported = json_ready({"v": value, "n": None})
    assert sorted(exported["v"].pop("tags")) == ["a", "b"]
    assert exported == {
        "v": {"at": "2025-05-01T12:30:00Z", "colour": "red", "pairs": [["x", 1]]},
        "n": None,
    }
    with pytest.raises(TypeError):
        json_ready(object())


async def test_the_conversation_holder_exports_and_erases_the_callers_conversations(
    tmp_path: Path,
) -> None:
    store = SqliteConversationStore(tmp_path / "c.db")
    await store.open()
    try:
        mine = (await finished_turn(store, ANN, SECRET, "Noted.")).conversation
        theirs = (await finished_turn(store, BOB, "Leave?", "27 days")).conversation
        holder = ConversationData(store)

        [exported] = await holder.export_user(ANN)
        assert exported["conversation"]["id"] == mine.id
        assert [m["content"] for m in exported["messages"]] == [SECRET, "Noted."]

        assert await holder.erase_user(ANN) == 1
        assert await holder.export_user(ANN) == []
        assert await store.get(BOB, theirs.id) is not None
    finally:
        await store.close()


async def test_an_approval_export_never_hands_over_the_paused_turn_or_someone_elses_call() -> None:
    from intelligence.personal_data import ApprovalData
    from tools.contracts import ApprovalRequest, ApprovalStatus

    at = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    paused = {"question": SECRET, "rounds": [["passage only bob may read"]]}
    bobs = ApprovalRequest(
        id="a1",
        tool="refund",
        arguments={"order": "o-77", "amount": 910},
        summary="Refund 910 on o-77",
        tenant_id="contoso",
        requested_by="bob",
        created_at=at,
        expires_at=at,
        status=ApprovalStatus.EXECUTED,
        decided_by="ann",
        decided_at=at,
        reason="looks right",
        resume=paused,
        outcome={"ok": True, "output": {"refunded": 910}},
    )

    class Gate:
        async def approvals_of(self, caller: Principal) -> list[ApprovalRequest]:
            return [bobs]

    as_decider = await ApprovalData(Gate()).export_user(ANN)  # type: ignore[arg-type]
    assert as_decider == [
        {
            "id": "a1",
            "tool": "refund",
            "status": "executed",
            "decided_by": "ann",
            "decided_at": "2026-01-05T09:00:00Z",
            "reason": "looks right",
        }
    ]
    [as_requester] = await ApprovalData(Gate()).export_user(BOB)  # type: ignore[arg-type]
    assert as_requester["arguments"] == {"order": "o-77", "amount": 910}
    assert as_requester["outcome"] == {"ok": True, "output": {"refunded": 910}}
    assert as_requester["resume"] == {}
