"""Small builders shared by the knowledge-layer tests."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fpdf import FPDF

from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from knowledge.contracts import AccessControl, AccessFilter, Chunk, EmbeddingIdentity

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "corpus"
DOCUMENTS = [
    "engineering/database-failover.html",
    "engineering/oncall-runbook.md",
    "finance/project-falcon-budget-memo.docx",
    "hr/expenses-policy.md",
    "hr/leave-policy.md",
    "hr/remote-work-policy.md",
    "product/atlas-faq.txt",
    "product/atlas-user-guide.pdf",
]
"""The sample corpus's documents that its ACL file grants (its README matches no rule)."""


def copy_of_samples(tmp_path: Path) -> Path:
    """A copy of the sample corpus that a test may change."""
    return Path(shutil.copytree(SAMPLES, tmp_path / "corpus"))


@dataclass(frozen=True)
class Caller:
    """A minimal ``KnowledgeCaller``."""

    tenant_id: str
    user_id: str
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def access(self) -> AccessFilter:
        return AccessFilter.for_caller(self)


def access(
    tenant: str = "contoso",
    *,
    public: bool = False,
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
) -> AccessControl:
    return AccessControl(tenant, public=public, users=frozenset(users), groups=frozenset(groups))


def caller_filter(tenant: str, user: str, *groups: str) -> AccessFilter:
    return AccessFilter(tenant_id=tenant, user_id=user, groups=frozenset(groups))


def make_chunks(
    document_id: str,
    *texts: str,
    acl: AccessControl,
    title: str = "Untitled",
    page: int | None = None,
    section: str | None = None,
) -> list[Chunk]:
    """One chunk per text, ids ``<document_id>-<ordinal>``, all with access ``acl``."""
    return [
        Chunk(
            chunk_id=f"{document_id}-{ordinal}",
            document_id=document_id,
            source=f"{document_id}.md",
            title=title,
            text=text,
            ordinal=ordinal,
            access=acl,
            page=page,
            section=section,
        )
        for ordinal, text in enumerate(texts)
    ]


def content_hash(chunks: Sequence[Chunk]) -> str:
    """A stand-in for a file's content hash: the hash of its chunks' texts."""
    return hashlib.sha256("\x1f".join(chunk.text for chunk in chunks).encode()).hexdigest()


class HashingEmbedder:
    """A knowledge :class:`~knowledge.contracts.Embedder` over the offline hashing model:
    lexical vectors, instant, deterministic. ``model`` renames it, to make a mismatch."""

    def __init__(self, dimensions: int = 64, *, model: str | None = None) -> None:
        self._model = HashingEmbeddingModel(dimensions=dimensions)
        self._identity = EmbeddingIdentity(model or self._model.name, dimensions)
        self.calls: list[tuple[tuple[str, ...], str]] = []

    @property
    def identity(self) -> EmbeddingIdentity:
        return self._identity

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        self.calls.append((tuple(texts), tenant_id))
        return [self._model.vector(text) for text in texts]


class ConstantEmbedder:
    """An :class:`~knowledge.contracts.Embedder` that gives every text the same unit
    vector: a chunk stored with it is the nearest neighbour of any query, whatever its
    words, so a test can tell a vector match from a text match."""

    def __init__(self, dimensions: int = 64, *, model: str = "constant") -> None:
        self._identity = EmbeddingIdentity(model, dimensions)
        self._vector = (1.0,) + (0.0,) * (dimensions - 1)

    @property
    def identity(self) -> EmbeddingIdentity:
        return self._identity

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        return [self._vector for _ in texts]


def make_pdf(
    path: Path, pages: list[list[str]], *, title: str | None = None, password: str | None = None
) -> Path:
    """A PDF at ``path`` with one page per list of lines (fpdf2), optionally encrypted."""
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    if password:
        pdf.set_encryption(owner_password="owner", user_password=password)
    pdf.set_font("Helvetica", size=12)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.cell(0, 10, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path
