"""Conversation memory: the token-budgeted history, the running summary and the rewrite of
a follow-up into a search query. Model calls go through the real gateway and ``openai``
client to the scripted simulator on loopback; extractive mode uses the extractive
answerer, and nothing reaches the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest

from inferencing.contracts import ChatModel, Role
from inferencing.gateway import Gateway, build_gateway
from inferencing.settings import InferencingSettings
from inferencing.simulator import Fault, ScriptedReply, SimulatorServer
from inferencing.tokens import ApproximateCounter
from intelligence.contracts import (
    Citation,
    Conversation,
    ConversationMessage,
    MessageStatus,
    Principal,
    StepResult,
    TurnRecord,
    TurnRequest,
)
from intelligence.memory import ConversationMemory, TurnContext, is_followup, widen_followup
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.settings import IntelligenceSettings
from intelligence.stores.sqlite import SqliteConversationStore
from knowledge.contracts import RetrievedPassage
from tests.fakes import InMemoryRetriever, chunk
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.intelligence.stores.conversation_contract import new_turn
from tests.support.simulator import simulated_inferencing

ALICE = Principal(tenant_id="contoso", user_id="alice")
LEAVE_QUESTION = "How many days of parental leave do I get?"
LEAVE_ANSWER = "Employees get 26 weeks of paid parental leave [1]."
LEAVE_CITATION = Citation(
    ref=1,
    chunk_id="leave-1",
    document_id="doc-leave",
    source="hr/parental-leave.md",
    title="Parental leave policy",
    snippet="26 weeks of paid parental leave",
)
LEAVE_ANSWER_NAMED = (
    "Employees get 26 weeks of paid parental leave (source: Parental leave policy)."
)
FOLLOW_UP = "what about for contractors?"


@pytest.fixture
async def model(simulator: SimulatorServer) -> AsyncIterator[Gateway]:
    """The gateway over one simulated deployment, one attempt per call."""
    settings = InferencingSettings.model_validate(simulated_inferencing(simulator))
    async with aclosing(build_gateway(settings)) as gateway:
        yield gateway


@pytest.fixture
async def extractive(simulator: SimulatorServer) -> AsyncIterator[Gateway]:
    """The gateway over the extractive answerer (no generative model); the simulator runs
    only to show that nothing reaches it."""
    async with aclosing(build_gateway(InferencingSettings())) as gateway:
        yield gateway


def memory(
    store: SqliteConversationStore, chat_model: ChatModel, **settings: Any
) -> ConversationMemory:
    return ConversationMemory(
        chat_model=chat_model,
        conversations=store,
        prompts=PromptLibrary(PromptLibrary.bundled_directory()),
        settings=IntelligenceSettings.model_validate(settings),
        counter=ApproximateCounter(),
    )


def chat_bodies(simulator: SimulatorServer) -> list[dict[str, Any]]:
    return [r.body for r in simulator.requests() if r.path.endswith("/chat/completions")]


def prompt_of(body: dict[str, Any]) -> str:
    [message] = body["messages"]
    assert message["role"] == "user"
    content: str = message["content"]
    return content


@dataclass
class Chat:
    """A stored conversation of Alice's, as a turn starts on it (its first turn starts it)."""

    store: SqliteConversationStore
    id: str | None = None

    async def ask(self, question: str) -> TurnRecord:
        """Start a turn: the question stored and its reply running, as the orchestrator
        has them when it prepares the turn's context."""
        record = await self.store.begin_turn(ALICE, new_turn(question, conversation_id=self.id))
        self.id = record.conversation.id
        return record

    async def say(
        self, question: str, answer: str, citations: tuple[Citation, ...] = ()
    ) -> ConversationMessage:
        """A whole turn: asked, and answered with ``answer``; returns its reply."""
        reply = (await self.ask(question)).reply
        await self.store.finish_message(
            ALICE, reply.id, answer, MessageStatus.COMPLETE, citations=citations
        )
        return reply

    async def now(self, last: int) -> tuple[Conversation, list[ConversationMessage]]:
        assert self.id is not None, "no turn was started yet"
        conversation = await self.store.get(ALICE, self.id)
        assert conversation is not None
        return conversation, await self.store.messages(ALICE, self.id, last=last)

    async def summary(self) -> tuple[str, str | None]:
        """The stored running summary, and the id of the message it runs to."""
        conversation, _ = await self.now(last=1)
        return conversation.summary, conversation.summary_through


async def chat(store: SqliteConversationStore, *, turns: int = 0) -> Chat:
    """A conversation of Alice's, with the first ``turns`` of ``turn_text`` said in it (with
    none, it is stored once a turn is asked in it)."""
    conversation = Chat(store)
    for n in range(turns):
        await conversation.say(*turn_text(n))
    return conversation


def turn_text(n: int) -> tuple[str, str]:
    """Turn ``n``'s question and answer: 25 and 45 tokens as messages (4 characters a
    token, and 4 for each message's framing)."""
    question = f"Which rules of policy {n} apply to remote workers in region {n} " + "q" * 20
    return question, f"Answer {n}: " + " ".join(["days of leave"] * 11)


# --- rewriting a follow-up ------------------------------------------------------------------


async def test_a_follow_up_is_rewritten_by_the_model_from_the_history(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store)
    await conversation.say(LEAVE_QUESTION, LEAVE_ANSWER, (LEAVE_CITATION,))
    simulator.script(ScriptedReply(content='"Parental leave for contractors"'))
    state, history = await conversation.now(last=6)

    context = await memory(store, model).prepare(state, history, FOLLOW_UP, ALICE)

    assert context.search_query == "Parental leave for contractors"
    assert context.query_source == "model"
    [rewrite] = chat_bodies(simulator)  # the history fits: no summary is asked for
    prompt = prompt_of(rewrite)
    assert LEAVE_QUESTION in prompt
    assert "26 weeks of paid parental leave (source: Parental leave policy)" in prompt
    assert prompt.rstrip().endswith(f"Latest question: {FOLLOW_UP}")
    assert rewrite["max_tokens"] == IntelligenceSettings().rewrite_max_tokens
    # The deterministic planner searches for the rewrite, not the bare follow-up.
    plan = await DeterministicPlanner().plan(Planning(FOLLOW_UP, context))
    assert plan.steps[0].query == "Parental leave for contractors"


async def test_a_first_question_needs_no_rewrite(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store)
    await conversation.ask(LEAVE_QUESTION)
    state, history = await conversation.now(last=6)

    context = await memory(store, model).prepare(state, history, LEAVE_QUESTION, ALICE)

    assert (context.search_query, context.query_source) == (LEAVE_QUESTION, "question")
    assert context.history == () and context.summary == ""
    assert chat_bodies(simulator) == []


async def test_in_extractive_mode_a_follow_up_is_widened_with_the_earlier_question(
    store: SqliteConversationStore, extractive: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store)
    await conversation.say(LEAVE_QUESTION, LEAVE_ANSWER, (LEAVE_CITATION,))
    state, history = await conversation.now(last=6)

    context = await memory(store, extractive).prepare(state, history, FOLLOW_UP, ALICE)

    assert context.search_query == "what about for contractors? days parental leave"
    assert context.query_source == "heuristic"
    assert chat_bodies(simulator) == []


def test_the_heuristic_widens_follow_ups_only() -> None:
    assert is_followup("what about for contractors?")
    assert is_followup("And is it paid?")
    assert is_followup("Is it paid in full for part-time staff?")
    assert not is_followup("How do I request a new laptop from the IT service desk?")
    standalone = "How do I request a new laptop from the IT service desk?"
    assert widen_followup(standalone, [LEAVE_QUESTION]) == standalone
    # A chain of follow-ups reaches back to the question they all lean on.
    widened = widen_followup("and for interns?", [LEAVE_QUESTION, FOLLOW_UP])
    assert widened == "and for interns? contractors days parental leave"
    assert widen_followup(FOLLOW_UP, []) == FOLLOW_UP


# --- the running summary ----------------------------------------------------------------------


async def test_messages_beyond_the_budget_are_summarised_and_the_recent_ones_kept_verbatim(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store)
    replies = [await conversation.say(*turn_text(n)) for n in range(3)]
    simulator.script(ScriptedReply(content="Alice asked questions 0 and 1."))
    state, history = await conversation.now(last=20)
    # The budget holds the last turn only (70 tokens).
    mind = memory(store, model, history_tokens=80, rewrite_followups=False)

    context = await mind.prepare(state, history, "A new question about travel", ALICE)

    assert [m.content for m in context.history] == list(turn_text(2))
    assert context.summary == "Alice asked questions 0 and 1."
    [summarising] = chat_bodies(simulator)
    prompt = prompt_of(summarising)
    for n in (0, 1):
        assert all(text in prompt for text in turn_text(n))
    assert not any(text in prompt for text in turn_text(2))
    assert summarising["max_tokens"] == IntelligenceSettings().summary_max_tokens
    assert await conversation.summary() == (context.summary, replies[1].id)
    # The answer sees the summary first, then the verbatim messages.
    messages = context.chat_messages()
    assert messages[0].role is Role.SYSTEM and context.summary in (messages[0].content or "")
    assert [m.role for m in messages[1:]] == [Role.USER, Role.ASSISTANT]


async def test_the_summary_grows_by_the_newly_aged_out_messages_only(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store, turns=3)
    mind = memory(store, model, history_tokens=80, rewrite_followups=False)
    simulator.script(ScriptedReply(content="Summary of turns 0 and 1."))
    await mind.prepare(*await conversation.now(last=20), "next", ALICE)

    # Up to date: the next turn on the same messages needs no summary call.
    context = await mind.prepare(*await conversation.now(last=20), "next", ALICE)
    assert context.summary == "Summary of turns 0 and 1."
    assert len(chat_bodies(simulator)) == 1

    latest = await conversation.say(*turn_text(3))
    simulator.script(ScriptedReply(content="Summary of turns 0 to 2."))
    context = await mind.prepare(*await conversation.now(last=20), "next", ALICE)

    assert context.summary == "Summary of turns 0 to 2."
    assert [m.content for m in context.history] == list(turn_text(3))
    prompt = prompt_of(chat_bodies(simulator)[-1])
    assert "Summary so far:\nSummary of turns 0 and 1." in prompt
    assert all(text in prompt for text in turn_text(2))
    assert not any(text in prompt for n in (0, 1, 3) for text in turn_text(n))
    saved, messages = await conversation.now(last=20)
    assert saved.summary_through == messages[-3].id != latest.id


async def test_messages_that_left_the_loaded_window_are_read_back_to_be_summarised(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store, turns=4)
    # The budget holds all four loaded messages: what ages out is what the window left.
    mind = memory(store, model, history_turns=4, rewrite_followups=False)
    simulator.script(ScriptedReply(content="Turns 0 and 1."), ScriptedReply(content="Turns 0-2."))
    await mind.prepare(*await conversation.now(last=4), "next", ALICE)
    await conversation.say(*turn_text(4))

    context = await mind.prepare(*await conversation.now(last=4), "next", ALICE)

    first, second = (prompt_of(body) for body in chat_bodies(simulator))
    assert all(text in first for n in (0, 1) for text in turn_text(n))
    assert all(text in second for text in turn_text(2))
    assert not any(text in second for n in (0, 1, 3, 4) for text in turn_text(n))
    assert context.summary == "Turns 0-2."
    assert [m.content for m in context.history] == [*turn_text(3), *turn_text(4)]


# --- extractive mode: cut short, no model -----------------------------------------------------


async def test_extractive_mode_cuts_the_history_short_and_calls_no_model(
    store: SqliteConversationStore, extractive: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store, turns=3)
    state, history = await conversation.now(last=20)
    # The last turn (70 tokens) fits whole; the 30 tokens left take a part of the answer
    # before it; the rest is left out.
    mind = memory(store, extractive, history_tokens=100)

    context = await mind.prepare(state, history, "And the one before?", ALICE)

    question, answer = turn_text(2)
    assert [m.content for m in context.history][1:] == [question, answer]
    cut = context.history[0].content
    assert cut.startswith("Answer 1: days of leave") and cut.endswith(" …")
    assert len(cut) < len(answer)
    assert context.summary == ""
    widened = "rules policy 2 apply remote workers region " + "q" * 20
    assert context.search_query == f"And the one before? {widened}"
    assert chat_bodies(simulator) == []
    assert await conversation.summary() == ("", None)


# --- failures never fail the turn -----------------------------------------------------------


async def test_a_failing_model_leaves_the_question_and_the_old_summary(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store, turns=3)
    simulator.script(
        ScriptedReply(fault=Fault(kind="unavailable")),
        ScriptedReply(fault=Fault(kind="status", status_code=500)),
    )
    state, history = await conversation.now(last=20)

    context = await memory(store, model, history_tokens=80).prepare(
        state, history, FOLLOW_UP, ALICE
    )

    assert len(chat_bodies(simulator)) == 2  # both were tried
    assert (context.search_query, context.query_source) == (FOLLOW_UP, "question")
    assert context.summary == ""
    assert [m.content for m in context.history] == list(turn_text(2))
    assert await conversation.summary() == ("", None)


async def test_a_model_slower_than_the_memory_timeout_is_skipped(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    conversation = await chat(store)
    await conversation.say(LEAVE_QUESTION, LEAVE_ANSWER, (LEAVE_CITATION,))
    simulator.script(ScriptedReply(fault=Fault(kind="timeout", hang_s=30)))
    state, history = await conversation.now(last=6)

    context = await memory(store, model, memory_timeout_s=0.2).prepare(
        state, history, FOLLOW_UP, ALICE
    )

    assert (context.search_query, context.query_source) == (FOLLOW_UP, "question")


# --- citations of earlier turns -------------------------------------------------------------


async def test_a_follow_up_keeps_the_citations_of_earlier_answers(
    store: SqliteConversationStore, extractive: Gateway
) -> None:
    conversation = await chat(store)
    await conversation.say(LEAVE_QUESTION, LEAVE_ANSWER, (LEAVE_CITATION,))
    state, history = await conversation.now(last=6)

    context = await memory(store, extractive).prepare(state, history, FOLLOW_UP, ALICE)

    question, answer = context.history
    assert answer.citations == (LEAVE_CITATION,)
    # The model reads the source's title: this turn numbers its own sources from 1 again.
    assert answer.content == LEAVE_ANSWER_NAMED
    assert question.content == LEAVE_QUESTION
    # The stored message is untouched: the conversation API returns it with its citations.
    stored = (await store.messages(ALICE, state.id))[-1]
    assert (stored.content, stored.citations) == (LEAVE_ANSWER, (LEAVE_CITATION,))


async def test_the_turns_own_stored_messages_are_not_history(
    store: SqliteConversationStore, extractive: Gateway
) -> None:
    conversation = await chat(store)
    await conversation.say(LEAVE_QUESTION, LEAVE_ANSWER, (LEAVE_CITATION,))
    await conversation.ask(FOLLOW_UP)
    state, history = await conversation.now(last=6)

    context = await memory(store, extractive).prepare(state, history, FOLLOW_UP, ALICE)

    assert [m.content for m in context.history] == [LEAVE_QUESTION, LEAVE_ANSWER_NAMED]
    assert context.search_query == "what about for contractors? days parental leave"


@dataclass(frozen=True)
class Planning:
    """A planning context as the orchestrator builds it from a prepared turn."""

    question: str
    memory: TurnContext
    principal: Principal = ALICE
    rounds: tuple[tuple[StepResult, ...], ...] = ()
    passages: tuple[RetrievedPassage, ...] = ()

    @property
    def history(self) -> tuple[ConversationMessage, ...]:
        return self.memory.history

    @property
    def search_query(self) -> str:
        return self.memory.search_query


# --- a whole conversation through the orchestrator --------------------------------------


async def test_a_follow_up_turn_searches_for_the_rewrite_and_answers_with_the_history(
    store: SqliteConversationStore, model: Gateway, simulator: SimulatorServer
) -> None:
    retriever = InMemoryRetriever(
        [chunk("leave-1", "Employees get 26 weeks of paid parental leave.", public=True)]
    )
    orchestrator = orchestrator_over_fakes(
        store, model, retriever=retriever, memory=memory(store, model)
    )
    simulator.script(ScriptedReply(content=LEAVE_ANSWER))
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    simulator.script(
        ScriptedReply(content="Parental leave for contractors"),
        ScriptedReply(content="Contractors are not covered [1]."),
    )
    second = await orchestrator.run_turn(
        TurnRequest(FOLLOW_UP, conversation_id=first.conversation_id), ALICE
    )

    assert [query for query, _ in retriever.queries] == [
        LEAVE_QUESTION,
        "Parental leave for contractors",
    ]
    assert second.answer == "Contractors are not covered [1]."
    *_, rewrite, answer = chat_bodies(simulator)
    assert FOLLOW_UP in prompt_of(rewrite) and LEAVE_QUESTION in prompt_of(rewrite)
    # The answer model sees the earlier turn, then the follow-up as the user asked it.
    said = [(m["role"], m["content"]) for m in answer["messages"][1:]]
    assert said[0] == ("user", LEAVE_QUESTION)
    assert said[-1] == ("user", FOLLOW_UP)
    # The earlier answer's citations are still on it.
    messages = await store.messages(ALICE, first.conversation_id)
    assert [c.chunk_id for c in messages[1].citations] == ["leave-1"]
