"""The bundled sample corpus: its facts stay in one access scope, and retrieval trims them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import RetrievalQuery
from knowledge.ingestion.parsers import parse_document
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from knowledge.settings import KnowledgeSettings
from tests.knowledge.factories import Caller

CORPUS = Path(__file__).resolve().parents[2] / "samples" / "corpus"

ADELE = Caller("contoso", "adele.vance@contoso.com", frozenset({"employees", "hr"}))
ALEX = Caller("contoso", "alex.wilber@contoso.com", frozenset({"employees", "engineering"}))
LYNNE = Caller("contoso", "lynne.robbins@contoso.com", frozenset({"employees", "finance"}))
MEGAN = Caller("contoso", "megan.bowen@contoso.com", frozenset({"employees"}))
DIEGO = Caller("contoso", "diego.siciliani@contoso.com", frozenset({"employees"}))
GUEST = Caller("contoso", "guest@contoso.com")
FABRIKAM = Caller("fabrikam", "megan.bowen@contoso.com", frozenset({"finance", "employees"}))

DISTINCTIVE = {
    "27 days of paid annual leave": "hr/leave-policy.md",
    "anchor days": "hr/remote-work-policy.md",
    "ledgerline": "hr/expenses-policy.md",
    "kestrel": "engineering/oncall-runbook.md",
    "orders-db-prod": "engineering/database-failover.html",
    "falcon": "finance/project-falcon-budget-memo.docx",
    "4.85 million": "finance/project-falcon-budget-memo.docx",
    "cc-4471": "finance/project-falcon-budget-memo.docx",
    "ctrl+k": "product/atlas-user-guide.pdf",
    "400 days": "product/atlas-faq.txt",
}


@pytest.fixture(scope="module")
def index_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "knowledge.db"

    async def ingest() -> None:
        index = SqliteKnowledgeIndex(path)
        await index.open()
        await IngestionPipeline(index, KnowledgeSettings()).ingest(CORPUS)
        await index.close()

    asyncio.run(ingest())
    return path


@pytest.fixture
async def retriever(index_path: Path) -> AsyncIterator[SecurityTrimmedRetriever]:
    index = SqliteKnowledgeIndex(index_path)
    await index.open()
    yield SecurityTrimmedRetriever(index)
    await index.close()


def test_each_distinctive_fact_lives_in_exactly_one_document() -> None:
    texts = {
        path.relative_to(CORPUS).as_posix(): " ".join(
            " ".join(section.text.split()) for section in parse_document(path).sections
        ).lower()
        for path in CORPUS.rglob("*")
        if path.is_file() and path.name not in ("README.md", "acl.yaml")
    }
    for phrase, home in DISTINCTIVE.items():
        assert [source for source, text in texts.items() if phrase in text] == [home], phrase


@pytest.mark.parametrize(
    ("question", "source", "allowed", "denied"),
    [
        (
            "How many days of annual leave do I get?",
            "hr/leave-policy.md",
            [ADELE, DIEGO, ALEX],
            [GUEST, FABRIKAM],
        ),
        (
            "Who is on the Kestrel rotation and when does it hand over?",
            "engineering/oncall-runbook.md",
            [ALEX],
            [ADELE, DIEGO, LYNNE, MEGAN, GUEST],
        ),
        (
            "What is the budget for Project Falcon?",
            "finance/project-falcon-budget-memo.docx",
            [LYNNE, MEGAN],
            [ALEX, ADELE, DIEGO, GUEST, FABRIKAM],
        ),
        (
            "How long does Atlas keep my data?",
            "product/atlas-faq.txt",
            [GUEST, DIEGO, LYNNE],
            [FABRIKAM],
        ),
    ],
)
async def test_example_questions_are_answered_only_for_permitted_users(
    retriever: SecurityTrimmedRetriever,
    question: str,
    source: str,
    allowed: list[Caller],
    denied: list[Caller],
) -> None:
    for caller in allowed:
        result = await retriever.retrieve(RetrievalQuery(question, top_k=3), caller)
        assert result.passages[0].chunk.source == source, caller.user_id
    for caller in denied:
        result = await retriever.retrieve(RetrievalQuery(question, top_k=10), caller)
        assert all(p.chunk.source != source for p in result.passages), caller.user_id
        # Trimmed matches are counted within the caller's own tenant only.
        assert (result.trimmed_count > 0) is (caller.tenant_id == "contoso"), caller.user_id
