"""Fixtures shared by the ingestion tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.document_intelligence_fake import (
    FakeDocumentIntelligence,
    serve_document_intelligence,
)


@pytest.fixture(scope="module")
def served() -> Iterator[FakeDocumentIntelligence]:
    """The Document Intelligence fake on loopback, one per test module."""
    with serve_document_intelligence() as fake:
        yield fake
