"""A running turn keeps its lease from the moment its question is stored, including while
the conversation's memory is prepared (summary and follow-up rewrite: model calls that
may take longer than the lease). Otherwise the sweep takes the live turn for one whose
process died and marks it interrupted under it; a retry would then run it twice."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from inferencing.contracts import ChatRequest, ChatResponse, InferenceCaller
from inferencing.tokens import ApproximateCounter
from intelligence.contracts import MessageStatus, Principal, TurnRequest, collect_turn
from intelligence.memory import ConversationMemory
from intelligence.prompts import PromptLibrary
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.upkeep import Upkeep
from tests.fakes import ScriptedChatModel, chunk, text_reply
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.support.lifecycle import opened

ALICE = Principal("contoso", "alice", groups=frozenset({"hr"}))
CHUNKS = [chunk("leave", "Employees receive 27 days of annual leave.", groups=frozenset({"hr"}))]
LEASE_S = 1.0


@dataclass
class SlowRewrites(ScriptedChatModel):
    """Answers at once, but takes longer than a lease over a (non-streamed) memory call."""

    delay_s: float = 2.5 * LEASE_S

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        await asyncio.sleep(self.delay_s)
        return await super().complete(request, caller)


async def test_a_turn_whose_memory_outlasts_the_lease_is_not_taken_for_abandoned(
    tmp_path: Path,
) -> None:
    async with opened(SqliteConversationStore(tmp_path / "c.db")) as store:
        model = SlowRewrites(
            [
                text_reply("You get 27 days [1]."),
                text_reply("annual leave days"),
                text_reply("Yes [1]."),
            ]
        )
        settings = IntelligenceSettings()
        memory = ConversationMemory(
            chat_model=model,
            conversations=store,
            prompts=PromptLibrary(PromptLibrary.bundled_directory()),
            settings=settings,
            counter=ApproximateCounter(),
        )
        orchestrator = orchestrator_over_fakes(
            store, model, chunks=CHUNKS, settings=settings, memory=memory, turn_lease_s=LEASE_S
        )
        first = await orchestrator.run_turn(TurnRequest("How much leave do I get?"), ALICE)

        # A follow-up: its question is rewritten by the (slow) model before it starts.
        follow_up = asyncio.create_task(
            orchestrator.start_turn(
                TurnRequest("And for part-timers?", conversation_id=first.conversation_id),
                ALICE,
            )
        )
        sweeps: list[tuple[int, int]] = []
        while not follow_up.done():
            await asyncio.sleep(LEASE_S / 2)
            sweeps.append(await Upkeep(store, None, interval_s=60).run_once())
        started = await follow_up
        assert len(sweeps) >= 3, "the preparation did not outlast the lease"
        assert all(interrupted == 0 for interrupted, _ in sweeps), sweeps

        result = await collect_turn(started.events)
        assert result.answer == "Yes [1]."
        messages = await store.messages(ALICE, first.conversation_id)
        assert [m.status for m in messages] == [MessageStatus.COMPLETE] * 4
