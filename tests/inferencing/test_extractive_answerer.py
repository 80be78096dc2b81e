from __future__ import annotations

import re

import pytest

from inferencing.contracts import ChatMessage, ChatRequest, GroundingDocument, Role, ToolDefinition
from inferencing.providers.extractive import NOTHING_FOUND, ExtractiveAnswerer, terms
from tests.inferencing.chat_model_contract import ChatModelContract, collect
from tests.inferencing.conftest import Caller

LEAVE = GroundingDocument(
    ref=1,
    title="Contoso Leave Policy",
    text="""# Contoso Leave Policy

## Annual leave

Every full-time employee receives **27 days of paid annual leave** per
calendar year, on top of public holidays. Part-time employees receive the same
entitlement pro rata to their contracted hours.

## Parental leave

Every new parent is entitled to **20 weeks of fully paid parental leave**, to be
taken within the first 18 months after the child joins the family. The leave may
be taken in up to three blocks of at least two weeks each.

- **Moving house:** one paid day per calendar year.
""",
)
EXPENSES = GroundingDocument(
    ref=2,
    title="Expenses Policy",
    text="""Submit expense claims through the Ledgerline portal within 30 days.
Claims older than 90 days are rejected unless your director approves an exception.
Hotels are reimbursed up to 220 USD per night in most cities.
When travelling overnight, the daily meal allowance is 60 USD.""",
)
ONCALL = GroundingDocument(
    ref=7,
    title="On-call runbook",
    text="""Platform on-call runs on the Kestrel rotation in PagerDuty.
The rotation hands over every Monday at 10:00 UTC. Acknowledge a page within five minutes.""",
)
DOCUMENTS = (LEAVE, EXPENSES, ONCALL)


def ask(question: str, documents: tuple[GroundingDocument, ...] = DOCUMENTS) -> ChatRequest:
    return ChatRequest(
        messages=[
            ChatMessage(Role.SYSTEM, "Answer from the documents."),
            ChatMessage(Role.USER, question),
        ],
        documents=documents,
    )


def cited(text: str) -> list[int]:
    return [int(ref) for ref in re.findall(r"\[(\d+)\]", text)]


def plain(text: str) -> str:
    """Document text as the answerer may quote it: markup and line wrapping removed."""
    return " ".join(re.sub(r"\*\*|^\s*(?:#+|-)\s+", "", text, flags=re.MULTILINE).split())


class TestExtractiveAnswererContract(ChatModelContract):
    @pytest.fixture
    def chat_model(self) -> ExtractiveAnswerer:
        return ExtractiveAnswerer()

    @pytest.fixture
    def question(self) -> ChatRequest:
        return ask("How many weeks of parental leave does a new parent get?")


async def test_it_answers_from_the_right_document_and_cites_it(caller: Caller) -> None:
    response = await ExtractiveAnswerer().complete(
        ask("How many weeks of parental leave does a new parent get?"), caller
    )
    answer = response.message.content or ""
    assert "20 weeks of fully paid parental leave" in answer
    assert set(cited(answer)) == {LEAVE.ref}


async def test_it_picks_the_document_that_matches_even_when_it_is_not_first(
    caller: Caller,
) -> None:
    response = await ExtractiveAnswerer().complete(
        ask("When does the Kestrel on-call rotation hand over?"), caller
    )
    answer = response.message.content or ""
    assert "every Monday at 10:00 UTC [7]." in answer
    assert set(cited(answer)) == {ONCALL.ref}


async def test_every_sentence_is_quoted_from_the_document_it_cites(caller: Caller) -> None:
    by_ref = {d.ref: plain(d.text) for d in DOCUMENTS}
    for question in (
        "How many days of annual leave do I get?",
        "What is the hotel limit per night?",
        "How long do I have to submit expense claims?",
        "Who is on call in PagerDuty?",
    ):
        answer = (await ExtractiveAnswerer().complete(ask(question), caller)).message.content
        assert answer
        sentences = re.findall(r"(.+?) \[(\d+)\]([.!?])\s*", answer)
        assert 2 <= len(sentences) <= 4, answer
        for quoted, ref, _ in sentences:
            assert int(ref) in by_ref, answer
            assert quoted in by_ref[int(ref)], f"{quoted!r} is not in document {ref}"
        # Nothing but quoted sentences and their citations.
        assert re.sub(r"(.+?) \[(\d+)\]([.!?])\s*", "", answer) == ""


async def test_it_says_so_when_nothing_in_the_documents_fits(caller: Caller) -> None:
    response = await ExtractiveAnswerer().complete(ask("How do I reset my VPN token?"), caller)
    assert response.message.content == NOTHING_FOUND
    assert cited(NOTHING_FOUND) == []
    assert response.finish_reason == "stop"


async def test_without_documents_it_says_nothing_fits(caller: Caller) -> None:
    response = await ExtractiveAnswerer().complete(ask("How much annual leave?", ()), caller)
    assert response.message.content == NOTHING_FOUND


async def test_it_answers_the_last_user_message(caller: Caller) -> None:
    request = ChatRequest(
        messages=[
            ChatMessage(Role.USER, "How many days of annual leave do I get?"),
            ChatMessage(Role.ASSISTANT, "27 days [1]."),
            ChatMessage(Role.USER, "And what is the daily meal allowance when travelling?"),
        ],
        documents=DOCUMENTS,
    )
    answer = (await ExtractiveAnswerer().complete(request, caller)).message.content or ""
    assert "daily meal allowance is 60 USD [2]." in answer
    assert LEAVE.ref not in cited(answer)


async def test_streaming_gives_the_same_answer_in_word_groups(caller: Caller) -> None:
    request = ask("How many days of annual leave do I get?")
    model = ExtractiveAnswerer()
    response = await model.complete(request, caller)
    deltas = await collect(model, request, caller)
    pieces = [d.content for d in deltas[:-1]]
    assert "".join(pieces) == response.message.content
    assert all(0 < len(piece.split()) <= 3 for piece in pieces)
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == response.usage


async def test_the_same_request_gets_the_same_answer(caller: Caller) -> None:
    request = ask("What is the hotel limit per night?")
    first = await ExtractiveAnswerer().complete(request, caller)
    second = await ExtractiveAnswerer().complete(request, caller)
    assert first == second


async def test_a_token_limit_shortens_the_answer(caller: Caller) -> None:
    request = ask("How many days of annual leave do I get?")
    full = await ExtractiveAnswerer().complete(request, caller)
    limited = await ExtractiveAnswerer().complete(
        ChatRequest(request.messages, documents=request.documents, max_tokens=12), caller
    )
    assert limited.finish_reason == "length"
    assert limited.usage is not None and limited.usage.output_tokens <= 12
    assert len(limited.message.content or "") < len(full.message.content or "")
    assert cited(limited.message.content or "") == [LEAVE.ref]


async def test_it_never_calls_tools_and_says_it_is_not_generative(caller: Caller) -> None:
    model = ExtractiveAnswerer()
    assert not model.capabilities.generative
    assert not model.capabilities.tool_calls
    tool = ToolDefinition("lookup", "Look something up", {"type": "object"})
    request = ChatRequest(ask("How many days of annual leave do I get?").messages, tools=[tool])
    response = await model.complete(request, caller)
    assert response.message.tool_calls == ()


def test_terms_drop_stopwords_case_accents_and_plurals() -> None:
    assert terms("What are the Policies for Café expenses?") == ["policy", "cafe", "expense"]
