"""The contract every ConversationStore adapter passes.

Mix :class:`ConversationStoreContract` into a test class that provides a ``store``
fixture. The suite speaks to the store through the ``ConversationStore`` protocol only,
so it runs unchanged against every backend. What the fixture must give:

- a **fresh, empty** store per test (``interrupt_abandoned`` and ``purge_expired`` act on
  all tenants, and their counts are asserted), already opened;
- built with :data:`RETENTION`: messages of tenant ``"ephemeral"`` are kept one second,
  every other tenant's forever.

Clock assumptions:

- Every datetime an adapter returns is timezone-aware; datetimes given to it
  (``lease_until``, ``now``) come back equal to within a millisecond.
- Leases are judged against the ``now`` the caller passes (the suite passes instants far
  in the future instead of waiting), never against the adapter's own clock.
- ``created_at`` is the adapter's wall clock in UTC at the time of the write; retention
  compares it with the ``now`` given to ``purge_expired`` (the suite sleeps 1.2 s, then
  passes the current time). A backend that expires items by itself (a TTL) may purge
  them before that call and return 0; the suite checks only what is left.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from inferencing.contracts import Usage
from intelligence.contracts import (
    AnswerRating,
    Citation,
    ConversationStore,
    ExplainedSource,
    MessageStatus,
    ModelCallRecord,
    NewTurn,
    Plan,
    PlanStep,
    PolicyDecision,
    Principal,
    RetentionPolicy,
    RetrievalCounts,
    StepKind,
    StepStatus,
    StepTiming,
    TurnExplanation,
    TurnRecord,
)

ALICE = Principal("contoso", "alice")
BOB = Principal("contoso", "bob")
ALICE_ELSEWHERE = Principal("fabrikam", "alice")
EVE = Principal("ephemeral", "eve")
"""A user of the tenant whose messages :data:`RETENTION` keeps one second."""

RETENTION = RetentionPolicy(tenants={"ephemeral": 1.0})
"""The retention policy every adapter's ``store`` fixture is built with."""

LEASE = timedelta(seconds=60)


def new_turn(
    question: str = "How many leave days do I have?",
    *,
    conversation_id: str | None = None,
    key: str | None = None,
    request_hash: str | None = None,
    lease_until: datetime | None = None,
    title: str = "Leave",
) -> NewTurn:
    return NewTurn(
        question=question,
        conversation_id=conversation_id,
        title=title,
        lease_until=lease_until or datetime.now(UTC) + LEASE,
        idempotency_key=key,
        request_hash=request_hash,
    )


def same_instant(a: datetime | None, b: datetime) -> bool:
    """Equal to within a millisecond (backends store time at different precisions)."""
    return a is not None and abs(a - b) < timedelta(milliseconds=1)


async def finished_turn(
    store: ConversationStore,
    principal: Principal,
    question: str,
    answer: str,
    *,
    conversation_id: str | None = None,
    key: str | None = None,
) -> TurnRecord:
    record = await store.begin_turn(
        principal, new_turn(question, conversation_id=conversation_id, key=key)
    )
    await store.finish_message(principal, record.reply.id, answer, MessageStatus.COMPLETE)
    return record


async def summary_of(
    store: ConversationStore, principal: Principal, conversation_id: str
) -> tuple[str, str | None]:
    """The running summary of a conversation the principal owns, and the message it runs to."""
    conversation = await store.get(principal, conversation_id)
    assert conversation is not None
    return conversation.summary, conversation.summary_through


def _explanation(record: TurnRecord) -> TurnExplanation:
    """An explanation with every kind of field set."""
    started = datetime(2030, 1, 2, 9, 30, tzinfo=UTC)
    search = PlanStep("s1", StepKind.RETRIEVE, "search", query="leave")
    filing = PlanStep(
        "s2", StepKind.CALL_TOOL, "file", tool="file_ticket", arguments={"n": [1, {"a": None}]}
    )
    plan = Plan((search, filing), "model:x", rationale="search, then file", usage=Usage(120, 30))
    steps = (
        StepTiming(
            "s1", StepKind.RETRIEVE, "search", started, 12.25, StepStatus.OK, "1 found", "leave"
        ),
        StepTiming("s2", StepKind.CALL_TOOL, "file", started, None, tool="file_ticket"),
    )
    sources = (
        ExplainedSource(
            "ch1", "d1", "hr/leave.md", "Leave", 0.83, "sqlite", 2, ref=1, cited=True, step_id="s1"
        ),
        ExplainedSource("ch2", "d2", "hr/faq.md", "FAQ", None, None),
    )
    calls = (
        ModelCallRecord("plan", None, None, None, 301.0, 120, 30),
        ModelCallRecord("answer", "primary", "gpt-4o", "2024-08-06", 410.5, 900, 40, "stop", 95.0),
    )
    return TurnExplanation(
        turn_id=record.reply.id,
        conversation_id=record.conversation.id,
        question=record.user_message.content,
        status=MessageStatus.COMPLETE,
        started_at=started,
        duration_ms=812.5,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        plan=plan,
        steps=steps,
        sources=sources,
        retrieval=RetrievalCounts(1, 3, 1, 2, ("sqlite",)),
        model_calls=calls,
        prompts={"answer": "grounded_answer@v1", "planner": "planner@v1"},
        policy=(
            PolicyDecision("input_safety", "passed"),
            PolicyDecision("tool_policy", "refused", "file_ticket"),
        ),
        time_to_first_token_ms=120.0,
    )


def _attempt(record: TurnRecord) -> str:
    assert record.attempt is not None, "a started turn names its run"
    return record.attempt


class ConversationStoreContract:
    # --- conversations and messages --------------------------------------------------

    async def test_a_conversation_is_got_and_listed_by_its_owner_only(
        self, store: ConversationStore
    ) -> None:
        mine = (await store.begin_turn(ALICE, new_turn(title="Leave question"))).conversation
        assert (await store.get(ALICE, mine.id)) == mine
        assert await store.get(BOB, mine.id) is None
        assert await store.get(ALICE_ELSEWHERE, mine.id) is None
        assert [c.id for c in (await store.list_conversations(ALICE)).items] == [mine.id]
        assert (await store.list_conversations(BOB)).items == ()

    async def test_only_the_owner_can_delete(self, store: ConversationStore) -> None:
        mine = (await store.begin_turn(ALICE, new_turn("hello"))).conversation
        assert not await store.delete(BOB, mine.id)
        assert await store.get(ALICE, mine.id) is not None
        assert await store.delete(ALICE, mine.id)
        assert await store.get(ALICE, mine.id) is None
        assert await store.messages(ALICE, mine.id) == []
        assert not await store.delete(ALICE, mine.id)

    async def test_only_the_owner_can_rename_and_the_order_stays(
        self, store: ConversationStore
    ) -> None:
        older = (await store.begin_turn(ALICE, new_turn("first", title="First"))).conversation
        newer = (await store.begin_turn(ALICE, new_turn("second", title="Second"))).conversation
        assert not await store.rename(BOB, older.id, "Stolen")
        assert not await store.rename(ALICE_ELSEWHERE, older.id, "Stolen")
        assert not await store.rename(ALICE, "0" * 32, "Nothing")
        assert await store.rename(ALICE, older.id, "Leave, 2025")
        renamed = await store.get(ALICE, older.id)
        assert renamed is not None and renamed.title == "Leave, 2025"
        assert renamed.updated_at == older.updated_at
        listed = (await store.list_conversations(ALICE)).items
        assert [(c.id, c.title) for c in listed] == [
            (newer.id, "Second"),
            (older.id, "Leave, 2025"),
        ]

    async def test_messages_in_order_with_a_window(self, store: ConversationStore) -> None:
        first = await finished_turn(store, ALICE, "m0", "m1")
        cid = first.conversation.id
        for i in (2, 4):
            await finished_turn(store, ALICE, f"m{i}", f"m{i + 1}", conversation_id=cid)
        stored = await store.messages(ALICE, cid)
        assert [(m.role, m.content) for m in stored] == [
            ("user", "m0"),
            ("assistant", "m1"),
            ("user", "m2"),
            ("assistant", "m3"),
            ("user", "m4"),
            ("assistant", "m5"),
        ]
        assert [m.content for m in await store.messages(ALICE, cid, last=2)] == ["m4", "m5"]
        # A window may begin with an answer whose question it leaves out.
        assert [m.content for m in await store.messages(ALICE, cid, last=3)] == [
            "m3",
            "m4",
            "m5",
        ]
        assert await store.messages(BOB, cid) == []

    async def test_finish_message_stores_answer_citations_and_plan(
        self, store: ConversationStore
    ) -> None:
        started = await store.begin_turn(ALICE, new_turn())
        reply = started.reply
        citation = Citation(1, "ch1", "d1", "hr/leave.md", "Leave", "27 days", page=2)
        plan = Plan((PlanStep("s1", StepKind.RETRIEVE, "search", query="leave"),), "deterministic")
        assert not await store.finish_message(BOB, reply.id, "hijack", MessageStatus.COMPLETE)
        assert await store.finish_message(
            ALICE, reply.id, "27 days [1]", MessageStatus.COMPLETE, citations=[citation], plan=plan
        )
        [_, stored] = await store.messages(ALICE, started.conversation.id)
        assert stored.id == reply.id
        assert stored.content == "27 days [1]"
        assert stored.status is MessageStatus.COMPLETE
        assert stored.citations == (citation,)
        assert stored.plan == plan

    async def test_an_explanation_round_trips_and_a_retry_clears_it(
        self, store: ConversationStore
    ) -> None:
        started = await store.begin_turn(ALICE, new_turn(key="k-explained"))
        explanation = _explanation(started)
        assert await store.finish_message(
            ALICE,
            started.reply.id,
            "27 days [1]",
            MessageStatus.COMPLETE,
            plan=explanation.plan,
            explanation=explanation,
        )
        [question, reply] = await store.messages(ALICE, started.conversation.id)
        assert reply.explanation == explanation
        assert question.explanation is None
        [exported] = await store.export_user(ALICE)
        assert exported.messages[-1].explanation == explanation

        # A failed run's explanation goes when the turn runs again.
        await store.finish_message(
            ALICE, started.reply.id, "", MessageStatus.FAILED, explanation=explanation
        )
        now = datetime.now(UTC)
        claimed = await store.retry_turn(ALICE, started.reply.id, now + LEASE, now=now)
        assert claimed is not None and claimed.reply.explanation is None

    async def test_a_rating_is_kept_once_per_answer_the_latest_replacing_the_earlier(
        self, store: ConversationStore
    ) -> None:
        record = await finished_turn(store, ALICE, "Leave?", "27 days")
        cid, rid = record.conversation.id, record.reply.id
        first = AnswerRating("negative", "Too short", datetime(2030, 1, 2, 9, 30, tzinfo=UTC))
        second = AnswerRating("positive", None, datetime(2030, 1, 2, 9, 31, tzinfo=UTC))

        before = await store.rate(ALICE, cid, rid, first)
        assert before is not None
        assert (before.id, before.content, before.feedback) == (rid, "27 days", None)
        replaced = await store.rate(ALICE, cid, rid, second)
        assert replaced is not None and replaced.feedback == first
        [question, reply] = await store.messages(ALICE, cid)
        assert (reply.feedback, question.feedback) == (second, None)
        [exported] = await store.export_user(ALICE)
        assert exported.messages[-1].feedback == second

        # Racing ratings: each sees the one before it, so exactly one saw none.
        again = [AnswerRating("negative", str(n), first.at) for n in range(5)]
        other = await finished_turn(store, ALICE, "Sick?", "10 days")
        seen = await asyncio.gather(
            *(store.rate(ALICE, other.conversation.id, other.reply.id, r) for r in again)
        )
        assert sum(s is not None and s.feedback is None for s in seen) == 1

    async def test_only_the_owners_finished_answer_can_be_rated(
        self, store: ConversationStore
    ) -> None:
        rating = AnswerRating("negative", None, datetime(2030, 1, 2, 9, 30, tzinfo=UTC))
        done = await finished_turn(store, ALICE, "Leave?", "27 days")
        cid, rid = done.conversation.id, done.reply.id
        elsewhere = await finished_turn(store, ALICE, "Sick?", "10 days")
        running = await store.begin_turn(ALICE, new_turn())
        paused = await store.begin_turn(ALICE, new_turn())
        await store.finish_message(ALICE, paused.reply.id, "", MessageStatus.AWAITING_APPROVAL)
        for principal, conversation_id, message_id in [
            (BOB, cid, rid),
            (ALICE_ELSEWHERE, cid, rid),
            (ALICE, cid, done.user_message.id),  # a question is not an answer
            (ALICE, elsewhere.conversation.id, rid),  # not in that conversation
            (ALICE, cid, "no-such-message"),
            (ALICE, running.conversation.id, running.reply.id),
            (ALICE, paused.conversation.id, paused.reply.id),
        ]:
            assert await store.rate(principal, conversation_id, message_id, rating) is None
        for record in (done, running, paused):
            messages = await store.messages(ALICE, record.conversation.id)
            assert all(m.feedback is None for m in messages)

        # Interrupted and failed answers can be rated; a retry's new answer starts unrated.
        await store.finish_message(ALICE, running.reply.id, "half", MessageStatus.INTERRUPTED)
        assert await store.rate(ALICE, running.conversation.id, running.reply.id, rating)
        now = datetime.now(UTC)
        claimed = await store.retry_turn(ALICE, running.reply.id, now + LEASE, now=now)
        assert claimed is not None and claimed.reply.feedback is None

    async def test_listing_pages_newest_first(self, store: ConversationStore) -> None:
        started = [await store.begin_turn(ALICE, new_turn(f"q{i}")) for i in range(5)]
        created = [t.conversation for t in started]
        # Continued: now the newest.
        await store.begin_turn(ALICE, new_turn("bump", conversation_id=created[0].id))
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

    async def test_paging_by_cursor_yields_every_conversation_exactly_once(
        self, store: ConversationStore
    ) -> None:
        # Started in quick succession: equal timestamps must not lose or repeat one.
        started = [await store.begin_turn(ALICE, new_turn(f"q{i}")) for i in range(5)]
        await store.begin_turn(BOB, new_turn("not alice's"))
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(10):
            page = await store.list_conversations(ALICE, limit=2, cursor=cursor)
            assert len(page.items) <= 2
            seen += [c.id for c in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(t.conversation.id for t in started)

    async def test_a_malformed_cursor_is_a_value_error(self, store: ConversationStore) -> None:
        with pytest.raises(ValueError, match="cursor"):
            await store.list_conversations(ALICE, cursor="not-a-cursor")

    # --- begin_turn ---------------------------------------------------------------------

    async def test_begin_turn_starts_a_conversation_with_question_and_running_reply(
        self, store: ConversationStore
    ) -> None:
        lease_until = datetime.now(UTC) + LEASE
        record = await store.begin_turn(
            ALICE,
            new_turn(
                "How many leave days?",
                title="Leave days",
                key="k1",
                request_hash="h1",
                lease_until=lease_until,
            ),
        )
        assert record.created
        assert (record.idempotency_key, record.request_hash) == ("k1", "h1")
        assert same_instant(record.lease_until, lease_until)
        conversation = record.conversation
        assert (conversation.tenant_id, conversation.user_id) == ("contoso", "alice")
        assert conversation.title == "Leave days"
        assert (conversation.summary, conversation.summary_through) == ("", None)
        stored = await store.get(ALICE, conversation.id)
        assert stored is not None and stored.title == "Leave days"
        assert record.user_message.conversation_id == conversation.id
        assert (record.user_message.role, record.user_message.content) == (
            "user",
            "How many leave days?",
        )
        assert record.user_message.status is MessageStatus.COMPLETE
        assert record.reply.conversation_id == conversation.id
        assert (record.reply.role, record.reply.content) == ("assistant", "")
        assert record.reply.status is MessageStatus.STREAMING
        user_message, reply = await store.messages(ALICE, conversation.id)
        assert (user_message.id, reply.id) == (record.user_message.id, record.reply.id)
        assert user_message.content == "How many leave days?"
        assert (reply.status, reply.content) == (MessageStatus.STREAMING, "")

    async def test_begin_turn_continues_an_existing_conversation(
        self, store: ConversationStore
    ) -> None:
        first = await finished_turn(store, ALICE, "Leave?", "27 days")
        second = await store.begin_turn(
            ALICE, new_turn("And sick days?", conversation_id=first.conversation.id, title="x")
        )
        assert second.created
        assert second.conversation.id == first.conversation.id
        assert second.conversation.title == first.conversation.title
        stored = await store.messages(ALICE, first.conversation.id)
        assert [(m.role, m.content, m.status) for m in stored] == [
            ("user", "Leave?", MessageStatus.COMPLETE),
            ("assistant", "27 days", MessageStatus.COMPLETE),
            ("user", "And sick days?", MessageStatus.COMPLETE),
            ("assistant", "", MessageStatus.STREAMING),
        ]
        assert [c.id for c in (await store.list_conversations(ALICE)).items] == [
            first.conversation.id
        ]

    async def test_begin_turn_into_someone_elses_conversation_writes_nothing(
        self, store: ConversationStore
    ) -> None:
        alices = await finished_turn(store, ALICE, "Leave?", "27 days")
        for intruder in (BOB, ALICE_ELSEWHERE):
            with pytest.raises(LookupError):
                await store.begin_turn(
                    intruder, new_turn(conversation_id=alices.conversation.id, key="k1")
                )
            assert (await store.list_conversations(intruder)).items == ()
            assert await store.find_turn(intruder, "k1") is None
        with pytest.raises(LookupError):
            await store.begin_turn(ALICE, new_turn(conversation_id="no-such-conversation"))
        assert len(await store.messages(ALICE, alices.conversation.id)) == 2
        # The refused call did not use up the key.
        assert (await store.begin_turn(BOB, new_turn(key="k1"))).created

    async def test_a_used_key_returns_the_earlier_turn_and_writes_nothing(
        self, store: ConversationStore
    ) -> None:
        first = await store.begin_turn(ALICE, new_turn("Leave?", key="k1", request_hash="h1"))
        again = await store.begin_turn(ALICE, new_turn("Leave?", key="k1", request_hash="h1"))
        other_body = await store.begin_turn(
            ALICE, new_turn("Something else", key="k1", request_hash="h2")
        )
        for repeat in (again, other_body):
            assert not repeat.created
            assert repeat.conversation.id == first.conversation.id
            assert repeat.user_message.id == first.user_message.id
            assert repeat.user_message.content == "Leave?"
            assert repeat.reply.id == first.reply.id
            assert (repeat.idempotency_key, repeat.request_hash) == ("k1", "h1")
        assert len((await store.list_conversations(ALICE)).items) == 1
        assert len(await store.messages(ALICE, first.conversation.id)) == 2

    async def test_a_used_key_in_an_existing_conversation_writes_nothing(
        self, store: ConversationStore
    ) -> None:
        start = await finished_turn(store, ALICE, "Leave?", "27 days")
        cid = start.conversation.id
        first = await store.begin_turn(ALICE, new_turn("Sick?", conversation_id=cid, key="k2"))
        again = await store.begin_turn(ALICE, new_turn("Sick?", conversation_id=cid, key="k2"))
        assert not again.created
        assert again.reply.id == first.reply.id
        assert len(await store.messages(ALICE, cid)) == 4

    async def test_idempotency_keys_are_per_caller(self, store: ConversationStore) -> None:
        alices = await store.begin_turn(ALICE, new_turn(key="shared"))
        bobs = await store.begin_turn(BOB, new_turn(key="shared"))
        elsewhere = await store.begin_turn(ALICE_ELSEWHERE, new_turn(key="shared"))
        assert alices.created and bobs.created and elsewhere.created
        assert len({alices.reply.id, bobs.reply.id, elsewhere.reply.id}) == 3
        found = await store.find_turn(BOB, "shared")
        assert found is not None and found.reply.id == bobs.reply.id

    async def test_turns_without_a_key_are_never_merged(self, store: ConversationStore) -> None:
        first = await store.begin_turn(ALICE, new_turn())
        second = await store.begin_turn(ALICE, new_turn())
        assert first.created and second.created
        assert first.conversation.id != second.conversation.id
        assert first.idempotency_key is None

    async def test_racing_turns_with_one_key_create_exactly_one(
        self, store: ConversationStore
    ) -> None:
        records = await asyncio.gather(
            *(store.begin_turn(ALICE, new_turn("Leave?", key="race")) for _ in range(10))
        )
        assert sum(r.created for r in records) == 1
        assert len({r.reply.id for r in records}) == 1
        assert len({r.conversation.id for r in records}) == 1
        [conversation] = (await store.list_conversations(ALICE)).items
        stored = await store.messages(ALICE, conversation.id)
        assert [m.role for m in stored] == ["user", "assistant"]

    # --- find_turn, renew_turn ----------------------------------------------------------

    async def test_find_turn_shows_the_turn_as_it_is_now(self, store: ConversationStore) -> None:
        assert await store.find_turn(ALICE, "unknown") is None
        started = await store.begin_turn(ALICE, new_turn("Leave?", key="k1", request_hash="h1"))
        running = await store.find_turn(ALICE, "k1")
        assert running is not None and started.lease_until is not None
        assert running.reply.status is MessageStatus.STREAMING
        assert same_instant(running.lease_until, started.lease_until)
        assert await store.find_turn(BOB, "k1") is None
        citation = Citation(1, "ch1", "d1", "hr/leave.md", "Leave", "27 days")
        await store.finish_message(
            ALICE, started.reply.id, "27 days [1]", MessageStatus.COMPLETE, citations=[citation]
        )
        done = await store.find_turn(ALICE, "k1")
        assert done is not None
        assert not done.created
        assert (done.idempotency_key, done.request_hash) == ("k1", "h1")
        assert done.conversation.id == started.conversation.id
        assert done.user_message.content == "Leave?"
        assert done.reply.id == started.reply.id
        assert done.reply.status is MessageStatus.COMPLETE
        assert done.reply.content == "27 days [1]"
        assert done.reply.citations == (citation,)

    async def test_renew_turn_keeps_the_answer_so_far_and_extends_the_lease(
        self, store: ConversationStore
    ) -> None:
        started = await store.begin_turn(ALICE, new_turn(key="k1"))
        run = _attempt(started)
        later = datetime.now(UTC) + 3 * LEASE
        assert await store.renew_turn(ALICE, started.reply.id, "You have", later, attempt=run)
        renewed = await store.find_turn(ALICE, "k1")
        assert renewed is not None
        assert renewed.reply.content == "You have"
        assert renewed.reply.status is MessageStatus.STREAMING
        assert same_instant(renewed.lease_until, later)
        assert not await store.renew_turn(BOB, started.reply.id, "hijack", later, attempt=run)
        assert not await store.renew_turn(ALICE, "no-such-reply", "x", later, attempt=run)
        await store.finish_message(ALICE, started.reply.id, "You have 27", MessageStatus.COMPLETE)
        assert not await store.renew_turn(
            ALICE, started.reply.id, "You have", later + LEASE, attempt=run
        )
        [_, reply] = await store.messages(ALICE, started.conversation.id)
        assert (reply.content, reply.status) == ("You have 27", MessageStatus.COMPLETE)

    # --- retry_turn -----------------------------------------------------------------------

    async def test_retry_turn_reclaims_interrupted_and_failed_replies(
        self, store: ConversationStore
    ) -> None:
        citation = Citation(1, "ch1", "d1", "hr/leave.md", "Leave", "27 days")
        for status in (MessageStatus.INTERRUPTED, MessageStatus.FAILED):
            started = await store.begin_turn(ALICE, new_turn(key=f"k-{status}"))
            await store.finish_message(
                ALICE, started.reply.id, "half an answer", status, citations=[citation]
            )
            now = datetime.now(UTC)
            claimed = await store.retry_turn(ALICE, started.reply.id, now + LEASE, now=now)
            assert claimed is not None, status
            assert claimed.reply.id == started.reply.id
            assert claimed.reply.status is MessageStatus.STREAMING
            assert (claimed.reply.content, claimed.reply.citations) == ("", ())
            assert same_instant(claimed.lease_until, now + LEASE)
            assert claimed.user_message.id == started.user_message.id
            assert claimed.conversation.id == started.conversation.id
            assert claimed.idempotency_key == f"k-{status}"
            [_, reply] = await store.messages(ALICE, started.conversation.id)
            assert (reply.status, reply.content) == (MessageStatus.STREAMING, "")

    async def test_retry_turn_takes_a_streaming_reply_only_once_its_lease_ended(
        self, store: ConversationStore
    ) -> None:
        now = datetime.now(UTC)
        started = await store.begin_turn(ALICE, new_turn(key="k1", lease_until=now + LEASE))
        await store.renew_turn(
            ALICE, started.reply.id, "half", now + LEASE, attempt=_attempt(started)
        )
        assert await store.retry_turn(ALICE, started.reply.id, now + 2 * LEASE, now=now) is None
        [_, untouched] = await store.messages(ALICE, started.conversation.id)
        assert (untouched.status, untouched.content) == (MessageStatus.STREAMING, "half")
        later = now + 2 * LEASE
        claimed = await store.retry_turn(ALICE, started.reply.id, later + LEASE, now=later)
        assert claimed is not None
        assert (claimed.reply.status, claimed.reply.content) == (MessageStatus.STREAMING, "")
        assert same_instant(claimed.lease_until, later + LEASE)
        found = await store.find_turn(ALICE, "k1")
        assert found is not None and same_instant(found.lease_until, later + LEASE)

    async def test_retry_turn_refuses_finished_paused_and_foreign_replies(
        self, store: ConversationStore
    ) -> None:
        now = datetime.now(UTC)
        later = now + 2 * LEASE  # every lease below has ended by then
        complete = await finished_turn(store, ALICE, "Leave?", "27 days")
        assert await store.retry_turn(ALICE, complete.reply.id, later + LEASE, now=later) is None
        paused = await store.begin_turn(ALICE, new_turn())
        await store.finish_message(ALICE, paused.reply.id, "", MessageStatus.AWAITING_APPROVAL)
        assert await store.retry_turn(ALICE, paused.reply.id, later + LEASE, now=later) is None
        failed = await store.begin_turn(ALICE, new_turn())
        await store.finish_message(ALICE, failed.reply.id, "oops", MessageStatus.FAILED)
        assert await store.retry_turn(BOB, failed.reply.id, later + LEASE, now=later) is None
        assert await store.retry_turn(ALICE, "no-such-reply", later + LEASE, now=later) is None
        assert (
            await store.retry_turn(ALICE, complete.user_message.id, later + LEASE, now=later)
            is None
        )
        [_, reply] = await store.messages(ALICE, complete.conversation.id)
        assert (reply.status, reply.content) == (MessageStatus.COMPLETE, "27 days")
        [_, reply] = await store.messages(ALICE, paused.conversation.id)
        assert reply.status is MessageStatus.AWAITING_APPROVAL
        [_, reply] = await store.messages(ALICE, failed.conversation.id)
        assert (reply.status, reply.content) == (MessageStatus.FAILED, "oops")

    async def test_racing_retries_have_exactly_one_winner(self, store: ConversationStore) -> None:
        started = await store.begin_turn(ALICE, new_turn(key="k1"))
        await store.finish_message(ALICE, started.reply.id, "half", MessageStatus.INTERRUPTED)
        now = datetime.now(UTC)
        claims = await asyncio.gather(
            *(store.retry_turn(ALICE, started.reply.id, now + LEASE, now=now) for _ in range(10))
        )
        assert sum(c is not None for c in claims) == 1

    # --- interrupt_abandoned --------------------------------------------------------------

    async def test_interrupt_abandoned_marks_only_expired_streaming_replies(
        self, store: ConversationStore
    ) -> None:
        now = datetime.now(UTC)
        soon, late = now + timedelta(seconds=10), now + timedelta(seconds=100)
        expired = await store.begin_turn(ALICE, new_turn(lease_until=soon))
        await store.renew_turn(
            ALICE, expired.reply.id, "half an answer", soon, attempt=_attempt(expired)
        )
        expired_elsewhere = await store.begin_turn(ALICE_ELSEWHERE, new_turn(lease_until=soon))
        live = await store.begin_turn(ALICE, new_turn(lease_until=late))
        done = await store.begin_turn(BOB, new_turn(lease_until=soon))
        await store.finish_message(BOB, done.reply.id, "27 days", MessageStatus.COMPLETE)
        failed = await store.begin_turn(BOB, new_turn(lease_until=soon))
        await store.finish_message(BOB, failed.reply.id, "", MessageStatus.FAILED)

        assert await store.interrupt_abandoned(now + timedelta(seconds=50)) == 2

        async def reply_of(principal: Principal, record: TurnRecord) -> tuple[MessageStatus, str]:
            [_, reply] = await store.messages(principal, record.conversation.id)
            return reply.status, reply.content

        assert await reply_of(ALICE, expired) == (MessageStatus.INTERRUPTED, "half an answer")
        assert await reply_of(ALICE_ELSEWHERE, expired_elsewhere) == (
            MessageStatus.INTERRUPTED,
            "",
        )
        assert await reply_of(ALICE, live) == (MessageStatus.STREAMING, "")
        assert await reply_of(BOB, done) == (MessageStatus.COMPLETE, "27 days")
        assert await reply_of(BOB, failed) == (MessageStatus.FAILED, "")
        assert await store.interrupt_abandoned(now + timedelta(seconds=50)) == 0
        # A turn the sweep interrupted can be claimed again.
        assert await store.retry_turn(ALICE, expired.reply.id, late, now=now) is not None

    # --- memory ---------------------------------------------------------------------------

    async def test_save_summary_round_trips_and_ignores_other_callers(
        self, store: ConversationStore
    ) -> None:
        first = await finished_turn(store, ALICE, "Leave?", "27 days")
        cid = first.conversation.id
        await store.save_summary(ALICE, cid, "Alice asked about leave.", first.reply.id)
        assert await summary_of(store, ALICE, cid) == ("Alice asked about leave.", first.reply.id)
        second = await finished_turn(store, ALICE, "Sick?", "10 days", conversation_id=cid)
        await store.save_summary(ALICE, cid, "Leave and sick days.", second.reply.id)
        await store.save_summary(BOB, cid, "hijacked", second.reply.id)
        await store.save_summary(ALICE_ELSEWHERE, cid, "hijacked", second.reply.id)
        assert await summary_of(store, ALICE, cid) == ("Leave and sick days.", second.reply.id)
        continued = await store.begin_turn(ALICE, new_turn(conversation_id=cid))
        assert continued.conversation.summary == "Leave and sick days."

    # --- retention and data-subject rights -------------------------------------------------

    async def test_purge_expired_deletes_messages_past_their_tenants_retention(
        self, store: ConversationStore
    ) -> None:
        gone = await finished_turn(store, EVE, "Old question", "old answer")
        mixed = await finished_turn(store, EVE, "Old too", "old answer")
        await store.save_summary(EVE, mixed.conversation.id, "Eve asked about X", mixed.reply.id)
        kept_elsewhere = await finished_turn(store, ALICE, "Leave?", "27 days")
        await store.save_summary(
            ALICE, kept_elsewhere.conversation.id, "kept", kept_elsewhere.reply.id
        )
        await asyncio.sleep(1.2)  # past tenant "ephemeral"'s one second
        await finished_turn(
            store, EVE, "New question", "new answer", conversation_id=mixed.conversation.id
        )
        fresh = await finished_turn(store, EVE, "Fresh", "fresh answer")

        purged = await store.purge_expired(datetime.now(UTC))

        assert purged in (0, 4)  # 0: the backend had expired them by itself
        assert await store.get(EVE, gone.conversation.id) is None
        assert await store.messages(EVE, gone.conversation.id) == []
        assert [m.content for m in await store.messages(EVE, mixed.conversation.id)] == [
            "New question",
            "new answer",
        ]
        assert len(await store.messages(EVE, fresh.conversation.id)) == 2
        assert len(await store.messages(ALICE, kept_elsewhere.conversation.id)) == 2
        remaining = {c.id for c in (await store.list_conversations(EVE)).items}
        assert remaining == {mixed.conversation.id, fresh.conversation.id}
        # A summary of purged messages would keep what retention deleted: it goes too.
        assert await summary_of(store, EVE, mixed.conversation.id) == ("", None)
        assert await summary_of(store, ALICE, kept_elsewhere.conversation.id) == (
            "kept",
            kept_elsewhere.reply.id,
        )

    async def test_export_user_gives_all_of_the_callers_data_and_nothing_else(
        self, store: ConversationStore
    ) -> None:
        older = await finished_turn(store, ALICE, "Leave?", "27 days")
        await finished_turn(store, ALICE, "Sick?", "10 days", conversation_id=older.conversation.id)
        newer = await finished_turn(store, ALICE, "Expenses?", "Use the portal")
        await finished_turn(store, BOB, "Bob's question", "Bob's answer")
        await finished_turn(store, ALICE_ELSEWHERE, "Other tenant", "answer")
        # Touching the older conversation must not reorder the export (oldest first).
        await store.save_summary(ALICE, older.conversation.id, "summary", older.reply.id)

        exported = await store.export_user(ALICE)

        assert [e.conversation.id for e in exported] == [
            older.conversation.id,
            newer.conversation.id,
        ]
        assert [m.content for m in exported[0].messages] == [
            "Leave?",
            "27 days",
            "Sick?",
            "10 days",
        ]
        assert [m.content for m in exported[1].messages] == ["Expenses?", "Use the portal"]
        assert all(e.conversation.user_id == "alice" for e in exported)
        assert exported[0].conversation.summary == "summary"
        assert await store.export_user(Principal("contoso", "nobody")) == []

    async def test_delete_user_erases_the_caller_and_nobody_else(
        self, store: ConversationStore
    ) -> None:
        first = await finished_turn(store, ALICE, "Leave?", "27 days", key="k1")
        await finished_turn(store, ALICE, "Sick?", "10 days", key="k2")
        bobs = await finished_turn(store, BOB, "Bob's", "answer", key="k1")
        elsewhere = await finished_turn(store, ALICE_ELSEWHERE, "Other", "answer", key="k1")

        assert await store.delete_user(ALICE) == 2

        assert (await store.list_conversations(ALICE)).items == ()
        assert await store.get(ALICE, first.conversation.id) is None
        assert await store.messages(ALICE, first.conversation.id) == []
        assert await store.export_user(ALICE) == []
        assert await store.find_turn(ALICE, "k1") is None
        assert await store.find_turn(ALICE, "k2") is None
        assert len(await store.messages(BOB, bobs.conversation.id)) == 2
        found = await store.find_turn(BOB, "k1")
        assert found is not None and found.reply.id == bobs.reply.id
        assert len(await store.messages(ALICE_ELSEWHERE, elsewhere.conversation.id)) == 2
        # The key is free again.
        again = await store.begin_turn(ALICE, new_turn("Leave?", key="k1"))
        assert again.created
        assert again.conversation.id != first.conversation.id
        assert await store.delete_user(ALICE) == 1
        assert await store.delete_user(ALICE) == 0

    async def test_a_run_that_lost_its_turn_to_a_retry_can_no_longer_write_it(
        self, store: ConversationStore
    ) -> None:
        now = datetime.now(UTC)
        started = await store.begin_turn(ALICE, new_turn(key="k1", lease_until=now + LEASE))
        stale = _attempt(started)
        # The first run stalls past its lease; a retry takes the turn over.
        retried = await store.retry_turn(
            ALICE, started.reply.id, now + 3 * LEASE, now=now + 2 * LEASE
        )
        assert retried is not None
        fresh = _attempt(retried)
        assert fresh != stale
        assert not await store.renew_turn(
            ALICE, started.reply.id, "stale", now + 4 * LEASE, attempt=stale
        )
        assert not await store.finish_message(
            ALICE, started.reply.id, "stale answer", MessageStatus.COMPLETE, attempt=stale
        )
        assert await store.renew_turn(
            ALICE, started.reply.id, "fresh", now + 4 * LEASE, attempt=fresh
        )
        assert await store.finish_message(
            ALICE, started.reply.id, "fresh answer", MessageStatus.COMPLETE, attempt=fresh
        )
        [_, reply] = await store.messages(ALICE, started.conversation.id)
        assert (reply.content, reply.status) == ("fresh answer", MessageStatus.COMPLETE)

    async def test_a_paused_turn_is_resumed_once_under_a_new_run_and_lease(
        self, store: ConversationStore
    ) -> None:
        now = datetime.now(UTC)
        paused = await store.begin_turn(ALICE, new_turn(key="k1", lease_until=now + LEASE))
        plan = Plan((PlanStep("s1", StepKind.CALL_TOOL, "close", tool="close"),), "model:x")
        await store.finish_message(
            ALICE,
            paused.reply.id,
            "",
            MessageStatus.AWAITING_APPROVAL,
            plan=plan,
            attempt=_attempt(paused),
        )
        assert await store.resume_turn(BOB, paused.reply.id, now + 2 * LEASE) is None
        racing = await asyncio.gather(
            *(store.resume_turn(ALICE, paused.reply.id, now + 2 * LEASE) for _ in range(10))
        )
        [resumed] = [record for record in racing if record is not None]
        assert resumed.reply.status is MessageStatus.STREAMING
        assert same_instant(resumed.lease_until, now + 2 * LEASE)
        assert _attempt(resumed) != _attempt(paused)
        # The paused run can no longer write; the resumed one can.
        assert not await store.finish_message(
            ALICE, paused.reply.id, "stale", MessageStatus.COMPLETE, attempt=_attempt(paused)
        )
        assert await store.finish_message(
            ALICE, paused.reply.id, "Closed.", MessageStatus.COMPLETE, attempt=_attempt(resumed)
        )
        # Only a paused turn resumes.
        assert await store.resume_turn(ALICE, paused.reply.id, now + 3 * LEASE) is None
        running = await store.begin_turn(ALICE, new_turn(lease_until=now + LEASE))
        assert await store.resume_turn(ALICE, running.reply.id, now + 3 * LEASE) is None
