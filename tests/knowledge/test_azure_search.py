"""The Azure AI Search backend, driven through the real SDK against a REST-level fake
of the service that evaluates the OData filter it receives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from azure.core.credentials import AzureKeyCredential

from knowledge.backends.azure_search import (
    AzureSearchKnowledgeIndex,
    document_key,
    odata_literal,
    retry_after_seconds,
    security_filter,
)
from knowledge.contracts import (
    EmbeddingIdentity,
    EmbeddingMismatch,
    IndexUnavailable,
    RetrievalQuery,
    SearchMode,
    SearchRequest,
)
from knowledge.retrieval import SecurityTrimmedRetriever
from knowledge.settings import AzureSearchSettings
from tests.knowledge.factories import (
    Caller,
    ConstantEmbedder,
    HashingEmbedder,
    access,
    caller_filter,
    content_hash,
    make_chunks,
)
from tests.knowledge.index_contract import KnowledgeIndexContract, put, text_search
from tests.support.search_fake import FakeSearchService, ODataError, parse_filter, serve_search

IDENTITY = HashingEmbedder(64).identity
READER = caller_filter("contoso", "reader@contoso.com")
CALLER = Caller("contoso", "reader@contoso.com")


@pytest.fixture(scope="module")
def service() -> Iterator[FakeSearchService]:
    with serve_search() as fake:
        yield fake


class Waits:
    """Records the backoff waits instead of sleeping them."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def _index(service: FakeSearchService, name: str, waits: Waits) -> AzureSearchKnowledgeIndex:
    return AzureSearchKnowledgeIndex(
        service.endpoint,
        name,
        credential=AzureKeyCredential(service.api_key),
        embedding=IDENTITY,
        batch_size=4,
        max_retries=3,
        sleep=waits,
        connection_verify=service.ca_file,
    )


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
async def index(
    service: FakeSearchService, request: pytest.FixtureRequest, waits: Waits
) -> AsyncIterator[AzureSearchKnowledgeIndex]:
    # A fresh index per test: the name is unique, the service is shared.
    name = f"t{abs(hash(request.node.nodeid)):x}"[:60]
    service.indexes.pop(name, None)
    opened = _index(service, name, waits)
    await opened.open()
    service.requests.clear()
    yield opened
    await opened.close()


class TestAzureSearchKnowledgeIndex(KnowledgeIndexContract):
    @pytest.fixture
    async def index(  # type: ignore[override]
        self, index: AzureSearchKnowledgeIndex
    ) -> AzureSearchKnowledgeIndex:
        return index


# --- the security filter ------------------------------------------------------------------


def test_literals_double_single_quotes() -> None:
    assert odata_literal("o'brien") == "'o''brien'"
    assert odata_literal("''") == "''''''"


def test_the_filter_names_the_tenant_user_and_groups() -> None:
    filter_ = security_filter(caller_filter("contoso", "alice@contoso.com", "hr", "ops"))
    assert filter_ == (
        "kind eq 'chunk' and tenant_id eq 'contoso' and (public eq true"
        " or user_ids/any(u: u eq 'alice@contoso.com')"
        " or group_ids/any(g: search.in(g, 'hr|ops', '|')))"
    )


def test_no_identity_has_no_filter_and_so_no_query() -> None:
    assert security_filter(caller_filter("contoso", "")) is None
    assert security_filter(caller_filter("contoso", "", "")) is None
    assert security_filter(caller_filter("", "alice@contoso.com", "hr")) is None
    # Groups alone are an identity; the empty user id is then left out.
    assert "user_ids" not in (security_filter(caller_filter("contoso", "", "hr")) or "")


@pytest.mark.parametrize(
    ("groups", "admitted", "refused"),
    [
        pytest.param(("o'brien",), "o'brien", "obrien", id="quote"),
        pytest.param(("a,b", "c"), "a,b", "a", id="comma"),
        pytest.param(("a|b", "c,d"), "c,d", "b", id="pipe-and-comma"),
        pytest.param(("x|,;\x1f\x1ey", "z"), "x|,;\x1f\x1ey", "x", id="every-delimiter-in-a-name"),
        pytest.param(("') or true or ('",), "') or true or ('", "anything", id="injection"),
    ],
)
def test_group_names_with_delimiters_and_quotes_match_exactly(
    groups: tuple[str, ...], admitted: str, refused: str
) -> None:
    filter_ = security_filter(caller_filter("contoso", "u", *groups))
    assert filter_ is not None
    predicate = parse_filter(filter_)

    def chunk(*names: str) -> dict[str, object]:
        return {
            "kind": "chunk",
            "tenant_id": "contoso",
            "public": False,
            "user_ids": [],
            "group_ids": list(names),
        }

    assert predicate(chunk(admitted))
    assert not predicate(chunk(refused))
    assert not predicate({**chunk(admitted), "tenant_id": "fabrikam"})


def test_the_fake_refuses_filters_outside_the_subset() -> None:
    for text in ["tenant_id ne 'x'", "not public", "search.ismatch('x')", "a eq 'unclosed"]:
        with pytest.raises(ODataError):
            parse_filter(text)


# --- through the SDK ------------------------------------------------------------------------


async def test_a_quoted_group_and_user_reach_the_service_escaped(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService
) -> None:
    await put(
        index, "irish", make_chunks("irish", "shamrock plans", acl=access(groups=["o'brien"]))
    )
    await put(index, "comma", make_chunks("comma", "shamrock tea", acl=access(groups=["a,b"])))
    await put(index, "named", make_chunks("named", "shamrock mail", acl=access(users=["d'arcy"])))
    service.requests.clear()

    passages, trimmed = await text_search(
        index, "shamrock", caller_filter("contoso", "x", "o'brien"), 5
    )
    assert [p.chunk.document_id for p in passages] == ["irish"]
    assert trimmed == 2
    passages, _ = await text_search(index, "shamrock", caller_filter("contoso", "y", "a", "b"), 5)
    assert passages == []
    passages, _ = await text_search(index, "shamrock", caller_filter("contoso", "z", "a,b"), 5)
    assert [p.chunk.document_id for p in passages] == ["comma"]
    passages, _ = await text_search(index, "shamrock", caller_filter("contoso", "d'arcy"), 5)
    assert [p.chunk.document_id for p in passages] == ["named"]
    filters = [body["filter"] for body in service.searches()]
    assert any("group_ids/any(g: search.in(g, 'o''brien', '|'))" in f for f in filters)
    assert any("user_ids/any(u: u eq 'd''arcy')" in f for f in filters)
    assert all("tenant_id eq 'contoso'" in f for f in filters)


async def test_every_query_carries_the_security_filter(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService
) -> None:
    embedder = HashingEmbedder(64)
    await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)), embedder)
    service.requests.clear()
    for mode in SearchMode:
        (vector,) = await embedder.embed(["holidays"], tenant_id="contoso")
        await index.search(SearchRequest("holidays", 5, mode, vector, IDENTITY), READER)
    await index.get_chunk("faq-0", READER)

    bodies = service.searches()
    ranked = [b for b in bodies if b.get("top") != 0]
    assert len(ranked) == 4
    assert all("user_ids/any(u: u eq 'reader@contoso.com')" in b["filter"] for b in ranked)
    vector_bodies = [b for b in ranked if b.get("vectorQueries")]
    assert len(vector_bodies) == 2
    assert all(b["vectorFilterMode"] == "preFilter" for b in vector_bodies)
    # The only queries without the caller's grants are the privileged counts.
    privileged = [b for b in bodies if "user_ids" not in b["filter"]]
    assert privileged
    assert all(b["top"] == 0 and b["count"] is True and "select" not in b for b in privileged)


@pytest.mark.parametrize("mode", list(SearchMode))
async def test_the_empty_identity_is_denied_without_a_request(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, mode: SearchMode
) -> None:
    vector = (1.0,) + (0.0,) * 63
    for caller in (caller_filter("contoso", ""), caller_filter("", "a@contoso.com", "hr")):
        hits = await index.search(SearchRequest("holidays", 5, mode, vector, IDENTITY), caller)
        assert hits.passages == ()
        assert await index.get_chunk("faq-0", caller) is None
    assert service.requests == []


async def test_throttled_requests_are_retried_honouring_retry_after(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    service.fail_next(429, retry_after="7", path="search.index")
    service.fail_next(503, path="search.index")
    await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)))
    service.fail_next(503, times=2, path="search.post.search")

    passages, _ = await text_search(index, "holidays", READER, 5)

    assert [p.chunk.chunk_id for p in passages] == ["faq-0"]
    assert waits.seconds[0] >= 7  # the service asked for seven seconds
    assert len(waits.seconds) == 4
    assert all(wait >= 0 for wait in waits.seconds)


async def test_backoff_grows_exponentially_with_jitter(index: AzureSearchKnowledgeIndex) -> None:
    ceilings = [0.5 * 2**attempt for attempt in range(4)]
    samples = [[index._backoff(attempt, None) for _ in range(200)] for attempt in range(4)]
    for ceiling, drawn in zip(ceilings, samples, strict=True):
        assert all(0 <= wait <= ceiling for wait in drawn)
        assert len(set(drawn)) > 100  # jittered, not a fixed schedule
    assert max(samples[3]) > max(samples[0])


async def test_throttling_that_never_ends_fails_closed(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)))
    service.fail_next(429, times=10, path="search.post.search")
    with pytest.raises(IndexUnavailable, match="HTTP 429"):
        await text_search(index, "holidays", READER, 5)
    service._failures.clear()
    assert len(waits.seconds) >= 3


@pytest.mark.parametrize("status", [500, 400, 403])
async def test_errors_fail_closed_without_retry(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits, status: int
) -> None:
    await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)))
    service.fail_next(status, path="search.post.search")
    with pytest.raises(IndexUnavailable) as raised:
        await text_search(index, "holidays", READER, 5)
    assert f"HTTP {status}" in str(raised.value)
    assert "injected" not in str(raised.value)  # no raw service message for users
    assert waits.seconds == []
    service._failures.clear()


async def test_a_wrong_key_fails_closed(service: FakeSearchService, waits: Waits) -> None:
    index = AzureSearchKnowledgeIndex(
        service.endpoint,
        "wrong-key",
        credential=AzureKeyCredential("not-the-key"),
        embedding=IDENTITY,
        sleep=waits,
        connection_verify=service.ca_file,
    )
    with pytest.raises(IndexUnavailable, match="HTTP 403"):
        await index.open()
    await index.close()


async def test_an_unreachable_service_fails_closed(waits: Waits) -> None:
    index = AzureSearchKnowledgeIndex(
        "https://127.0.0.1:9",
        "gone",
        credential=AzureKeyCredential("k"),
        embedding=IDENTITY,
        sleep=waits,
    )
    with pytest.raises(IndexUnavailable):
        await index.open()
    await index.close()


async def test_documents_failing_transiently_are_resent_and_others_reported(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    chunks = make_chunks("big", *(f"part {n}" for n in range(10)), acl=access(public=True))
    service.fail_documents(document_key("big-3"), 503, 429)
    await put(index, "big", chunks)
    assert await index.count_chunks() == 10
    assert len(waits.seconds) == 2
    uploads = [r for r in service.requests if r.path.endswith("search.index")]
    assert max(len((r.body or {})["value"]) for r in uploads) <= 4  # batch_size

    service.fail_documents(document_key("bad-1"), 400)
    with pytest.raises(
        IndexUnavailable, match=r"1 of 2 index writes for document 'bad' failed: bad-1"
    ):
        await put(index, "bad", make_chunks("bad", "x", "y", acl=access(public=True)))


async def test_the_schema_records_vectors_acl_fields_and_semantics(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService
) -> None:
    schema = next(
        i.schema for i in service.indexes.values() if i.schema["name"] == index._index_name
    )
    fields = {f["name"]: f for f in schema["fields"]}
    assert fields["id"]["key"] is True
    assert fields["vector"]["dimensions"] == 64
    assert fields["vector"]["type"] == "Collection(Edm.Single)"
    assert fields["user_ids"]["type"] == "Collection(Edm.String)"
    assert all(fields[n]["filterable"] for n in ("tenant_id", "user_ids", "group_ids", "public"))
    assert schema["semantic"]["configurations"][0]["name"] == "lamina-semantic"


async def test_reopening_keeps_the_recorded_embedding_and_vector_size(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    embedder = HashingEmbedder(64)
    await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)), embedder)
    other = AzureSearchKnowledgeIndex(
        service.endpoint,
        index._index_name,
        credential=AzureKeyCredential(service.api_key),
        embedding=EmbeddingIdentity("text-embedding-3-small", 1536),
        sleep=waits,
        connection_verify=service.ca_file,
    )
    await other.open()  # a different configured model does not break the schema
    assert other.embedding == IDENTITY
    await other.close()


async def test_the_semantic_ranker_is_asked_for_when_enabled(
    service: FakeSearchService, waits: Waits
) -> None:
    settings = AzureSearchSettings(
        endpoint=service.endpoint,
        index_name="semantic-ranked",
        api_key=service.api_key,  # type: ignore[arg-type]
        semantic_ranker=True,
    )
    index = AzureSearchKnowledgeIndex.from_settings(
        settings, IDENTITY, connection_verify=service.ca_file
    )
    await index.open()
    try:
        embedder = HashingEmbedder(64)
        await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)), embedder)
        (vector,) = await embedder.embed(["holidays"], tenant_id="contoso")
        hits = await index.search(
            SearchRequest("holidays", 5, SearchMode.HYBRID, vector, IDENTITY), READER
        )
        assert [p.chunk.chunk_id for p in hits.passages] == ["faq-0"]
        body = service.searches()[-3:]
        ranked = next(b for b in body if b.get("top") == 5)
        assert ranked["queryType"] == "semantic"
        assert ranked["semanticConfiguration"] == "lamina-semantic"
    finally:
        await index.close()


def test_settings_without_an_endpoint_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="LAMINA_KNOWLEDGE__AZURE_SEARCH__ENDPOINT"):
        AzureSearchKnowledgeIndex.from_settings(AzureSearchSettings(), IDENTITY)


def test_retry_after_is_read_in_every_form_the_service_sends() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"x-ms-retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"Retry-After": "7"}) == 7
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 20 < (retry_after_seconds({"Retry-After": later}) or 0) <= 30
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None


# --- writes that fail part-way, and what other processes wrote ---------------------------


async def test_an_access_change_that_failed_part_way_is_not_taken_as_done(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService
) -> None:
    chunks = make_chunks("memo", "one", "two", "three", acl=access(users=["alice@contoso.com"]))
    await put(index, "memo", chunks)
    (before,) = await index.documents("contoso")
    scope = await index.access_scope(READER)

    # Alice's access is revoked, but the service refuses the write of one chunk.
    service.fail_documents(document_key("memo-1"), 400)
    with pytest.raises(IndexUnavailable):
        await index.update_access("memo", access(users=["bob@contoso.com"]))

    (state,) = await index.documents("contoso")
    assert before.content_hash != ""
    assert state.content_hash == ""  # the next ingest replaces the whole document
    assert state.chunks == 3
    # Caches keyed on the old generation may hold answers from chunks that did change.
    assert (await index.access_scope(READER)).generation != scope.generation


async def test_a_replacement_that_failed_part_way_is_not_taken_as_done(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService
) -> None:
    await put(index, "memo", make_chunks("memo", "one", "two", acl=access(public=True)))
    scope = await index.access_scope(READER)

    service.fail_documents(document_key("memo-0"), 400)
    with pytest.raises(IndexUnavailable):
        await put(index, "memo", make_chunks("memo", "uno", "dos", acl=access(public=True)))

    (state,) = await index.documents("contoso")
    assert state.content_hash == ""
    assert (await index.access_scope(READER)).generation != scope.generation


async def test_a_consistent_document_reports_its_hash_and_access(
    index: AzureSearchKnowledgeIndex,
) -> None:
    acl = access(groups=["hr"])
    chunks = make_chunks("leave", "27 days", "carry over 5", acl=acl)
    await put(index, "leave", chunks)
    (state,) = await index.documents("contoso")
    assert state.content_hash == content_hash(chunks)
    assert state.access == acl
    assert state.chunks == 2


async def test_hybrid_uses_vectors_another_process_wrote_after_this_one_opened(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    embedder = ConstantEmbedder(64)
    retriever = SecurityTrimmedRetriever(index, embedder)
    assert index.embedding is None
    ingest = _index(service, index._index_name, waits)
    await ingest.open()
    try:
        await put(
            ingest, "policy", make_chunks("policy", "27 days", acl=access(public=True)), embedder
        )
    finally:
        await ingest.close()

    # No word in common with the chunk: only its vector can find it.
    result = await retriever.retrieve(RetrievalQuery("parental allowance"), CALLER)
    assert [p.chunk.chunk_id for p in result.passages] == ["policy-0"]
    assert index.embedding == embedder.identity


async def test_a_query_from_a_model_that_rebuilt_the_index_elsewhere_is_refused(
    index: AzureSearchKnowledgeIndex, service: FakeSearchService, waits: Waits
) -> None:
    ingest = _index(service, index._index_name, waits)
    await ingest.open()
    try:
        await put(
            ingest,
            "faq",
            make_chunks("faq", "holidays", acl=access(public=True)),
            ConstantEmbedder(64),
        )
    finally:
        await ingest.close()
    other = HashingEmbedder(64)
    (vector,) = await other.embed(["holidays"], tenant_id="contoso")
    request = SearchRequest("holidays", 5, SearchMode.HYBRID, vector, other.identity)
    with pytest.raises(EmbeddingMismatch, match="constant"):
        await index.search(request, READER)


async def test_the_vector_weight_reaches_the_services_fusion_of_hybrid_queries_only(
    service: FakeSearchService,
) -> None:
    """Azure AI Search fuses hybrid lists itself (RRF); a vector query's ``weight`` is the
    one fusion knob it takes. A pure vector query has nothing to fuse, so none is sent."""
    settings = AzureSearchSettings(
        endpoint=service.endpoint,
        index_name="vector-weighted",
        api_key=service.api_key,  # type: ignore[arg-type]
        vector_weight=2.5,
    )
    index = AzureSearchKnowledgeIndex.from_settings(
        settings, IDENTITY, connection_verify=service.ca_file
    )
    await index.open()
    try:
        embedder = HashingEmbedder(64)
        await put(index, "faq", make_chunks("faq", "holidays", acl=access(public=True)), embedder)
        (vector,) = await embedder.embed(["holidays"], tenant_id="contoso")
        sent: dict[SearchMode, list[object]] = {}
        for mode in (SearchMode.HYBRID, SearchMode.VECTOR):
            hits = await index.search(SearchRequest("holidays", 5, mode, vector, IDENTITY), READER)
            assert [p.chunk.chunk_id for p in hits.passages] == ["faq-0"]
            ranked = next(b for b in reversed(service.searches()) if b.get("top") == 5)
            sent[mode] = [q.get("weight") for q in ranked["vectorQueries"]]
        assert sent == {SearchMode.HYBRID: [2.5], SearchMode.VECTOR: [None]}
    finally:
        await index.close()
