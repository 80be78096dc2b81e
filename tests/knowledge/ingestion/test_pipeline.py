from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import (
    AccessFilter,
    AccessRulesError,
    KnowledgeError,
    RetrievedPassage,
    SearchMode,
    SearchRequest,
    SkippedFile,
)
from knowledge.ingestion.pipeline import IngestionPipeline, document_id_for
from knowledge.settings import KnowledgeSettings
from tests.knowledge.factories import DOCUMENTS, caller_filter, copy_of_samples

README_SKIP = SkippedFile("README.md", "no access rule matches")
LYNNE = caller_filter("contoso", "lynne.robbins@contoso.com", "employees", "finance")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return copy_of_samples(tmp_path)


@pytest.fixture
def pipeline(index: SqliteKnowledgeIndex) -> IngestionPipeline:
    return IngestionPipeline(index, KnowledgeSettings())


async def search(
    index: SqliteKnowledgeIndex, query: str, access: AccessFilter, top_k: int
) -> tuple[RetrievedPassage, ...]:
    hits = await index.search(SearchRequest(query, top_k, mode=SearchMode.TEXT), access)
    return hits.passages


async def sources(index: SqliteKnowledgeIndex, query: str) -> set[str]:
    return {p.chunk.source for p in await search(index, query, LYNNE, 50)}


async def test_the_sample_corpus_is_indexed_with_progress(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    calls: list[tuple[str, int, int]] = []
    report = await pipeline.ingest(corpus, progress=lambda *call: calls.append(call))

    assert report.files_seen == 9
    assert report.files_indexed == 8
    assert report.skipped == (README_SKIP,)
    assert report.chunks_indexed == await index.count_chunks() > 8
    assert calls == [
        (source, done, 9) for done, source in enumerate(sorted([*DOCUMENTS, "README.md"]), start=1)
    ]


async def test_chunks_carry_source_title_page_section_and_access(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    await pipeline.ingest(corpus)
    reader = caller_filter("contoso", "anyone@contoso.com")

    passages = await search(index, "snooze alert 72 hours", reader, 1)
    (guide,) = [p.chunk for p in passages]
    assert guide.source == "product/atlas-user-guide.pdf"
    assert guide.title == "Contoso Atlas 3.8 User Guide"
    assert guide.page == 4
    assert guide.access.public

    passages = await search(
        index, "Kestrel rotation", caller_filter("contoso", "a", "engineering"), 1
    )
    runbook = passages[0].chunk
    assert (runbook.source, runbook.section) == ("engineering/oncall-runbook.md", "The rotation")
    assert runbook.document_id == document_id_for("contoso", "engineering/oncall-runbook.md")
    assert runbook.chunk_id.startswith(runbook.document_id)


async def test_reingesting_replaces_instead_of_duplicating(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    first = await pipeline.ingest(corpus)
    passages_before = await search(index, "Project Falcon budget", LYNNE, 50)
    second = await pipeline.ingest(corpus)
    passages_after = await search(index, "Project Falcon budget", LYNNE, 50)

    assert (second.files_indexed, second.chunks_indexed, second.files_unchanged) == (0, 0, 8)
    assert second.skipped == first.skipped
    assert await index.count_chunks() == first.chunks_indexed
    assert [p.chunk for p in passages_after] == [p.chunk for p in passages_before]


async def test_bad_files_are_skipped_counted_and_the_rest_indexed(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    (corpus / "product" / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage without xref")
    (corpus / "finance" / "broken.docx").write_bytes(b"PK\x03\x04 truncated")
    (corpus / "product" / "logo.png").write_bytes(b"\x89PNG")
    (corpus / "product" / "empty.md").write_text("\n")

    report = await pipeline.ingest(corpus)

    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {
        "README.md",
        "finance/broken.docx",
        "product/broken.pdf",
        "product/empty.md",
        "product/logo.png",
    }
    assert "not a readable PDF" in skipped["product/broken.pdf"]
    assert "not a readable DOCX" in skipped["finance/broken.docx"]
    assert skipped["product/logo.png"] == "unsupported file type '.png'"
    assert "no extractable text" in skipped["product/empty.md"]
    assert report.files_seen == 13
    assert report.files_indexed == 8
    assert await sources(index, "Falcon") == {"finance/project-falcon-budget-memo.docx"}


async def test_hidden_files_and_the_acl_file_are_not_ingested(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    (corpus / ".git").mkdir()
    (corpus / ".git" / "notes.md").write_text("hidden folder falcon")
    (corpus / "product" / ".draft.md").write_text("hidden file falcon")

    report = await pipeline.ingest(corpus)

    assert report.files_seen == 9
    assert report.skipped == (README_SKIP,)
    found = await sources(index, "hidden folder file falcon")
    assert found
    assert not [source for source in found if source.startswith(".") or "/." in source]
    assert "acl.yaml" not in await sources(index, "rules match public groups users tenant")


async def test_files_over_the_size_limit_are_skipped(
    corpus: Path, index: SqliteKnowledgeIndex
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(max_file_mb=0.004))  # ~4 KB
    report = await pipeline.ingest(corpus)

    too_large = {s.path for s in report.skipped if s.reason == "larger than 0.004 MB"}
    assert too_large == {"finance/project-falcon-budget-memo.docx", "product/atlas-user-guide.pdf"}
    assert report.files_indexed == 6


async def test_an_explicit_acl_file_outside_the_corpus(
    corpus: Path, tmp_path: Path, pipeline: IngestionPipeline
) -> None:
    (corpus / "acl.yaml").unlink()
    rules = tmp_path / "rules.yaml"
    rules.write_text("tenant: contoso\nrules:\n  - match: 'product/**'\n    public: true\n")

    report = await pipeline.ingest(corpus, acl_file=rules)

    assert report.files_indexed == 2
    assert {s.path for s in report.skipped} == {"README.md", *DOCUMENTS[:6]}


async def test_revoking_a_rule_removes_the_documents_it_covered(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    await pipeline.ingest(corpus)
    assert await sources(index, "Falcon") == {"finance/project-falcon-budget-memo.docx"}

    acl = corpus / "acl.yaml"
    acl.write_text(acl.read_text().replace('"finance/**"', '"finance-archive/**"'))
    report = await pipeline.ingest(corpus)

    assert SkippedFile("finance/project-falcon-budget-memo.docx", "no access rule matches") in (
        report.skipped
    )
    assert await sources(index, "Falcon") == set()
    remaining = await index.documents("contoso")
    assert {state.source for state in remaining} == set(DOCUMENTS) - {
        "finance/project-falcon-budget-memo.docx"
    }
    assert await index.count_chunks() == sum(state.chunks for state in remaining)


async def test_moving_a_document_to_another_tenant_removes_it_from_the_first(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    await pipeline.ingest(corpus)
    acl = corpus / "acl.yaml"
    acl.write_text(
        acl.read_text().replace(
            "    groups: [finance]\n", "    tenant: fabrikam\n    groups: [finance]\n"
        )
    )

    report = await pipeline.ingest(corpus)

    assert await sources(index, "Falcon") == set()
    fabrikam = caller_filter("fabrikam", "x@fabrikam.com", "finance")
    passages = await search(index, "Falcon", fabrikam, 5)
    assert {p.chunk.access.tenant_id for p in passages} == {"fabrikam"}
    assert report.files_indexed == 1  # the moved document; the rest is unchanged


async def test_a_corpus_without_acl_file_is_refused(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    (corpus / "acl.yaml").unlink()
    with pytest.raises(AccessRulesError, match="ACL file not found"):
        await pipeline.ingest(corpus)
    assert await index.count_chunks() == 0


async def test_a_missing_corpus_folder_is_refused(
    tmp_path: Path, pipeline: IngestionPipeline
) -> None:
    with pytest.raises(KnowledgeError, match="corpus folder not found"):
        await pipeline.ingest(tmp_path / "nowhere")
