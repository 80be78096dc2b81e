"""Property: whatever the corpus, ACLs, identity, query and mode, retrieval through the
embedded index never returns a chunk the caller may not see, and the empty identity
(no user id, no groups) gets nothing."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import AccessControl, RetrievalQuery, SearchMode
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.knowledge.factories import Caller, HashingEmbedder, content_hash, make_chunks

TENANTS = st.sampled_from(["contoso", "fabrikam"])
USERS = st.sampled_from(["", "alice", "bob", "group:hr", "user:alice"])
GROUPS = st.sampled_from(["hr", "finance", "alice", "user:bob", ""])
WORDS = st.sampled_from(["falcon", "budget", "leave", "days", "policy", "office", "zürich"])

ACLS = st.builds(
    AccessControl,
    tenant_id=TENANTS,
    public=st.booleans(),
    users=st.frozensets(USERS, max_size=2),
    groups=st.frozensets(GROUPS, max_size=2),
)
DOCUMENTS = st.lists(
    st.tuples(ACLS, st.lists(st.lists(WORDS, min_size=1, max_size=6), min_size=1, max_size=3)),
    min_size=1,
    max_size=8,
)
CALLERS = st.builds(Caller, TENANTS, USERS, st.frozensets(GROUPS, max_size=3))
QUERIES = st.lists(WORDS, min_size=1, max_size=4).map(" ".join)


async def _retrieve(
    path: Path,
    documents: list[tuple[AccessControl, list[list[str]]]],
    callers: list[Caller],
    query: str,
    mode: SearchMode,
) -> list[tuple[Caller, list[AccessControl]]]:
    embedder = HashingEmbedder(32)
    index = SqliteKnowledgeIndex(path)
    await index.open()
    try:
        for n, (acl, texts) in enumerate(documents):
            chunks = make_chunks(f"d{n}", *(" ".join(words) for words in texts), acl=acl)
            vectors = await embedder.embed([c.text for c in chunks], tenant_id=acl.tenant_id)
            await index.replace_document(
                f"d{n}",
                chunks,
                content_hash=content_hash(chunks),
                vectors=vectors,
                embedding=embedder.identity,
            )
        retriever = SecurityTrimmedRetriever(index, embedder)
        seen = []
        for caller in callers:
            result = await retriever.retrieve(RetrievalQuery(query, 50, mode), caller)
            seen.append((caller, [p.chunk.access for p in result.passages]))
        return seen
    finally:
        await index.close()


@settings(max_examples=50, deadline=None)
@given(
    documents=DOCUMENTS,
    callers=st.lists(CALLERS, min_size=1, max_size=4),
    query=QUERIES,
    mode=st.sampled_from(list(SearchMode)),
)
def test_no_returned_chunk_is_outside_the_callers_permissions(
    documents: list[tuple[AccessControl, list[list[str]]]],
    callers: list[Caller],
    query: str,
    mode: SearchMode,
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        seen = asyncio.run(_retrieve(Path(directory) / "k.db", documents, callers, query, mode))
    for caller, returned in seen:
        for acl in returned:
            assert caller.access.allows(acl)
        if not caller.user_id and not caller.groups:
            assert returned == []
