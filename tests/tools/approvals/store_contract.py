"""The contract every :class:`~tools.approvals.store.ApprovalStore` passes.

A test module subclasses :class:`ApprovalStoreContract` and provides a ``backend``
fixture (a :class:`~tests.tools.approvals.conftest.StoreBackend`); the ``store``
fixture opens one store on it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.tools.approvals.conftest import StoreBackend
from tools.approvals.gate import new_approval_id
from tools.approvals.store import (
    ERASED_USER,
    ApprovalChanges,
    ApprovalStore,
    DuplicateApprovalId,
)
from tools.contracts import ApprovalRequest, ApprovalStatus

T0 = datetime.now(UTC).replace(microsecond=0)

PENDING = ApprovalStatus.PENDING
APPROVED = ApprovalStatus.APPROVED
REJECTED = ApprovalStatus.REJECTED
EXPIRED = ApprovalStatus.EXPIRED
EXECUTED = ApprovalStatus.EXECUTED


def approval(
    *,
    tenant: str = "contoso",
    user: str = "adele",
    created_at: datetime = T0,
    ttl: timedelta = timedelta(hours=1),
    **fields: object,
) -> ApprovalRequest:
    made = ApprovalRequest(
        id=new_approval_id(),
        tool="wipe_laptop",
        arguments={"serial": "PF3ABCD1", "options": {"keep": [], "wipe": {}}},
        summary='wipe_laptop: Remotely wipe a laptop. (serial="PF3ABCD1")',
        tenant_id=tenant,
        requested_by=user,
        created_at=created_at,
        expires_at=created_at + ttl,
        resume={"conversation_id": "c1", "step": 2},
    )
    return replace(made, **fields)  # type: ignore[arg-type]


class ApprovalStoreContract:
    async def test_an_approval_comes_back_exactly_as_stored(self, store: ApprovalStore) -> None:
        stored = approval(
            arguments={
                "serial": "PF3ABCD1",
                "note": "Zürich — «urgent» ✓\nsecond line",
                "big": 2**62 + 1,
                "ratio": 0.1,
                "flags": [True, False, None],
                "empty_list": [],
                "empty_object": {},
                "nested": {"a": [{"b": [1, 2, {"c": "d"}]}]},
            },
            resume={"conversation_id": "c1", "plan": [{"step": 1}], "none": None},
        )
        await store.create(stored)

        assert await store.get(stored.id) == stored

    async def test_an_unknown_id_is_none(self, store: ApprovalStore) -> None:
        assert await store.get("apr_nothing") is None

    async def test_an_id_is_never_reused(self, store: ApprovalStore) -> None:
        first = approval()
        await store.create(first)

        with pytest.raises(DuplicateApprovalId):
            await store.create(replace(first, tenant_id="fabrikam", tool="other"))
        assert await store.get(first.id) == first

    async def test_a_transition_from_an_expected_status_applies_the_changes(
        self, store: ApprovalStore
    ) -> None:
        stored = approval()
        await store.create(stored)
        decided_at = T0 + timedelta(minutes=5)

        changed = await store.transition(
            stored.id,
            {PENDING},
            APPROVED,
            ApprovalChanges(
                arguments={"serial": "PF3ABCD2", "list": []},
                requested_arguments=stored.arguments,
                summary='wipe_laptop: Remotely wipe a laptop. (serial="PF3ABCD2")',
                decided_by="megan",
                decided_at=decided_at,
                reason="checked with the owner",
            ),
        )

        expected = replace(
            stored,
            status=APPROVED,
            arguments={"serial": "PF3ABCD2", "list": []},
            requested_arguments=stored.arguments,
            summary='wipe_laptop: Remotely wipe a laptop. (serial="PF3ABCD2")',
            decided_by="megan",
            decided_at=decided_at,
            reason="checked with the owner",
        )
        assert changed == expected
        assert await store.get(stored.id) == expected

    async def test_a_transition_changes_only_the_fields_given(self, store: ApprovalStore) -> None:
        stored = approval()
        await store.create(stored)

        changed = await store.transition(stored.id, {PENDING}, REJECTED)

        assert changed == replace(stored, status=REJECTED)

    @pytest.mark.parametrize("expected", [{APPROVED}, {EXECUTED, EXPIRED}, set()])
    async def test_a_transition_from_another_status_changes_nothing(
        self, store: ApprovalStore, expected: set[ApprovalStatus]
    ) -> None:
        stored = approval()
        await store.create(stored)

        refused = await store.transition(
            stored.id, expected, EXECUTED, ApprovalChanges(decided_by="megan")
        )

        assert refused is None
        assert await store.get(stored.id) == stored

    async def test_a_transition_of_an_unknown_approval_is_none(self, store: ApprovalStore) -> None:
        assert await store.transition("apr_nothing", {PENDING}, APPROVED) is None

    async def test_a_transition_can_require_the_approval_to_be_unexpired(
        self, store: ApprovalStore
    ) -> None:
        stored = approval(ttl=timedelta(minutes=10))
        await store.create(stored)

        at_expiry = await store.transition(
            stored.id, {PENDING}, APPROVED, unexpired_at=stored.expires_at
        )
        assert at_expiry is None, "expired at its expiry time"
        assert (await store.get(stored.id)) == stored

        just_before = stored.expires_at - timedelta(milliseconds=1)
        before = await store.transition(stored.id, {PENDING}, APPROVED, unexpired_at=just_before)
        assert before is not None
        assert before.status is APPROVED

    async def test_of_racing_transitions_exactly_one_wins(self, store: ApprovalStore) -> None:
        stored = approval()
        await store.create(stored)

        results = await asyncio.gather(
            *(
                store.transition(
                    stored.id, {PENDING}, APPROVED, ApprovalChanges(decided_by=f"u{i}")
                )
                for i in range(20)
            )
        )

        winners = [result for result in results if result is not None]
        assert len(winners) == 1
        assert await store.get(stored.id) == winners[0]

    async def test_two_store_objects_on_the_same_data_race_fairly(
        self, backend: StoreBackend
    ) -> None:
        one, other = await backend.open(), await backend.open()
        stored = approval(status=APPROVED)
        await one.create(stored)

        results = await asyncio.gather(
            *(
                (one if i % 2 else other).transition(stored.id, {APPROVED}, EXECUTED)
                for i in range(20)
            )
        )

        assert sum(result is not None for result in results) == 1
        assert (await one.get(stored.id)) == (await other.get(stored.id))

    async def test_another_store_object_sees_what_one_wrote(self, backend: StoreBackend) -> None:
        writer = await backend.open()
        stored = approval()
        await writer.create(stored)
        await writer.transition(stored.id, {PENDING}, APPROVED, ApprovalChanges(decided_by="x"))

        reader = await backend.open()

        assert await reader.get(stored.id) == replace(stored, status=APPROVED, decided_by="x")

    async def test_the_outcome_is_set_once_and_only_after_the_claim(
        self, store: ApprovalStore
    ) -> None:
        stored = approval(status=APPROVED)
        await store.create(stored)
        outcome = {"ok": True, "output": {"wiped": True, "log": []}}

        assert await store.set_outcome(stored.id, outcome) is None, "not claimed yet"
        await store.transition(stored.id, {APPROVED}, EXECUTED)
        recorded = await store.set_outcome(stored.id, outcome)
        again = await store.set_outcome(stored.id, {"ok": False, "error": "late"})

        assert recorded == replace(stored, status=EXECUTED, outcome=outcome)
        assert again is None
        assert await store.get(stored.id) == recorded

    async def test_the_outcome_of_an_unknown_approval_is_none(self, store: ApprovalStore) -> None:
        assert await store.set_outcome("apr_nothing", {"ok": True, "output": None}) is None

    async def test_pending_lists_a_tenant_oldest_first(self, store: ApprovalStore) -> None:
        newer = approval(user="adele", created_at=T0 + timedelta(seconds=2))
        older = approval(user="megan", created_at=T0 + timedelta(seconds=1))
        decided = approval(user="adele")
        elsewhere = approval(tenant="fabrikam", user="adele")
        for each in (newer, older, decided, elsewhere):
            await store.create(each)
        await store.transition(decided.id, {PENDING}, REJECTED)

        assert await store.list_pending("contoso") == [older, newer]
        assert await store.list_pending("contoso", requested_by="adele") == [newer]
        assert await store.list_pending("fabrikam") == [elsewhere]
        assert await store.list_pending("northwind") == []

    async def test_pending_includes_those_past_expiry_not_yet_marked(
        self, store: ApprovalStore
    ) -> None:
        old = approval(created_at=T0 - timedelta(hours=2), ttl=timedelta(hours=1))
        await store.create(old)

        assert await store.list_pending("contoso") == [old]

    async def test_an_approval_leaves_pending_with_its_transition_and_can_return(
        self, store: ApprovalStore
    ) -> None:
        stored = approval()
        await store.create(stored)

        await store.transition(stored.id, {PENDING}, EXPIRED)
        assert await store.list_pending("contoso") == []
        await store.transition(stored.id, {EXPIRED}, PENDING)
        assert await store.list_pending("contoso") == [stored]

    async def test_an_approval_created_decided_is_not_pending(self, store: ApprovalStore) -> None:
        await store.create(approval(status=REJECTED))

        assert await store.list_pending("contoso") == []

    # --- a person's approvals: export and erasure ---------------------------------------

    async def test_of_user_lists_what_they_requested_or_decided_oldest_first(
        self, store: ApprovalStore
    ) -> None:
        requested = approval(user="adele", created_at=T0 + timedelta(seconds=2))
        decided_for_megan = approval(user="megan", created_at=T0 + timedelta(seconds=1))
        unrelated = approval(user="megan")
        elsewhere = approval(tenant="fabrikam", user="adele")
        for each in (requested, decided_for_megan, unrelated, elsewhere):
            await store.create(each)
        decided = await store.transition(
            decided_for_megan.id, {PENDING}, APPROVED, ApprovalChanges(decided_by="adele")
        )

        assert await store.of_user("contoso", "adele") == [decided, requested]
        assert await store.of_user("fabrikam", "adele") == [elsewhere]
        assert await store.of_user("contoso", "nobody") == []

    async def test_forget_user_deletes_their_requests_in_any_status_and_unnames_their_decisions(
        self, store: ApprovalStore
    ) -> None:
        pending = approval(user="adele")
        executed = approval(user="adele", status=EXECUTED, decided_by="megan")
        theirs = approval(user="megan")
        created_decided = approval(user="megan", status=REJECTED, decided_by="adele")
        elsewhere = approval(tenant="fabrikam", user="adele")
        for each in (pending, executed, theirs, created_decided, elsewhere):
            await store.create(each)
        await store.transition(theirs.id, {PENDING}, APPROVED, ApprovalChanges(decided_by="adele"))

        assert await store.forget_user("contoso", "adele") == 4

        assert await store.get(pending.id) is None
        assert await store.get(executed.id) is None
        for kept in (theirs, created_decided):
            found = await store.get(kept.id)
            assert found is not None
            assert found.requested_by == "megan" and found.decided_by == ERASED_USER
        assert await store.get(elsewhere.id) == elsewhere
        assert await store.list_pending("contoso") == []
        assert await store.of_user("contoso", "adele") == []
        assert await store.forget_user("contoso", "adele") == 0, "a second erasure finds nothing"
        megans = {a.id for a in await store.of_user("contoso", "megan")}
        assert megans == {theirs.id, created_decided.id}
