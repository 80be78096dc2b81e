"""The contract every ``KnowledgeIndex`` backend passes.

Mix :class:`KnowledgeIndexContract` into a ``Test...`` class and override the
``index`` fixture to yield an opened, empty index of the backend under test. The
``embedder`` fixture gives the vectors of the vector and hybrid tests (offline hashing
embeddings, 64 dimensions); a backend may override it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence

import pytest

from knowledge.contracts import (
    AccessControl,
    AccessFilter,
    Chunk,
    Embedder,
    EmbeddingMismatch,
    KnowledgeIndex,
    RetrievedPassage,
    SearchMode,
    SearchRequest,
)
from tests.knowledge.factories import (
    HashingEmbedder,
    access,
    caller_filter,
    content_hash,
    make_chunks,
)

HR = access(groups=["hr"])
FINANCE = access(groups=["finance"], users=["ceo@contoso.com"])
PUBLIC = access(public=True)

ALICE_HR = caller_filter("contoso", "alice@contoso.com", "hr", "employees")
BOB_ENGINEER = caller_filter("contoso", "bob@contoso.com", "engineering")
CEO = caller_filter("contoso", "ceo@contoso.com")
NOBODY = caller_filter("contoso", "guest@contoso.com")

SECRET_TEXT = (
    "Project Falcon has an approved FY2026 budget of USD 4.85 million, booked to cost "
    "centre CC-4471. Do not share these figures outside Finance."
)
SECRET_TITLE = "Project Falcon budget memo"

HOSTILE_QUERIES = [
    '"',
    '""',
    '"unbalanced',
    "'",
    "*",
    "falcon*",
    "^falcon",
    "-falcon",
    "+",
    "NOT",
    "AND",
    "OR",
    "falcon AND",
    "OR falcon",
    "NEAR(falcon budget, 2)",
    "NEAR/3",
    "title:falcon",
    "{text title}: falcon",
    "text : falcon",
    "(",
    "())",
    "falcon)) OR ((",
    ":",
    "\\",
    "\x00",
    "falcon\x00budget",
    "'; DROP TABLE chunks; --",
    "1=1 OR 'a'='a'",
    "🦅🦅🦅",
    "Ünïcödé Zürich 東京 ✓",
    "\u202eevil\u202c",
    "café AND naïve OR *",
    "   \t\n  ",
    "a " * 500,
    "falcon " * 300,
]


async def put(
    index: KnowledgeIndex,
    document_id: str,
    chunks: Sequence[Chunk],
    embedder: Embedder | None = None,
) -> None:
    """Store a document, with its vectors when an ``embedder`` is given."""
    if embedder is None:
        await index.replace_document(document_id, chunks, content_hash=content_hash(chunks))
        return
    tenant = chunks[0].access.tenant_id if chunks else ""
    await index.replace_document(
        document_id,
        chunks,
        content_hash=content_hash(chunks),
        vectors=await embedder.embed([chunk.text for chunk in chunks], tenant_id=tenant),
        embedding=embedder.identity,
    )


async def text_search(
    index: KnowledgeIndex, text: str, access: AccessFilter, top_k: int
) -> tuple[list[RetrievedPassage], int]:
    hits = await index.search(SearchRequest(text, top_k, SearchMode.TEXT), access)
    return list(hits.passages), hits.trimmed


async def search(
    index: KnowledgeIndex,
    embedder: Embedder,
    text: str,
    access: AccessFilter,
    top_k: int,
    mode: SearchMode,
) -> tuple[list[RetrievedPassage], int]:
    (vector,) = await embedder.embed([text], tenant_id=access.tenant_id)
    request = SearchRequest(text, top_k, mode, vector=vector, embedding=embedder.identity)
    hits = await index.search(request, access)
    return list(hits.passages), hits.trimmed


VECTOR_MODES = [SearchMode.VECTOR, SearchMode.HYBRID]


class KnowledgeIndexContract:
    """Shared behaviour of index backends: storage, ranking and, above all, ACL trimming."""

    @pytest.fixture
    def index(self) -> KnowledgeIndex:
        """Overridden by each backend's test class: an opened, empty index."""
        raise NotImplementedError("a backend's test class must provide the index fixture")

    @pytest.fixture
    def embedder(self) -> Embedder:
        return HashingEmbedder(64)

    # --- storage -------------------------------------------------------------

    async def test_has_a_name(self, index: KnowledgeIndex) -> None:
        assert isinstance(index.name, str)
        assert index.name

    async def test_a_new_index_is_empty(self, index: KnowledgeIndex) -> None:
        assert await index.count_chunks() == 0
        assert await text_search(index, "anything at all", ALICE_HR, 5) == ([], 0)

    async def test_chunks_round_trip_with_every_field(self, index: KnowledgeIndex) -> None:
        stored = make_chunks(
            "guide",
            "Press Ctrl+K to open the command palette.",
            "Anomaly alerts fire at three standard deviations.",
            acl=access(public=True, users=["u@contoso.com"], groups=["g1", "g2"]),
            title="Atlas guide",
            page=3,
            section="Alerts",
        )
        await put(index, "guide", stored)

        assert await index.count_chunks() == 2
        for chunk in stored:
            assert await index.get_chunk(chunk.chunk_id, NOBODY) == chunk
        passages, _ = await text_search(index, "palette", NOBODY, 5)
        assert [p.chunk for p in passages] == [stored[0]]

    async def test_replace_document_replaces_rather_than_appends(
        self, index: KnowledgeIndex
    ) -> None:
        await put(
            index, "leave", make_chunks("leave", "27 days of leave", "carry over five days", acl=HR)
        )
        await put(index, "other", make_chunks("other", "unrelated text", acl=HR))
        await put(index, "leave", make_chunks("leave", "30 days of leave from next year", acl=HR))

        assert await index.count_chunks() == 2
        assert await index.get_chunk("leave-1", ALICE_HR) is None
        assert (await text_search(index, "carry", ALICE_HR, 5))[0] == []
        passages, _ = await text_search(index, "leave", ALICE_HR, 5)
        assert [p.chunk.text for p in passages] == ["30 days of leave from next year"]

    async def test_replacing_with_no_chunks_removes_the_document(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "leave", make_chunks("leave", "27 days of leave", acl=HR))
        await put(index, "leave", [])
        assert await index.count_chunks() == 0
        assert await text_search(index, "leave", ALICE_HR, 5) == ([], 0)

    async def test_delete_document_removes_only_that_document(self, index: KnowledgeIndex) -> None:
        await put(index, "a", make_chunks("a", "falcon one", "falcon two", acl=HR))
        await put(index, "b", make_chunks("b", "falcon three", acl=HR))
        await index.delete_document("a")
        await index.delete_document("never-indexed")

        assert await index.count_chunks() == 1
        assert await index.get_chunk("a-0", ALICE_HR) is None
        passages, trimmed = await text_search(index, "falcon", ALICE_HR, 5)
        assert [p.chunk.chunk_id for p in passages] == ["b-0"]
        assert trimmed == 0

    async def test_concurrent_writes_and_searches_stay_consistent(
        self, index: KnowledgeIndex
    ) -> None:
        async def write(n: int) -> None:
            await put(
                index, f"doc{n}", make_chunks(f"doc{n}", f"shared term {n}", "shared again", acl=HR)
            )

        await asyncio.gather(
            *(write(n) for n in range(10)),
            *(text_search(index, "shared", ALICE_HR, 3) for _ in range(10)),
        )
        assert await index.count_chunks() == 20
        passages, trimmed = await text_search(index, "shared", ALICE_HR, 50)
        assert len(passages) == 20
        assert trimmed == 0

    # --- ranking -------------------------------------------------------------

    async def test_better_matches_rank_first_with_higher_scores(
        self, index: KnowledgeIndex
    ) -> None:
        await put(
            index,
            "runbook",
            make_chunks(
                "runbook",
                "The office kitchen is cleaned on Fridays.",
                "The Kestrel rotation hands over on Monday; Kestrel pages go to the primary.",
                "Kestrel is mentioned once here among many other words about the weather.",
                acl=PUBLIC,
            ),
        )
        passages, _ = await text_search(index, "Kestrel rotation hand-over", NOBODY, 5)

        assert [p.chunk.chunk_id for p in passages] == ["runbook-1", "runbook-2"]
        assert passages[0].score > passages[1].score

    async def test_top_k_limits_the_passages(self, index: KnowledgeIndex) -> None:
        texts = [f"expense rule number {n}" for n in range(8)]
        await put(index, "expenses", make_chunks("expenses", *texts, acl=PUBLIC))
        passages, trimmed = await text_search(index, "expense", NOBODY, 3)
        assert len(passages) == 3
        assert trimmed == 0

    async def test_queries_without_terms_return_nothing(self, index: KnowledgeIndex) -> None:
        await put(index, "faq", make_chunks("faq", "anything", acl=PUBLIC))
        for text in ["", "   ", "?!", "***", '""']:
            assert await text_search(index, text, NOBODY, 5) == ([], 0)

    async def test_unicode_text_is_searchable(self, index: KnowledgeIndex) -> None:
        await put(
            index,
            "offices",
            make_chunks("offices", "Offices in Zürich and 東京 open at nine.", acl=PUBLIC),
        )
        for query in ["zürich", "ZÜRICH", "東京"]:
            passages, _ = await text_search(index, query, NOBODY, 5)
            assert [p.chunk.chunk_id for p in passages] == ["offices-0"], query

    # --- access control ------------------------------------------------------

    async def test_tenants_are_isolated(self, index: KnowledgeIndex) -> None:
        text = "The travel policy allows premium economy on long flights."
        await put(index, "contoso-travel", make_chunks("contoso-travel", text, acl=PUBLIC))
        await put(
            index,
            "fabrikam-travel",
            make_chunks(
                "fabrikam-travel", text, acl=access("fabrikam", public=True, groups=["hr"])
            ),
        )
        await put(
            index,
            "fabrikam-hr",
            make_chunks("fabrikam-hr", text, acl=access("fabrikam", users=["alice@contoso.com"])),
        )

        # Same user id and group names in another tenant grant nothing here.
        passages, trimmed = await text_search(index, "travel policy", ALICE_HR, 10)
        assert [p.chunk.chunk_id for p in passages] == ["contoso-travel-0"]
        assert trimmed == 0  # other tenants' matches are not this tenant's to count
        assert await index.get_chunk("fabrikam-hr-0", ALICE_HR) is None

        fabrikam = caller_filter("fabrikam", "carol@fabrikam.com", "hr")
        passages, trimmed = await text_search(index, "travel policy", fabrikam, 10)
        assert [p.chunk.chunk_id for p in passages] == ["fabrikam-travel-0"]
        assert trimmed == 1

    @pytest.mark.parametrize(
        ("acl", "caller", "visible"),
        [
            pytest.param(PUBLIC, NOBODY, True, id="public-to-any-tenant-member"),
            pytest.param(access("fabrikam", public=True), NOBODY, False, id="public-other-tenant"),
            pytest.param(HR, ALICE_HR, True, id="group-member"),
            pytest.param(HR, BOB_ENGINEER, False, id="not-a-group-member"),
            pytest.param(HR, NOBODY, False, id="caller-without-groups"),
            pytest.param(access(groups=["x", "hr"]), ALICE_HR, True, id="one-group-of-many"),
            pytest.param(access(groups=["HR"]), ALICE_HR, False, id="group-names-are-exact"),
            pytest.param(FINANCE, CEO, True, id="listed-user"),
            pytest.param(FINANCE, ALICE_HR, False, id="unlisted-user"),
            pytest.param(
                access(users=["hr"]),
                caller_filter("contoso", "alice@contoso.com", "hr"),
                False,
                id="group-named-like-a-listed-user",
            ),
            pytest.param(
                access(groups=["ceo@contoso.com"]), CEO, False, id="user-named-like-a-listed-group"
            ),
            pytest.param(
                access("fabrikam", users=["ceo@contoso.com"]), CEO, False, id="user-other-tenant"
            ),
        ],
    )
    async def test_access_semantics(
        self, index: KnowledgeIndex, acl: AccessControl, caller: AccessFilter, visible: bool
    ) -> None:
        assert caller.allows(acl) is visible, "the case contradicts the reference rule"
        (chunk,) = make_chunks("doc", "quarterly figures for the board", acl=acl)
        await put(index, "doc", [chunk])

        passages, trimmed = await text_search(index, "quarterly figures", caller, 5)
        assert [p.chunk for p in passages] == ([chunk] if visible else [])
        same_tenant = acl.tenant_id == caller.tenant_id
        assert trimmed == (1 if same_tenant and not visible else 0)
        assert await index.get_chunk(chunk.chunk_id, caller) == (chunk if visible else None)

    @pytest.mark.parametrize(
        "query",
        [
            SECRET_TEXT,
            SECRET_TITLE,
            "Falcon",
            "falcon budget 4.85 million CC-4471",
            "What is the budget for Project Falcon?",
            '"Project Falcon"',
            "falcon*",
            "title:falcon",
            "NEAR(project falcon)",
            "falcon OR 1=1",
            "*",
            "FALCON",
            "falcon\x00budget",
            "Falcon 🦅 Zürich",
        ],
    )
    async def test_a_forbidden_chunk_is_never_returned_whatever_the_query(
        self, index: KnowledgeIndex, query: str
    ) -> None:
        secret = make_chunks("memo", SECRET_TEXT, acl=FINANCE, title=SECRET_TITLE, section="Falcon")
        await put(index, "memo", secret)
        await put(
            index,
            "expenses",
            make_chunks("expenses", "Meal allowance is 60 USD a day; budget carefully.", acl=HR),
        )

        for caller in (
            ALICE_HR,
            BOB_ENGINEER,
            NOBODY,
            caller_filter("fabrikam", "ceo@contoso.com", "finance"),
        ):
            passages, _ = await text_search(index, query, caller, 50)
            assert all(p.chunk.document_id != "memo" for p in passages)
            assert await index.get_chunk("memo-0", caller) is None

        passages, _ = await text_search(index, SECRET_TEXT, CEO, 5)
        assert [p.chunk.chunk_id for p in passages] == ["memo-0"]

    async def test_filtering_happens_before_ranking_so_recall_is_kept(
        self, index: KnowledgeIndex
    ) -> None:
        # Forty forbidden chunks that outscore everything, and one weak permitted match.
        for n in range(40):
            await put(
                index,
                f"secret{n}",
                make_chunks(f"secret{n}", "falcon falcon falcon budget falcon", acl=FINANCE),
            )
        filler = " ".join(f"word{n}" for n in range(120))
        await put(
            index,
            "newsletter",
            make_chunks(
                "newsletter", f"{filler} a falcon was seen near the office {filler}", acl=HR
            ),
        )

        passages, trimmed = await text_search(index, "falcon budget", ALICE_HR, 3)

        assert [p.chunk.chunk_id for p in passages] == ["newsletter-0"]
        assert trimmed == 40

    async def test_trimmed_count_counts_only_matches_the_filter_excluded(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "f1", make_chunks("f1", "falcon a", "falcon b", "falcon c", acl=FINANCE))
        await put(index, "f2", make_chunks("f2", "unrelated", "words", acl=FINANCE))
        await put(index, "h1", make_chunks("h1", "falcon d", "falcon e", acl=HR))
        await put(index, "x1", make_chunks("x1", "falcon f", acl=access("fabrikam", public=True)))

        passages, trimmed = await text_search(index, "falcon", ALICE_HR, 1)
        # Permitted matches cut by top_k are not "trimmed": only ACL exclusions in the
        # caller's tenant count (the fabrikam chunk is not contoso's to count).
        assert len(passages) == 1
        assert trimmed == 3
        _, trimmed_for_ceo = await text_search(index, "falcon", CEO, 10)
        assert trimmed_for_ceo == 2
        assert await text_search(index, "no such term", ALICE_HR, 5) == ([], 0)

    # --- access scope: what caches key on -------------------------------------

    async def test_callers_who_see_the_same_chunks_share_a_fingerprint(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "leave", make_chunks("leave", "27 days", acl=HR))
        await put(index, "memo", make_chunks("memo", SECRET_TEXT, acl=FINANCE))
        # Neither "employees", "book-club" nor any user id is named by an ACL: no difference.
        dana = caller_filter("contoso", "dana@contoso.com", "hr", "book-club")
        alice = await index.access_scope(ALICE_HR)
        assert await index.access_scope(dana) == alice
        assert await index.access_scope(caller_filter("contoso", "eve@contoso.com", "hr")) == alice

        bob = await index.access_scope(BOB_ENGINEER)
        assert await index.access_scope(NOBODY) == bob

    async def test_callers_who_see_different_chunks_have_different_fingerprints(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "leave", make_chunks("leave", "27 days", acl=HR))
        await put(index, "memo", make_chunks("memo", SECRET_TEXT, acl=FINANCE))
        await put(index, "faq", make_chunks("faq", "hello", acl=PUBLIC))
        callers = [
            ALICE_HR,
            BOB_ENGINEER,  # sees only the public document
            CEO,  # listed by name
            caller_filter("contoso", "frank@contoso.com", "hr", "finance"),
            caller_filter("contoso", "gina@contoso.com", "finance"),
            caller_filter("fabrikam", "alice@contoso.com", "hr"),  # same names, other tenant
        ]
        fingerprints = [(await index.access_scope(c)).fingerprint for c in callers]
        assert len(set(fingerprints)) == len(callers)

    async def test_user_and_group_names_never_collide_in_a_fingerprint(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "a", make_chunks("a", "for a user called hr", acl=access(users=["hr"])))
        await put(index, "b", make_chunks("b", "for the group hr", acl=HR))
        user_named_hr = await index.access_scope(caller_filter("contoso", "hr"))
        member_of_hr = await index.access_scope(caller_filter("contoso", "zoe@contoso.com", "hr"))
        assert user_named_hr.fingerprint != member_of_hr.fingerprint

    async def test_a_principal_counts_once_an_acl_names_it(self, index: KnowledgeIndex) -> None:
        await put(index, "faq", make_chunks("faq", "hello", acl=PUBLIC))
        before = await index.access_scope(BOB_ENGINEER)
        assert before.fingerprint == (await index.access_scope(NOBODY)).fingerprint

        await put(
            index,
            "design",
            make_chunks("design", "the design review", acl=access(groups=["engineering"])),
        )
        after = await index.access_scope(BOB_ENGINEER)
        assert after.fingerprint != (await index.access_scope(NOBODY)).fingerprint
        assert after.generation != before.generation

    async def test_a_caller_who_sees_nothing_never_shares_a_fingerprint(
        self, index: KnowledgeIndex
    ) -> None:
        await put(index, "faq", make_chunks("faq", "hello", acl=PUBLIC))
        # NOBODY is named by no ACL but reads the public document; these callers read nothing.
        sees_public = (await index.access_scope(NOBODY)).fingerprint
        anonymous = await index.access_scope(caller_filter("contoso", ""))
        assert anonymous.fingerprint != sees_public
        assert anonymous.generation == (await index.access_scope(NOBODY)).generation
        no_tenant = await index.access_scope(caller_filter("", "guest@contoso.com"))
        assert no_tenant.fingerprint not in {sees_public, anonymous.fingerprint}

    async def test_every_change_to_a_tenants_documents_moves_its_generation(
        self, index: KnowledgeIndex
    ) -> None:
        seen = [(await index.access_scope(ALICE_HR)).generation]

        async def changed() -> None:
            generation = (await index.access_scope(ALICE_HR)).generation
            assert generation not in seen
            seen.append(generation)

        await put(index, "leave", make_chunks("leave", "27 days", acl=HR))
        await changed()
        await put(index, "leave", make_chunks("leave", "30 days", acl=HR))
        await changed()
        await put(index, "leave", make_chunks("leave", "30 days", acl=FINANCE))
        await changed()
        await put(index, "other", make_chunks("other", "no grant for alice", acl=FINANCE))
        await changed()  # invisible to her, yet her tenant's corpus changed
        await index.delete_document("leave")
        await changed()
        await put(index, "other", [])
        await changed()

    # --- hostile input -------------------------------------------------------

    @pytest.mark.parametrize("query", HOSTILE_QUERIES)
    async def test_hostile_queries_never_raise(self, index: KnowledgeIndex, query: str) -> None:
        await put(
            index, "doc", make_chunks("doc", "falcon budget café naïve Zürich 東京", acl=PUBLIC)
        )
        passages, trimmed = await text_search(index, query, NOBODY, 5)
        assert len(passages) <= 1
        assert trimmed == 0

    async def test_random_punctuation_never_raises(self, index: KnowledgeIndex) -> None:
        await put(index, "doc", make_chunks("doc", "near and or not falcon", acl=PUBLIC))
        alphabet = [*"\"'*^:+-()[]{}<>|&!?.,;/\\ ", "NEAR", "AND", "OR", "NOT", "falcon"]
        generator = random.Random(20250303)
        for _ in range(200):
            query = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 12)))
            await text_search(index, query, NOBODY, 3)

    async def test_operators_in_a_query_are_plain_words(self, index: KnowledgeIndex) -> None:
        await put(index, "leave", make_chunks("leave", "27 days of annual leave", acl=PUBLIC))
        passages, _ = await text_search(index, '"leave" AND (days OR', NOBODY, 5)
        assert [p.chunk.chunk_id for p in passages] == ["leave-0"]

    # --- documents, vectors and modes -------------------------------------------

    async def test_documents_lists_what_the_index_holds(self, index: KnowledgeIndex) -> None:
        leave = make_chunks("leave", "27 days", "carry 5", acl=HR)
        await put(index, "leave", leave)
        await put(index, "memo", make_chunks("memo", SECRET_TEXT, acl=FINANCE))
        await put(index, "other", make_chunks("other", "x", acl=access("fabrikam", public=True)))

        states = {state.document_id: state for state in await index.documents("contoso")}
        assert set(states) == {"leave", "memo"}
        assert states["leave"].source == "leave.md"
        assert states["leave"].content_hash == content_hash(leave)
        assert states["leave"].access == HR
        assert states["leave"].chunks == 2
        assert [s.document_id for s in await index.documents("contoso", source_prefix="me")] == [
            "memo"
        ]
        await index.delete_document("memo")
        await put(index, "leave", [])
        assert await index.documents("contoso") == []

    async def test_update_access_changes_who_sees_a_document_and_nothing_else(
        self, index: KnowledgeIndex, embedder: Embedder
    ) -> None:
        chunks = make_chunks("leave", "annual leave is 27 days", "carry over five", acl=HR)
        await put(index, "leave", chunks, embedder)
        before = await search(index, embedder, "annual leave", ALICE_HR, 5, SearchMode.VECTOR)
        scope = await index.access_scope(ALICE_HR)

        assert await index.update_access("leave", FINANCE) is True
        assert await index.update_access("never-indexed", FINANCE) is False

        assert (await search(index, embedder, "annual leave", ALICE_HR, 5, SearchMode.HYBRID))[
            0
        ] == []
        assert await index.get_chunk("leave-0", ALICE_HR) is None
        assert (await index.access_scope(ALICE_HR)).generation != scope.generation
        after, _ = await search(index, embedder, "annual leave", CEO, 5, SearchMode.VECTOR)
        moved = [dataclasses.replace(p.chunk, access=HR) for p in after]
        # Same chunks, same vectors (same scores), new access.
        assert moved == [p.chunk for p in before[0]]
        assert [p.score for p in after] == pytest.approx([p.score for p in before[0]])
        assert all(p.chunk.access == FINANCE for p in after)
        (state,) = await index.documents("contoso")
        assert state.access == FINANCE
        assert state.content_hash == content_hash(chunks)

    @pytest.mark.parametrize("mode", list(SearchMode))
    async def test_each_mode_finds_the_relevant_chunk_first(
        self, index: KnowledgeIndex, embedder: Embedder, mode: SearchMode
    ) -> None:
        texts = [
            "The office kitchen is cleaned on Fridays.",
            "Kestrel rotation: the on-call hand-over happens on Monday mornings.",
            "Expense reports are due by the fifth working day.",
        ]
        await put(index, "runbook", make_chunks("runbook", *texts, acl=PUBLIC), embedder)
        passages, trimmed = await search(
            index, embedder, "kestrel rotation hand-over", NOBODY, 2, mode
        )
        assert passages[0].chunk.chunk_id == "runbook-1"
        assert len(passages) <= 2
        assert trimmed == 0
        assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)

    @pytest.mark.parametrize("mode", VECTOR_MODES)
    async def test_vector_modes_apply_the_acl(
        self, index: KnowledgeIndex, embedder: Embedder, mode: SearchMode
    ) -> None:
        await put(index, "memo", make_chunks("memo", SECRET_TEXT, acl=FINANCE), embedder)
        await put(index, "hr", make_chunks("hr", "leave is 27 days", acl=HR), embedder)
        await put(
            index,
            "other",
            make_chunks("other", SECRET_TEXT, acl=access("fabrikam", public=True)),
            embedder,
        )
        for caller in (ALICE_HR, BOB_ENGINEER, NOBODY):
            passages, _ = await search(index, embedder, SECRET_TEXT, caller, 10, mode)
            assert all(caller.allows(p.chunk.access) for p in passages)
            assert all(p.chunk.document_id != "memo" for p in passages)
        passages, _ = await search(index, embedder, SECRET_TEXT, CEO, 1, mode)
        assert [p.chunk.chunk_id for p in passages] == ["memo-0"]

    @pytest.mark.parametrize("mode", list(SearchMode))
    async def test_the_empty_identity_gets_nothing(
        self, index: KnowledgeIndex, embedder: Embedder, mode: SearchMode
    ) -> None:
        await put(
            index, "faq", make_chunks("faq", "holidays are listed here", acl=PUBLIC), embedder
        )
        await put(index, "anon", make_chunks("anon", "holidays", acl=access(users=[""])), embedder)
        empty = caller_filter("contoso", "")
        passages, _ = await search(index, embedder, "holidays", empty, 5, mode)
        assert passages == []
        assert await index.get_chunk("faq-0", empty) is None
        assert await index.get_chunk("anon-0", empty) is None
        no_tenant = caller_filter("", "alice@contoso.com", "hr")
        assert (await search(index, embedder, "holidays", no_tenant, 5, mode))[0] == []

    @pytest.mark.parametrize("mode", list(SearchMode))
    async def test_an_unknown_group_matches_nobody(
        self, index: KnowledgeIndex, embedder: Embedder, mode: SearchMode
    ) -> None:
        await put(index, "hr", make_chunks("hr", "leave is 27 days", acl=HR), embedder)
        await put(
            index, "nobody", make_chunks("nobody", "leave plan", acl=access(groups=[])), embedder
        )
        stranger = caller_filter("contoso", "x@contoso.com", "no-such-group", "")
        assert (await search(index, embedder, "leave", stranger, 5, mode))[0] == []

    @pytest.mark.parametrize("mode", list(SearchMode))
    async def test_top_k_under_a_filter_still_returns_k_permitted_chunks(
        self, index: KnowledgeIndex, embedder: Embedder, mode: SearchMode
    ) -> None:
        # Sixty forbidden chunks match the query best; five permitted ones match less well.
        for n in range(60):
            chunks = make_chunks(f"s{n}", f"falcon budget figures part {n}", acl=FINANCE)
            await put(index, f"s{n}", chunks, embedder)
        for n in range(5):
            chunks = make_chunks(f"h{n}", f"a falcon flew past the hr office, day {n}", acl=HR)
            await put(index, f"h{n}", chunks, embedder)

        passages, trimmed = await search(
            index, embedder, "falcon budget figures", ALICE_HR, 3, mode
        )
        assert len(passages) == 3
        assert all(p.chunk.document_id.startswith("h") for p in passages)
        assert trimmed > 0

    async def test_a_query_from_another_model_is_refused(
        self, index: KnowledgeIndex, embedder: Embedder
    ) -> None:
        await put(index, "faq", make_chunks("faq", "holidays", acl=PUBLIC), embedder)
        assert index.embedding == embedder.identity
        other = HashingEmbedder(embedder.identity.dimensions, model="another-model")
        for mode in VECTOR_MODES:
            with pytest.raises(EmbeddingMismatch, match="another-model") as raised:
                await search(index, other, "holidays", NOBODY, 5, mode)
            assert embedder.identity.model in str(raised.value)
        with pytest.raises(EmbeddingMismatch):
            await put(index, "more", make_chunks("more", "x", acl=PUBLIC), other)
        wider = HashingEmbedder(embedder.identity.dimensions * 2, model=embedder.identity.model)
        with pytest.raises(EmbeddingMismatch):
            await search(index, wider, "holidays", NOBODY, 5, SearchMode.VECTOR)
        # Text search needs no model.
        assert [p.chunk.chunk_id for p in (await text_search(index, "holidays", NOBODY, 5))[0]] == [
            "faq-0"
        ]

    async def test_a_vector_mode_without_a_vector_is_refused(self, index: KnowledgeIndex) -> None:
        for mode in VECTOR_MODES:
            with pytest.raises(ValueError, match="vector"):
                await index.search(SearchRequest("x", 5, mode), NOBODY)

    async def test_an_index_without_vectors_has_no_embedding(self, index: KnowledgeIndex) -> None:
        await put(index, "faq", make_chunks("faq", "holidays", acl=PUBLIC))
        assert index.embedding is None

    async def test_vectors_must_match_the_chunks(
        self, index: KnowledgeIndex, embedder: Embedder
    ) -> None:
        chunks = make_chunks("faq", "a", "b", acl=PUBLIC)
        with pytest.raises(ValueError, match="vector"):
            await index.replace_document(
                "faq",
                chunks,
                content_hash="h",
                vectors=[[1.0] + [0.0] * (embedder.identity.dimensions - 1)],
                embedding=embedder.identity,
            )
        with pytest.raises(ValueError, match="vector"):
            await index.replace_document(
                "faq", chunks, content_hash="h", vectors=[[1.0], [1.0]], embedding=embedder.identity
            )
        with pytest.raises(ValueError, match="embedding"):
            await index.replace_document(
                "faq",
                chunks,
                content_hash="h",
                vectors=[[1.0], [1.0]],
                embedding=None,
            )
        assert await index.count_chunks() == 0
