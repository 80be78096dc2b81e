"""The contract every ConversationStore adapter passes (mix into a test class that
provides a ``store`` fixture)."""

from __future__ import annotations

import pytest

from intelligence.contracts import (
    Citation,
    ConversationStore,
    MessageStatus,
    Plan,
    PlanStep,
    Principal,
    StepKind,
)

ALICE = Principal("contoso", "alice")
BOB = Principal("contoso", "bob")
ALICE_ELSEWHERE = Principal("fabrikam", "alice")


class ConversationStoreContract:
    async def test_create_get_and_list_are_scoped_to_the_owner(
        self, store: ConversationStore
    ) -> None:
        mine = await store.create(ALICE, "Leave question")
        assert (await store.get(ALICE, mine.id)) == mine
        assert await store.get(BOB, mine.id) is None
        assert await store.get(ALICE_ELSEWHERE, mine.id) is None
        assert [c.id for c in (await store.list_conversations(ALICE)).items] == [mine.id]
        assert (await store.list_conversations(BOB)).items == ()

    async def test_only_the_owner_can_delete(self, store: ConversationStore) -> None:
        mine = await store.create(ALICE, "t")
        await store.add_message(ALICE, mine.id, "user", "hello")
        assert not await store.delete(BOB, mine.id)
        assert await store.get(ALICE, mine.id) is not None
        assert await store.delete(ALICE, mine.id)
        assert await store.get(ALICE, mine.id) is None
        assert await store.messages(ALICE, mine.id) == []
        assert not await store.delete(ALICE, mine.id)

    async def test_messages_in_order_with_a_window(self, store: ConversationStore) -> None:
        c = await store.create(ALICE, "t")
        for i in range(5):
            await store.add_message(ALICE, c.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
        assert [m.content for m in await store.messages(ALICE, c.id)] == [
            "m0",
            "m1",
            "m2",
            "m3",
            "m4",
        ]
        assert [m.content for m in await store.messages(ALICE, c.id, last=2)] == ["m3", "m4"]
        assert await store.messages(BOB, c.id) == []

    async def test_cannot_add_to_someone_elses_conversation(self, store: ConversationStore) -> None:
        c = await store.create(ALICE, "t")
        with pytest.raises(LookupError):
            await store.add_message(BOB, c.id, "user", "intrusion")
        assert await store.messages(ALICE, c.id) == []

    async def test_finish_message_stores_answer_citations_and_plan(
        self, store: ConversationStore
    ) -> None:
        c = await store.create(ALICE, "t")
        reply = await store.add_message(
            ALICE, c.id, "assistant", "", status=MessageStatus.STREAMING
        )
        citation = Citation(1, "ch1", "d1", "hr/leave.md", "Leave", "27 days", page=2)
        plan = Plan((PlanStep("s1", StepKind.RETRIEVE, "search", query="leave"),), "deterministic")
        await store.finish_message(BOB, reply.id, "hijack", MessageStatus.COMPLETE)
        await store.finish_message(
            ALICE, reply.id, "27 days [1]", MessageStatus.COMPLETE, citations=[citation], plan=plan
        )
        [stored] = await store.messages(ALICE, c.id)
        assert stored.content == "27 days [1]"
        assert stored.status is MessageStatus.COMPLETE
        assert stored.citations == (citation,)
        assert stored.plan == plan

    async def test_listing_pages_newest_first(self, store: ConversationStore) -> None:
        created = [await store.create(ALICE, f"c{i}") for i in range(5)]
        await store.add_message(ALICE, created[0].id, "user", "bump")  # now the newest
        first = await store.list_conversations(ALICE, limit=2)
        assert len(first.items) == 2
        assert first.items[0].id == created[0].id
        assert first.next_cursor is not None
        second = await store.list_conversations(ALICE, limit=2, cursor=first.next_cursor)
        third = await store.list_conversations(ALICE, limit=2, cursor=second.next_cursor)
        seen = [c.id for page in (first, second, third) for c in page.items]
        assert sorted(seen) == sorted(c.id for c in created)
        assert len(set(seen)) == 5
        assert third.next_cursor is None

    async def test_a_malformed_cursor_is_a_value_error(self, store: ConversationStore) -> None:
        with pytest.raises(ValueError, match="cursor"):
            await store.list_conversations(ALICE, cursor="not-a-cursor")
