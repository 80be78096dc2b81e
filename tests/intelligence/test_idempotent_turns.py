"""Turns started with an idempotency key: replayed when done, joined while running,
finished once when interrupted, refused when the key comes with another request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import (
    AnswerDelta,
    DoneEvent,
    ErrorEvent,
    IdempotencyKeyReused,
    MessageStatus,
    Principal,
    StartedTurn,
    TurnEvent,
    TurnInProgress,
    TurnRequest,
)
from intelligence.orchestrator import Orchestrator
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.upkeep import Upkeep
from tests.fakes import ScriptedChatModel, chunk, text_reply
from tests.intelligence.assembly import orchestrator_over_fakes

ALICE = Principal("contoso", "alice", groups=frozenset({"hr"}))
BOB = Principal("contoso", "bob", groups=frozenset({"hr"}))
CHUNKS = [chunk("leave", "Employees receive 27 days of annual leave.", groups=frozenset({"hr"}))]
ANSWER = "You get 27 days of annual leave [1]."


def make(
    store: SqliteConversationStore, model: ScriptedChatModel, *, lease_s: float = 30.0
) -> Orchestrator:
    return orchestrator_over_fakes(store, model, chunks=CHUNKS, turn_lease_s=lease_s)


def ask(message: str = "How much leave do I get?", key: str | None = "k-1") -> TurnRequest:
    return TurnRequest(message, idempotency_key=key)


def answer_of(events: list[TurnEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, AnswerDelta))


async def mid_answer(orchestrator: Orchestrator) -> tuple[StartedTurn, list[TurnEvent]]:
    """A turn started with the key and read up to its first piece of answer, where its
    generator stays suspended; the events read so far."""
    started = await orchestrator.start_turn(ask(), ALICE)
    seen: list[TurnEvent] = []
    async for event in started.events:
        seen.append(event)
        if isinstance(event, AnswerDelta):
            break
    return started, seen


async def collect(events: AsyncIterator[TurnEvent]) -> list[TurnEvent]:
    return [e async for e in events]


async def test_the_same_request_again_replays_the_stored_answer(
    store: SqliteConversationStore,
) -> None:
    model = ScriptedChatModel([text_reply(ANSWER)])
    orchestrator = make(store, model)
    first = await orchestrator.start_turn(ask(), ALICE)
    assert first.idempotency == "new"
    events = await collect(first.events)

    again = await orchestrator.start_turn(ask(), ALICE)
    assert again.idempotency == "replayed"
    replayed = await collect(again.events)
    assert answer_of(replayed) == answer_of(events) == ANSWER
    [done] = [e for e in replayed if isinstance(e, DoneEvent)]
    [original] = [e for e in events if isinstance(e, DoneEvent)]
    assert (done.conversation_id, done.message_id) == (
        original.conversation_id,
        original.message_id,
    )
    # One model call, one conversation, one question, one answer.
    assert len(model.requests) == 1
    [conversation] = (await store.list_conversations(ALICE)).items
    messages = await store.messages(ALICE, conversation.id)
    assert [(m.role, m.status) for m in messages] == [
        ("user", MessageStatus.COMPLETE),
        ("assistant", MessageStatus.COMPLETE),
    ]


async def test_the_key_with_another_request_is_refused_and_writes_nothing(
    store: SqliteConversationStore,
) -> None:
    orchestrator = make(store, ScriptedChatModel([text_reply(ANSWER)]))
    await collect((await orchestrator.start_turn(ask(), ALICE)).events)
    with pytest.raises(IdempotencyKeyReused):
        await orchestrator.start_turn(ask("Something else entirely?"), ALICE)
    [conversation] = (await store.list_conversations(ALICE)).items
    assert len(await store.messages(ALICE, conversation.id)) == 2


async def test_keys_belong_to_their_user(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply(ANSWER), text_reply(ANSWER)])
    orchestrator = make(store, model)
    await collect((await orchestrator.start_turn(ask(), ALICE)).events)
    bobs = await orchestrator.start_turn(ask(), BOB)
    assert bobs.idempotency == "new"
    await collect(bobs.events)
    assert len(model.requests) == 2


async def test_a_retry_while_the_turn_runs_joins_it(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply(ANSWER)])
    orchestrator = make(store, model)
    first, seen = await mid_answer(orchestrator)

    joined = await orchestrator.start_turn(ask(), ALICE)
    assert joined.idempotency == "joined"
    rest, joined_events = await asyncio.gather(collect(first.events), collect(joined.events))
    assert [e.type for e in joined_events] == [e.type for e in seen + rest]
    assert answer_of(joined_events) == ANSWER
    assert len(model.requests) == 1


async def test_an_interrupted_turn_runs_again_once(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply(ANSWER), text_reply(ANSWER)])
    orchestrator = make(store, model)
    first, _ = await mid_answer(orchestrator)
    await first.events.aclose()  # the client hung up
    [conversation] = (await store.list_conversations(ALICE)).items
    reply = (await store.messages(ALICE, conversation.id))[-1]
    assert reply.status is MessageStatus.INTERRUPTED

    retried, racing = await asyncio.gather(
        orchestrator.start_turn(ask(), ALICE),
        orchestrator.start_turn(ask(), ALICE),
        return_exceptions=True,
    )
    # Exactly one of two racing retries runs the turn; the other is told to wait.
    outcomes = sorted([retried, racing], key=lambda r: isinstance(r, BaseException))
    winner, loser = outcomes
    assert not isinstance(winner, BaseException) and winner.idempotency == "retried"
    assert isinstance(loser, TurnInProgress)
    events = await collect(winner.events)
    assert answer_of(events) == ANSWER
    messages = await store.messages(ALICE, conversation.id)
    assert [(m.id, m.status) for m in messages][1:] == [(reply.id, MessageStatus.COMPLETE)]
    assert len(messages) == 2
    assert len(model.requests) == 2


async def test_a_turn_running_in_another_process_is_409_until_its_lease_ends(
    tmp_path: Path,
) -> None:
    first_store = SqliteConversationStore(tmp_path / "c.db")
    second_store = SqliteConversationStore(tmp_path / "c.db")
    await first_store.open()
    await second_store.open()
    try:
        model = ScriptedChatModel([text_reply(ANSWER), text_reply(ANSWER)])
        crashed = make(first_store, model, lease_s=1.0)
        # Started and never run: as if its process died right after the question was stored.
        started = await crashed.start_turn(ask(), ALICE)
        other = make(second_store, model, lease_s=1.0)
        with pytest.raises(TurnInProgress):
            await other.start_turn(ask(), ALICE)

        await asyncio.sleep(1.2)  # the lease runs out
        assert await Upkeep(second_store, None, interval_s=60).run_once() == (1, 0)
        reply = (await second_store.messages(ALICE, started.conversation_id))[-1]
        assert reply.status is MessageStatus.INTERRUPTED

        retried = await other.start_turn(ask(), ALICE)
        assert retried.idempotency == "retried"
        assert answer_of(await collect(retried.events)) == ANSWER
        await started.events.aclose()
    finally:
        await first_store.close()
        await second_store.close()


async def test_a_joined_stream_whose_turn_is_abandoned_ends_with_a_retryable_error(
    store: SqliteConversationStore,
) -> None:
    orchestrator = make(store, ScriptedChatModel([text_reply(ANSWER)]))
    first, _ = await mid_answer(orchestrator)
    joined = await orchestrator.start_turn(ask(), ALICE)
    await first.events.aclose()
    events = await collect(joined.events)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "interrupted"
    assert events[-1].retryable


async def test_without_a_key_every_request_is_a_new_turn(store: SqliteConversationStore) -> None:
    model = ScriptedChatModel([text_reply(ANSWER), text_reply(ANSWER)])
    orchestrator = make(store, model)
    for _ in range(2):
        started = await orchestrator.start_turn(ask(key=None), ALICE)
        assert started.idempotency is None
        await collect(started.events)
    assert len((await store.list_conversations(ALICE)).items) == 2


async def test_a_run_whose_turn_a_retry_took_over_stores_nothing(
    store: SqliteConversationStore,
) -> None:
    orchestrator = make(store, ScriptedChatModel([text_reply(ANSWER)]))
    first, _ = await mid_answer(orchestrator)
    # Seen from another replica (a stalled process, a skewed clock), the lease ran out,
    # and a retry claimed the turn.
    reply_id = (await store.messages(ALICE, first.conversation_id))[-1].id
    later = datetime.now(UTC) + timedelta(hours=1)
    taken = await store.retry_turn(ALICE, reply_id, later + timedelta(minutes=1), now=later)
    assert taken is not None

    rest = await collect(first.events)
    assert isinstance(rest[-1], ErrorEvent) and rest[-1].code == "superseded"
    assert not any(isinstance(e, DoneEvent) for e in rest)
    reply = (await store.messages(ALICE, first.conversation_id))[-1]
    assert (reply.status, reply.content) == (MessageStatus.STREAMING, "")
