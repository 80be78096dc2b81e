"""The answer cache: its stores (one contract, in-process and a real Redis), its keys,
threshold and expiry, and whole turns through the real orchestrator, SQLite index,
ingestion pipeline, extractive answerer and SQLite conversation store."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from inferencing.contracts import (
    ChatDelta,
    ChatModel,
    ChatRequest,
    ChatResponse,
    EmbeddingModel,
    EmbeddingResponse,
    InferenceCaller,
    ModelCapabilities,
    ProviderUnavailable,
)
from inferencing.gateway.redis_state import redis_client
from inferencing.providers import build_chat_model
from inferencing.providers.extractive import NOTHING_FOUND
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from inferencing.safety import HeuristicPromptShield
from inferencing.settings import InferencingSettings
from intelligence.answer_cache import (
    AnswerCache,
    AnswerCacheStore,
    AnswerCacheUnavailable,
    CachedAnswer,
    CacheEntry,
    CacheOwner,
    InProcessAnswerCacheStore,
    QueryVector,
    SourceStamp,
    answer_variant,
    context_digest,
    unit,
)
from intelligence.contracts import (
    AnswerDelta,
    AuditQuery,
    CacheOutcome,
    Citation,
    CitationsEvent,
    ConversationMessage,
    DoneEvent,
    MessageStatus,
    Plan,
    PlanEvent,
    PlanningContext,
    PlanStep,
    Principal,
    StepEvent,
    StepKind,
    TurnEvent,
    TurnRequest,
)
from intelligence.orchestrator import Orchestrator
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.safety import SafetyPolicy
from intelligence.settings import AnswerCacheSettings, IntelligenceSettings, SafetySettings
from intelligence.stores.redis_answer_cache import RedisAnswerCacheStore
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.stores.sqlite_audit import SqliteAuditLog
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import AccessScope, Chunk, KnowledgeCaller, RetrievalQuery, RetrievalResult
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from knowledge.settings import KnowledgeSettings
from tests.knowledge.factories import access, make_chunks
from tests.support.redis_server import RedisServer, private_redis
from tools.contracts import Toolset
from tools.policy import build_toolset
from tools.samples.employee_directory import lookup_employee
from tools.settings import ToolsSettings

ALICE = Principal(
    "contoso", "alice@contoso.com", frozenset({"hr", "employees"}), frozenset({"employee"})
)
DANA = Principal(  # Alice's access exactly: "book-club" is in no ACL, her id in none either
    "contoso", "dana@contoso.com", frozenset({"hr", "book-club"}), frozenset({"employee"})
)
BOB = Principal("contoso", "bob@contoso.com", frozenset({"finance"}), frozenset({"employee"}))
CAROL = Principal(  # Alice's names in another tenant
    "fabrikam", "alice@contoso.com", frozenset({"hr", "employees"}), frozenset({"employee"})
)

LEAVE_TEXT = (
    "Employees receive 27 days of annual leave each year. "
    "Unused annual leave days carry over until the end of March."
)
FALCON_TEXT = (
    "Project Falcon has an approved budget of 4.85 million. "
    "The Falcon budget is reviewed by the finance team each quarter."
)
LEAVE_QUESTION = "How many days of annual leave do employees receive?"
PROMPT = "grounded_answer@v1#test"
T0 = 1_750_000_000.0


# --- real Redis (the fixture pattern of tests/inferencing/conftest.py) ------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for this module (tests that stop it bring their own)."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
    yield client
    await client.aclose()


# --- the store contract ---------------------------------------------------------------


def vec(*values: float) -> tuple[float, ...]:
    return values


E1 = vec(1.0, 0.0, 0.0, 0.0)
E2 = vec(0.0, 1.0, 0.0, 0.0)
E3 = vec(0.0, 0.0, 1.0, 0.0)
E4 = vec(0.0, 0.0, 0.0, 1.0)
NEAR_E1 = vec(0.96, 0.28, 0.0, 0.0)  # cosine 0.96 to E1

CITATION = Citation(
    ref=1,
    chunk_id="leave-0",
    document_id="leave",
    source="hr/leave.md",
    title="Leave policy",
    snippet="Employees receive 27 days",
    page=2,
    section="Annual leave",
)


def entry(
    vector: Sequence[float],
    created_at: float = T0,
    answer: str = "27 days [1].",
    owner: CacheOwner | None = None,
) -> CacheEntry:
    return CacheEntry(
        id=uuid.uuid4().hex,
        vector=vector,
        answer=CachedAnswer(
            answer=answer,
            citations=(CITATION,),
            sources=(SourceStamp("leave-0", "d1"), SourceStamp("leave-1", "d2")),
            plan={"planner": "deterministic", "steps": [{"id": "s1", "kind": "retrieve"}]},
            created_at=created_at,
        ),
        owner=owner,
    )


ALICE_OWNS = CacheOwner("contoso", "alice")
BOB_OWNS = CacheOwner("contoso", "bob")


class AnswerCacheStoreContract:
    """What every :class:`AnswerCacheStore` does; a store's test class provides ``store``."""

    @pytest.fixture
    def store(self) -> AnswerCacheStore:
        raise NotImplementedError("a store's test class must provide the store fixture")

    async def nearest(
        self, store: AnswerCacheStore, scope: str, vector: Sequence[float], **kw: float
    ) -> tuple[float, CacheEntry | None] | None:
        options = {"min_similarity": 0.95, "now": T0, "ttl_s": 3600.0} | kw
        found = await store.nearest(scope, vector, **options)
        return None if found is None else (found.similarity, found.entry)

    async def test_an_unknown_scope_has_nothing(self, store: AnswerCacheStore) -> None:
        assert await self.nearest(store, "nowhere", E1) is None

    async def test_an_entry_round_trips(self, store: AnswerCacheStore) -> None:
        stored = entry(NEAR_E1)
        await store.put("s", stored, max_entries=8, now=T0, ttl_s=3600)

        found = await self.nearest(store, "s", NEAR_E1)
        assert found is not None
        similarity, got = found
        assert similarity == pytest.approx(1.0, abs=1e-6)
        assert got is not None
        assert got.id == stored.id
        assert got.answer == stored.answer
        assert list(got.vector) == pytest.approx(list(NEAR_E1), abs=1e-7)  # float32

    async def test_below_the_threshold_reports_the_similarity_without_the_entry(
        self, store: AnswerCacheStore
    ) -> None:
        await store.put("s", entry(E1), max_entries=8, now=T0, ttl_s=3600)
        found = await self.nearest(store, "s", NEAR_E1, min_similarity=0.97)
        assert found is not None
        assert found[0] == pytest.approx(0.96, abs=1e-6)
        assert found[1] is None
        found = await self.nearest(store, "s", NEAR_E1, min_similarity=0.95)
        assert found is not None and found[1] is not None

    async def test_the_most_similar_entry_wins(self, store: AnswerCacheStore) -> None:
        for vector, answer in [(E2, "two"), (NEAR_E1, "near one"), (E3, "three")]:
            await store.put("s", entry(vector, answer=answer), max_entries=8, now=T0, ttl_s=3600)
        found = await self.nearest(store, "s", E1, min_similarity=0.5)
        assert found is not None and found[1] is not None
        assert found[1].answer.answer == "near one"

    async def test_scopes_are_isolated(self, store: AnswerCacheStore) -> None:
        await store.put("alice-scope", entry(E1), max_entries=8, now=T0, ttl_s=3600)
        assert await self.nearest(store, "bob-scope", E1) is None
        assert await self.nearest(store, "alice-scope", E1) is not None

    async def test_entries_expire_after_the_ttl(self, store: AnswerCacheStore) -> None:
        await store.put("s", entry(E1, created_at=T0), max_entries=8, now=T0, ttl_s=60)
        assert await self.nearest(store, "s", E1, now=T0 + 59, ttl_s=60) is not None
        assert await self.nearest(store, "s", E1, now=T0 + 61, ttl_s=60) is None

    async def test_expired_entries_are_dropped_when_another_is_stored(
        self, store: AnswerCacheStore
    ) -> None:
        await store.put("s", entry(E1, created_at=T0), max_entries=8, now=T0, ttl_s=60)
        await store.put("s", entry(E2, created_at=T0 + 100), max_entries=8, now=T0 + 100, ttl_s=60)
        # Asked with a longer TTL, the old entry would be live, had it been kept.
        assert await self.nearest(store, "s", E1, now=T0 + 100, ttl_s=1000) == (
            pytest.approx(0.0),
            None,
        )

    async def test_a_full_scope_drops_its_oldest_entries(self, store: AnswerCacheStore) -> None:
        for n, vector in enumerate([E1, E2, E3, E4]):
            await store.put(
                "s", entry(vector, created_at=T0 + n), max_entries=3, now=T0 + n, ttl_s=3600
            )
        now = T0 + 10
        gone = await self.nearest(store, "s", E1, now=now)
        assert gone is not None and gone[1] is None  # E1, the oldest, is gone
        for vector in (E2, E3, E4):
            kept = await self.nearest(store, "s", vector, now=now)
            assert kept is not None and kept[1] is not None

    async def test_concurrent_writers_keep_the_bound(self, store: AnswerCacheStore) -> None:
        basis = [tuple(float(i == n) for i in range(6)) for n in range(6)]
        await asyncio.gather(
            *(
                store.put(
                    "s",
                    entry(v, created_at=T0 + n, answer=str(n)),
                    max_entries=2,
                    now=T0 + n,
                    ttl_s=3600,
                )
                for n, v in enumerate(basis)
            )
        )
        live = []
        for n, vector in enumerate(basis):
            found = await self.nearest(store, "s", vector, now=T0 + 10)
            if found is not None and found[1] is not None:
                assert found[1].answer.answer == str(n)
                live.append(n)
        assert live == [4, 5]

    async def test_delete_removes_only_that_entry(self, store: AnswerCacheStore) -> None:
        first, second = entry(E1), entry(E2)
        for stored in (first, second):
            await store.put("s", stored, max_entries=8, now=T0, ttl_s=3600)
        await store.delete("s", first.id)
        await store.delete("s", "never-stored")
        await store.delete("no-such-scope", first.id)
        gone = await self.nearest(store, "s", E1)
        assert gone is not None and gone[1] is None
        kept = await self.nearest(store, "s", E2)
        assert kept is not None and kept[1] is not None and kept[1].id == second.id

    async def test_vectors_of_another_size_never_match(self, store: AnswerCacheStore) -> None:
        await store.put("s", entry(E1), max_entries=8, now=T0, ttl_s=3600)
        found = await self.nearest(store, "s", (1.0, 0.0), min_similarity=0.1)
        assert found is not None and found[1] is None

    async def test_describe_names_the_backend(self, store: AnswerCacheStore) -> None:
        assert set(store.describe()) == {"answer_cache"}

    # --- a person's entries: export and erasure ------------------------------------------

    async def test_an_entry_keeps_its_owner(self, store: AnswerCacheStore) -> None:
        await store.put("s", entry(E1, owner=ALICE_OWNS), max_entries=8, now=T0, ttl_s=3600)
        found = await self.nearest(store, "s", E1)
        assert found is not None and found[1] is not None
        assert found[1].owner == ALICE_OWNS

    async def test_entries_of_a_person_in_every_scope_oldest_first(
        self, store: AnswerCacheStore
    ) -> None:
        later = entry(E2, created_at=T0 + 5, answer="later", owner=ALICE_OWNS)
        earlier = entry(E1, created_at=T0 + 1, answer="earlier", owner=ALICE_OWNS)
        await store.put("s1", later, max_entries=8, now=T0 + 5, ttl_s=3600)
        await store.put("s2", earlier, max_entries=8, now=T0 + 5, ttl_s=3600)
        await store.put("s1", entry(E3, owner=BOB_OWNS), max_entries=8, now=T0 + 5, ttl_s=3600)
        await store.put("s1", entry(E4), max_entries=8, now=T0 + 5, ttl_s=3600)

        found = await store.entries_of("contoso", "alice")

        assert [(e.id, e.answer, e.owner) for e in found] == [
            (earlier.id, earlier.answer, ALICE_OWNS),
            (later.id, later.answer, ALICE_OWNS),
        ]
        assert await store.entries_of("fabrikam", "alice") == []
        assert await store.entries_of("contoso", "nobody") == []

    async def test_forget_user_deletes_their_entries_in_every_scope_and_nothing_else(
        self, store: AnswerCacheStore
    ) -> None:
        elsewhere = CacheOwner("fabrikam", "alice")
        for scope, vector, owner in [
            ("s1", E1, ALICE_OWNS),
            ("s2", E2, ALICE_OWNS),
            ("s1", E2, BOB_OWNS),
            ("s3", E3, elsewhere),
            ("s3", E4, None),
        ]:
            await store.put(scope, entry(vector, owner=owner), max_entries=8, now=T0, ttl_s=3600)

        assert await store.forget_user("contoso", "alice") == 2

        assert await store.entries_of("contoso", "alice") == []
        gone = await self.nearest(store, "s1", E1)
        assert gone is None or gone[1] is None
        assert await self.nearest(store, "s2", E2) is None
        kept = await self.nearest(store, "s1", E2)
        assert kept is not None and kept[1] is not None and kept[1].owner == BOB_OWNS
        assert [e.owner for e in await store.entries_of("fabrikam", "alice")] == [elsewhere]
        unowned = await self.nearest(store, "s3", E4)
        assert unowned is not None and unowned[1] is not None
        assert await store.forget_user("contoso", "alice") == 0, "a second erasure finds nothing"

    async def test_forget_user_includes_expired_entries_still_kept(
        self, store: AnswerCacheStore
    ) -> None:
        # Stored long past its TTL: never served, but held until the scope is written to.
        old = entry(E1, created_at=T0 - 3600, owner=ALICE_OWNS)
        await store.put("s", old, max_entries=8, now=T0 - 3600, ttl_s=60)
        assert [e.id for e in await store.entries_of("contoso", "alice")] == [old.id]
        assert await store.forget_user("contoso", "alice") == 1


class TestInProcessStore(AnswerCacheStoreContract):
    @pytest.fixture
    def store(self) -> AnswerCacheStore:
        return InProcessAnswerCacheStore()

    async def test_the_least_recently_used_scopes_go_first(self) -> None:
        store = InProcessAnswerCacheStore(max_scopes=2)
        for scope in ("a", "b"):
            await store.put(scope, entry(E1), max_entries=8, now=T0, ttl_s=3600)
        await store.nearest("a", E1, min_similarity=0.9, now=T0, ttl_s=3600)  # a is used
        await store.put("c", entry(E1), max_entries=8, now=T0, ttl_s=3600)
        assert await store.nearest("b", E1, min_similarity=0.9, now=T0, ttl_s=3600) is None
        assert await store.nearest("a", E1, min_similarity=0.9, now=T0, ttl_s=3600) is not None
        assert store.describe() == {"answer_cache": "in-process"}


class TestRedisStore(AnswerCacheStoreContract):
    @pytest.fixture
    def store(self, redis: Redis) -> AnswerCacheStore:
        return RedisAnswerCacheStore(redis, prefix=f"test:{uuid.uuid4().hex}:")

    async def test_keys_share_a_slot_and_expire_with_the_ttl(self, redis: Redis) -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        store = RedisAnswerCacheStore(redis, prefix=prefix)
        await store.put("scope", entry(E1), max_entries=8, now=T0, ttl_s=90)
        keys = sorted(k.decode() for k in await redis.keys(prefix + "*"))
        assert keys == [prefix + "{scope}:a", prefix + "{scope}:t", prefix + "{scope}:v"]
        for key in keys:
            assert 0 < await redis.pttl(key) <= 90_000
        assert store.describe() == {"answer_cache": "redis"}

    async def test_a_persons_index_outlives_their_entries_and_names_no_one(
        self, redis: Redis
    ) -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        store = RedisAnswerCacheStore(redis, prefix=prefix)
        await store.put("scope", entry(E1, owner=ALICE_OWNS), max_entries=8, now=T0, ttl_s=90)
        keys = sorted(k.decode() for k in await redis.keys(prefix + "*"))
        [index] = [k for k in keys if k.startswith(prefix + "user:")]
        assert "alice" not in index and "contoso" not in index
        assert 90_000 < await redis.pttl(index) <= 180_000
        assert sorted(set(keys) - {index}) == [
            prefix + "{scope}:a",
            prefix + "{scope}:o",
            prefix + "{scope}:t",
            prefix + "{scope}:v",
        ]
        for key in set(keys) - {index}:
            assert 0 < await redis.pttl(key) <= 90_000

    async def test_after_forget_user_no_key_holds_the_person(self, redis: Redis) -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        store = RedisAnswerCacheStore(redis, prefix=prefix)
        await store.put("s1", entry(E1, owner=ALICE_OWNS), max_entries=8, now=T0, ttl_s=90)
        await store.put("s1", entry(E2, owner=BOB_OWNS), max_entries=8, now=T0, ttl_s=90)
        await store.put("s2", entry(E3, owner=ALICE_OWNS), max_entries=8, now=T0, ttl_s=90)

        assert await store.forget_user("contoso", "alice") == 2

        for key in await redis.keys(prefix + "*"):
            kind = await redis.type(key)
            if kind == b"hash":
                dumped = repr(await redis.hgetall(key))
            elif kind == b"zset":
                dumped = repr(await redis.zrange(key, 0, -1))
            else:
                raise AssertionError(f"unexpected key {key!r} of type {kind!r}")
            assert "alice" not in dumped
        assert await redis.exists(prefix + "{s2}:o") == 0  # emptied hashes are gone

    async def test_an_outage_is_reported_and_retried_after_a_pause(self) -> None:
        now = [0.0]
        with private_redis() as server:
            client = redis_client(server.url, connect_timeout_s=1.0, command_timeout_s=1.0)
            store = RedisAnswerCacheStore(client, retry_after_s=5.0, clock=lambda: now[0])
            try:
                await store.put("s", entry(E1), max_entries=8, now=T0, ttl_s=3600)
                server.stop()
                with pytest.raises(AnswerCacheUnavailable):
                    await store.nearest("s", E1, min_similarity=0.9, now=T0, ttl_s=3600)
                assert store.describe() == {"answer_cache": "unavailable"}

                server.start()
                now[0] = 4.0  # within the pause: not even tried
                with pytest.raises(AnswerCacheUnavailable):
                    await store.nearest("s", E1, min_similarity=0.9, now=T0, ttl_s=3600)
                now[0] = 6.0
                # The restarted server kept nothing, but it answers again.
                assert await store.nearest("s", E1, min_similarity=0.9, now=T0, ttl_s=3600) is None
                assert store.describe() == {"answer_cache": "redis"}
            finally:
                await client.aclose()


# --- similarity ------------------------------------------------------------------------

components = st.one_of(st.just(0.0), st.floats(-1.0, 1.0, allow_nan=False))


@settings(database=None)  # no .hypothesis/ folder in the checkout
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(*[st.tuples(components, components)] * n)))
def test_the_sparse_and_dense_paths_give_the_plain_dot_product(
    pairs: tuple[tuple[float, float], ...],
) -> None:
    query, stored = unit([q for q, _ in pairs]), unit([s for _, s in pairs])
    plain = max(-1.0, min(1.0, sum(q * s for q, s in zip(query, stored, strict=True))))
    assert QueryVector(query).similarity(stored) == pytest.approx(plain, abs=1e-9)
    assert QueryVector(query).similarity([*stored, 0.0]) == 0.0  # another size: never similar


# --- the hashing embedder ----------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    tenant_id: str = "contoso"
    user_id: str = "alice"


def similarity(model: HashingEmbeddingModel, a: str, b: str) -> float:
    return sum(x * y for x, y in zip(model.vector(a), model.vector(b), strict=True))


class TestHashingEmbeddings:
    model = HashingEmbeddingModel()

    async def test_is_an_embedding_model_of_unit_vectors_in_order(self) -> None:
        assert isinstance(self.model, EmbeddingModel)
        texts = ["annual leave", "project budget", "annual leave"]
        response = await self.model.embed(texts, Caller())
        assert len(response.vectors) == 3
        assert response.vectors[0] == response.vectors[2] != response.vectors[1]
        for vector in response.vectors:
            assert len(vector) == self.model.dimensions == 512
            assert math.fsum(v * v for v in vector) == pytest.approx(1.0)
        assert response.model == self.model.name == "hashing-v1-512"

    def test_the_same_text_gives_the_same_vector_in_any_instance(self) -> None:
        # blake2b, not the per-process salted hash(): replicas must agree.
        assert HashingEmbeddingModel().vector(LEAVE_QUESTION) == self.model.vector(LEAVE_QUESTION)
        assert HashingEmbeddingModel(dimensions=256).name == "hashing-v1-256"

    @pytest.mark.parametrize(
        "variant",
        [
            "how many days of annual leave do employees receive",
            "HOW MANY DAYS OF ANNUAL LEAVE DO EMPLOYEES RECEIVE???",
            "Hi, please: how many days of annual leave do the employees receive?!",
            "How many day of annual leave do employee receive?",  # plural s
        ],
    )
    def test_case_punctuation_fillers_and_plurals_do_not_count(self, variant: str) -> None:
        assert similarity(self.model, LEAVE_QUESTION, variant) == pytest.approx(1.0, abs=1e-9)

    def test_the_same_words_in_another_order_still_match(self) -> None:
        # Only the bigrams differ (a reordering that breaks more of them may not match).
        reordered = "Do employees receive how many days of annual leave?"
        assert similarity(self.model, LEAVE_QUESTION, reordered) >= 0.95

    @pytest.mark.parametrize(
        "other",
        [
            "How many days of sick leave do employees receive?",
            "How many days of annual leave do contractors receive?",
            "When do employees receive days of annual leave?",
            "How many days of annual leave do employees not receive?",
            "How many days of annual leave don't employees receive?",
            "What is the meal allowance?",
        ],
    )
    def test_another_question_does_not_match(self, other: str) -> None:
        assert similarity(self.model, LEAVE_QUESTION, other) < 0.95

    def test_a_different_number_does_not_match(self) -> None:
        long = "what is the carry over rule for annual leave days taken in {} by staff"
        assert similarity(self.model, long.format(2024), long.format(2025)) < 0.95

    def test_a_text_of_fillers_only_is_the_zero_vector(self) -> None:
        assert not any(self.model.vector("Hi! Thanks, please..."))

    def test_dimensions_are_checked(self) -> None:
        with pytest.raises(ValueError, match="dimensions"):
            HashingEmbeddingModel(dimensions=4)


# --- keys, threshold, expiry ------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedEmbedder:
    """Vectors chosen by the test, to put questions at exact cosine similarities."""

    vectors: Mapping[str, tuple[float, ...]]
    name: str = "scripted"
    dimensions: int | None = None

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        return EmbeddingResponse(tuple(self.vectors[t] for t in texts), self.name)

    async def aclose(self) -> None:
        return None


@dataclass
class FailingEmbedder:
    name: str = "failing"
    dimensions: int | None = None

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        raise ProviderUnavailable("The embedding model is unavailable.", retryable=True)

    async def aclose(self) -> None:
        return None


@dataclass
class StalledEmbedder:
    """Never answers: a lookup must give up after its timeout."""

    name: str = "stalled"
    dimensions: int | None = None

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return None


@dataclass
class Knowledge:
    index: SqliteKnowledgeIndex
    retriever: SecurityTrimmedRetriever


@pytest.fixture
async def knowledge(tmp_path: Path) -> AsyncIterator[Knowledge]:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    await index.replace_document(
        "leave", make_chunks("leave", LEAVE_TEXT, acl=access(groups=["hr"])), content_hash="test"
    )
    await index.replace_document(
        "falcon",
        make_chunks("falcon", FALCON_TEXT, acl=access(groups=["finance"])),
        content_hash="test",
    )
    await index.replace_document(
        "fabrikam-leave",
        make_chunks("fabrikam-leave", LEAVE_TEXT, acl=access("fabrikam", groups=["hr"])),
        content_hash="test",
    )
    yield Knowledge(index, SecurityTrimmedRetriever(index))
    await index.close()


RETRIEVE_THEN_ANSWER = Plan(
    steps=(
        PlanStep("s1", StepKind.RETRIEVE, "search", query="q"),
        PlanStep("s2", StepKind.ANSWER, "answer", depends_on=("s1",)),
    ),
    planner="deterministic",
)


def make_cache(
    knowledge: Knowledge,
    store: AnswerCacheStore,
    *,
    embedder: EmbeddingModel | None = None,
    model_version: str = "gpt-4o-mini@2024-07-18",
    clock: FakeClock | None = None,
    **settings: object,
) -> AnswerCache:
    return AnswerCache(
        store=store,
        embedder=embedder or HashingEmbeddingModel(),
        retriever=knowledge.retriever,
        settings=AnswerCacheSettings.model_validate({"enabled": True, **settings}),
        model_version=model_version,
        clock=clock or FakeClock(),
    )


async def ask(
    cache: AnswerCache,
    principal: Principal,
    question: str = LEAVE_QUESTION,
    *,
    history: Sequence[ConversationMessage] = (),
    prompt: str = PROMPT,
) -> CacheOutcome:
    """Look up; on a miss, store an answer naming who it was made for."""
    lookup = await cache.lookup(
        question=question, history=history, principal=principal, prompt_version=prompt
    )
    if lookup.hit is None:
        await cache.remember(
            lookup,
            answer=f"made for {principal.user_id}",
            citations=(),
            plan=RETRIEVE_THEN_ANSWER,
            sources=(),
            plan_summary=None,
            principal=principal,
        )
    return lookup.outcome


def message(content: str, role: str = "user") -> ConversationMessage:
    return ConversationMessage(
        id=uuid.uuid4().hex,
        conversation_id="c1",
        role="user" if role == "user" else "assistant",
        content=content,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


async def test_the_same_question_in_the_same_scope_hits(knowledge: Knowledge) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore())
    assert await ask(cache, ALICE) == CacheOutcome("miss")
    outcome = await ask(cache, ALICE, "how many days of ANNUAL leave do employees receive")
    assert outcome.status == "hit"
    assert outcome.similarity == pytest.approx(1.0, abs=1e-6)


async def test_an_answer_remembers_whose_turn_stored_it_and_goes_with_their_data(
    knowledge: Knowledge,
) -> None:
    store = InProcessAnswerCacheStore()
    cache = make_cache(knowledge, store)
    assert await ask(cache, ALICE) == CacheOutcome("miss")

    [mine] = await cache.entries_of(ALICE)
    assert mine.owner == CacheOwner(ALICE.tenant_id, ALICE.user_id)
    assert await cache.forget_user(ALICE) == 1
    assert await cache.entries_of(ALICE) == []
    assert (await ask(cache, ALICE)).status == "miss", "the answer went with Alice's data"


@pytest.mark.parametrize(
    "change",
    [
        "tenant",
        "fingerprint",
        "generation",
        "model_version",
        "prompt_version",
        "context",
        "embedder",
    ],
)
async def test_every_part_of_the_key_scopes_the_entry(knowledge: Knowledge, change: str) -> None:
    store = InProcessAnswerCacheStore()
    cache = make_cache(knowledge, store, multi_turn=True)
    assert (await ask(cache, ALICE)).status == "miss"
    assert (await ask(cache, ALICE)).status == "hit"

    principal, history, prompt = ALICE, [], PROMPT
    if change == "tenant":
        principal = CAROL
    elif change == "fingerprint":
        principal = replace(ALICE, groups=ALICE.groups | {"finance"})
    elif change == "generation":
        await knowledge.index.replace_document(
            "memo",
            make_chunks("memo", "an unrelated memo", acl=access(groups=["legal"])),
            content_hash="test",
        )
    elif change == "model_version":
        cache = make_cache(knowledge, store, multi_turn=True, model_version="gpt-4.1@2025-04-14")
    elif change == "prompt_version":
        prompt = "grounded_answer@v2#test"
    elif change == "context":
        history = [message("Hello")]
    elif change == "embedder":
        cache = make_cache(
            knowledge, store, multi_turn=True, embedder=HashingEmbeddingModel(dimensions=256)
        )

    outcome = await ask(cache, principal, history=history, prompt=prompt)
    assert outcome.status == "miss", change


async def test_the_context_is_the_whole_conversation_not_the_last_message(
    knowledge: Knowledge,
) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore(), multi_turn=True)
    about_leave = [message("Tell me about leave"), message("Leave is 27 days.", "assistant")]
    about_falcon = [message("Tell me about Falcon"), message("Leave is 27 days.", "assistant")]
    assert (await ask(cache, ALICE, history=about_leave)).status == "miss"
    assert (await ask(cache, ALICE, history=about_leave)).status == "hit"
    assert (await ask(cache, ALICE, history=about_falcon)).status == "miss"
    assert context_digest([]) == ""
    assert context_digest(about_leave) != context_digest(about_falcon)


async def test_callers_with_the_same_effective_access_share_entries(knowledge: Knowledge) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore())
    assert (await ask(cache, ALICE)).status == "miss"
    # Dana differs from Alice only in a user id and a group that no ACL names.
    assert (await ask(cache, DANA)).status == "hit"
    # Bob sees other documents: never Alice's entry.
    assert (await ask(cache, BOB)).status == "miss"


async def test_tool_turns_are_keyed_per_user_when_cached(knowledge: Knowledge) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore(), tool_turns=True)
    assert (await ask(cache, ALICE)).status == "miss"
    assert (await ask(cache, ALICE)).status == "hit"
    assert (await ask(cache, DANA)).status == "miss"  # tool results are the caller's own


@pytest.mark.parametrize(
    ("threshold", "cosine", "status"),
    [
        (0.95, 0.9501, "hit"),
        (0.95, 0.9499, "miss"),
        (0.90, 0.93, "hit"),
        (0.97, 0.9501, "miss"),
        (1.0, 0.9999, "miss"),
    ],
)
async def test_a_hit_needs_the_threshold_in_cosine_similarity(
    knowledge: Knowledge, threshold: float, cosine: float, status: str
) -> None:
    embedder = ScriptedEmbedder(
        {"asked": (1.0, 0.0), "again": (cosine, math.sqrt(1 - cosine * cosine))}
    )
    cache = make_cache(
        knowledge, InProcessAnswerCacheStore(), embedder=embedder, similarity_threshold=threshold
    )
    assert (await ask(cache, ALICE, "asked")).status == "miss"
    outcome = await ask(cache, ALICE, "again")
    assert outcome.status == status
    assert outcome.similarity == pytest.approx(cosine, abs=1e-6)


async def test_vectors_are_compared_by_direction_not_length(knowledge: Knowledge) -> None:
    embedder = ScriptedEmbedder({"asked": (3.0, 4.0), "again": (0.6, 0.8)})
    cache = make_cache(knowledge, InProcessAnswerCacheStore(), embedder=embedder)
    await ask(cache, ALICE, "asked")
    assert (await ask(cache, ALICE, "again")).status == "hit"


async def test_entries_expire_after_the_ttl(knowledge: Knowledge) -> None:
    clock = FakeClock()
    cache = make_cache(knowledge, InProcessAnswerCacheStore(), clock=clock, ttl_s=600)
    await ask(cache, ALICE)
    clock.now += 599
    assert (await ask(cache, ALICE)).status == "hit"
    clock.now += 2
    assert (await ask(cache, ALICE)).status == "miss"


async def test_a_question_without_words_is_never_cached(knowledge: Knowledge) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore())
    assert await ask(cache, ALICE, "Hi! Thanks!") == CacheOutcome("miss", reason="no_terms")
    assert await ask(cache, ALICE, "Hi! Thanks!") == CacheOutcome("miss", reason="no_terms")


async def test_a_failing_embedder_is_a_miss(knowledge: Knowledge) -> None:
    cache = make_cache(knowledge, InProcessAnswerCacheStore(), embedder=FailingEmbedder())
    assert await ask(cache, ALICE) == CacheOutcome("miss", reason="unavailable")


async def test_a_slow_lookup_is_a_miss(knowledge: Knowledge) -> None:
    cache = make_cache(
        knowledge, InProcessAnswerCacheStore(), embedder=StalledEmbedder(), lookup_timeout_s=0.01
    )
    assert await ask(cache, ALICE) == CacheOutcome("miss", reason="timeout")


def test_the_prompt_variant_changes_with_the_template_and_the_settings() -> None:
    base = answer_variant("grounded_answer@v1", "Answer from {{ sources }}", {"top_k": 5})
    assert base.startswith("grounded_answer@v1#")
    assert answer_variant("grounded_answer@v1", "Answer from {{ sources }}", {"top_k": 5}) == base
    assert answer_variant("grounded_answer@v1", "Answer only from", {"top_k": 5}) != base
    assert answer_variant("grounded_answer@v1", "Answer from {{ sources }}", {"top_k": 8}) != base


# --- whole turns: the real orchestrator over real components -----------------------------


@dataclass
class CountingChatModel:
    """The real extractive answerer, counting the calls that reach it."""

    inner: ChatModel
    calls: int = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> ModelCapabilities:
        return self.inner.capabilities

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        self.calls += 1
        return await self.inner.complete(request, caller)

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        self.calls += 1
        async for delta in self.inner.stream(request, caller):
            yield delta

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class CountingPlanner:
    inner: object = field(default_factory=DeterministicPlanner)
    calls: int = 0

    async def plan(self, context: PlanningContext) -> Plan:
        self.calls += 1
        assert isinstance(self.inner, DeterministicPlanner)
        return await self.inner.plan(context)


class ToolPlanner:
    """Plans a call of the sample directory tool, then the answer (as a model planner would)."""

    async def plan(self, context: PlanningContext) -> Plan:
        return Plan(
            steps=(
                PlanStep(
                    "s1",
                    StepKind.CALL_TOOL,
                    "Look up a colleague",
                    tool="lookup_employee",
                    arguments={"query": "Megan"},
                ),
                PlanStep("s2", StepKind.RETRIEVE, "Search", query=context.question),
                PlanStep("s3", StepKind.ANSWER, "Answer", depends_on=("s1", "s2")),
            ),
            planner="test-tools",
        )


@dataclass
class PinnedScopeRetriever:
    """The real retriever, except that ``access_scope`` never changes: a backend that
    fails to move its generation. Only the check of the sources stands between a
    changed document and a stale answer then."""

    inner: SecurityTrimmedRetriever
    pinned: AccessScope | None = None

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult:
        return await self.inner.retrieve(query, caller)

    async def get_chunk(self, chunk_id: str, caller: KnowledgeCaller) -> Chunk | None:
        return await self.inner.get_chunk(chunk_id, caller)

    async def access_scope(self, caller: KnowledgeCaller) -> AccessScope:
        if self.pinned is None:
            self.pinned = await self.inner.access_scope(caller)
        return self.pinned


@dataclass
class IngestingRetriever:
    """The real retriever; a document is added while the turn retrieves (a concurrent
    ``lamina ingest``)."""

    inner: SecurityTrimmedRetriever
    index: SqliteKnowledgeIndex

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult:
        await self.index.replace_document(
            "late",
            make_chunks("late", f"written at {uuid.uuid4()}", acl=access(public=True)),
            content_hash="test",
        )
        return await self.inner.retrieve(query, caller)

    async def get_chunk(self, chunk_id: str, caller: KnowledgeCaller) -> Chunk | None:
        return await self.inner.get_chunk(chunk_id, caller)

    async def access_scope(self, caller: KnowledgeCaller) -> AccessScope:
        return await self.inner.access_scope(caller)


@dataclass
class Service:
    knowledge: Knowledge
    conversations: SqliteConversationStore
    audit: SqliteAuditLog
    model: CountingChatModel
    planner: CountingPlanner
    store: AnswerCacheStore
    clock: FakeClock
    toolset: Toolset

    def orchestrator(
        self,
        *,
        cache: AnswerCache | None = None,
        retriever: object = None,
        planner: object = None,
        safety: SafetyPolicy | None = None,
        **cache_settings: object,
    ) -> Orchestrator:
        retriever = retriever or self.knowledge.retriever
        if cache is None:
            cache = AnswerCache(
                store=self.store,
                embedder=HashingEmbeddingModel(),
                retriever=retriever,  # type: ignore[arg-type]
                settings=AnswerCacheSettings.model_validate({"enabled": True, **cache_settings}),
                model_version="extractive",
                clock=self.clock,
            )
        return Orchestrator(
            retriever=retriever,  # type: ignore[arg-type]
            toolset=self.toolset,
            chat_model=self.model,
            planner=planner or self.planner,  # type: ignore[arg-type]
            conversations=self.conversations,
            audit=self.audit,
            prompts=PromptLibrary(PromptLibrary.bundled_directory()),
            settings=IntelligenceSettings(),
            answer_cache=cache,
            safety=safety,
        )


def extractive_model() -> ChatModel:
    (deployment,) = InferencingSettings().registry()
    return build_chat_model(deployment)


@pytest.fixture
async def service(knowledge: Knowledge, tmp_path: Path) -> AsyncIterator[Service]:
    conversations = SqliteConversationStore(tmp_path / "conversations.db")
    audit = SqliteAuditLog(tmp_path / "audit.db")
    await conversations.open()
    await audit.open()
    toolset = build_toolset(ToolsSettings(load_entry_points=False), extra=[lookup_employee])
    yield Service(
        knowledge,
        conversations,
        audit,
        CountingChatModel(extractive_model()),
        CountingPlanner(),
        InProcessAnswerCacheStore(),
        FakeClock(),
        toolset,
    )
    await conversations.close()
    await audit.close()


async def test_a_hit_replays_the_answer_without_planner_or_model(service: Service) -> None:
    orchestrator = service.orchestrator()
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert first.cache == CacheOutcome("miss")
    assert "27 days" in first.answer
    assert [c.document_id for c in first.citations] == ["leave"]
    assert (service.model.calls, service.planner.calls) == (1, 1)

    started = await orchestrator.start_turn(
        TurnRequest("how many days of annual leave do employees receive"), ALICE
    )
    events: list[TurnEvent] = [e async for e in started.events]

    assert (service.model.calls, service.planner.calls) == (1, 1)  # neither ran again
    assert [e.type for e in events] == ["plan", "step", "delta", "step", "citations", "done"]
    plan_event, *_, citations_event, done = events
    assert isinstance(plan_event, PlanEvent) and plan_event.plan.planner == "cache"
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == first.answer
    assert isinstance(citations_event, CitationsEvent)
    assert citations_event.citations == first.citations
    assert isinstance(done, DoneEvent) and done.cache is not None
    assert done.cache.status == "hit" and done.cache.similarity == pytest.approx(1.0, abs=1e-6)
    step_end = events[3]
    assert isinstance(step_end, StepEvent) and step_end.outcome is not None

    # Stored and audited like any answer.
    [_, reply] = await service.conversations.messages(ALICE, started.conversation_id)
    assert (reply.content, reply.status) == (first.answer, MessageStatus.COMPLETE)
    assert reply.citations == first.citations
    assert reply.plan is not None and reply.plan.planner == "cache"
    page = await service.audit.query(AuditQuery("contoso", event="chat.turn"))
    records = [entry.record for entry in page.entries]
    assert [r.data["cache"]["status"] for r in records] == ["miss", "hit"]
    assert records[1].data["sources"] == ["leave-0"]


async def test_two_users_with_different_access_get_different_entries(service: Service) -> None:
    orchestrator = service.orchestrator()
    alice = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    bob = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), BOB)
    assert (alice.cache, bob.cache) == (CacheOutcome("miss"), CacheOutcome("miss"))
    assert "27 days" in alice.answer
    assert bob.answer == NOTHING_FOUND and bob.citations == ()

    # Each is served their own entry from now on.
    again_alice = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    again_bob = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), BOB)
    assert again_alice.cache is not None and again_alice.cache.status == "hit"
    assert again_bob.cache is not None and again_bob.cache.status == "hit"
    assert (again_alice.answer, again_bob.answer) == (alice.answer, NOTHING_FOUND)


async def test_users_whose_groups_differ_only_outside_every_acl_share_an_entry(
    service: Service,
) -> None:
    orchestrator = service.orchestrator()
    alice = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    dana = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), DANA)
    assert dana.cache is not None and dana.cache.status == "hit"
    assert (dana.answer, dana.citations) == (alice.answer, alice.citations)
    assert service.model.calls == 1


async def test_follow_up_turns_are_skipped_by_default(service: Service) -> None:
    orchestrator = service.orchestrator()
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    follow_up = await orchestrator.run_turn(
        TurnRequest(LEAVE_QUESTION, conversation_id=first.conversation_id), ALICE
    )
    assert follow_up.cache == CacheOutcome("skipped", reason="multi_turn")
    assert service.model.calls == 2

    with_history = service.orchestrator(multi_turn=True)
    looked_up = await with_history.run_turn(
        TurnRequest(LEAVE_QUESTION, conversation_id=first.conversation_id), ALICE
    )
    assert looked_up.cache == CacheOutcome("miss")  # a new context: its own scope


async def test_tool_turns_are_not_stored_by_default(service: Service) -> None:
    orchestrator = service.orchestrator(planner=ToolPlanner())
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert [o.status.value for o in first.steps][:2] == ["ok", "ok"]
    assert first.cache == CacheOutcome("skipped", reason="tool_steps")
    second = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert second.cache == CacheOutcome("skipped", reason="tool_steps")  # nothing was stored
    assert service.model.calls == 2


async def test_a_turn_without_tools_never_gets_an_answer_a_tool_helped_to_make(
    service: Service,
) -> None:
    orchestrator = service.orchestrator(planner=ToolPlanner(), tool_turns=True)
    with_tool = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert with_tool.plan.steps[0].kind is StepKind.CALL_TOOL
    assert with_tool.cache == CacheOutcome("miss")  # stored, for Alice's tool turns
    reused = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert reused.cache is not None and reused.cache.status == "hit"

    grounded = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION, tools=False), ALICE)
    assert grounded.cache == CacheOutcome("miss")
    assert [s.kind for s in grounded.plan.steps] == [StepKind.RETRIEVE, StepKind.ANSWER]
    # Turns without tools share their own entries, across callers of the same access.
    again = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION, tools=False), DANA)
    assert again.cache is not None and again.cache.status == "hit"
    assert again.answer == grounded.answer


async def test_an_answer_made_with_tools_off_never_stands_in_for_a_turn_that_may_use_them(
    service: Service,
) -> None:
    orchestrator = service.orchestrator(planner=ToolPlanner())
    grounded = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION, tools=False), ALICE)
    assert grounded.cache == CacheOutcome("miss")  # stored, for turns without tools
    with_tools = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), DANA)
    assert with_tools.cache is not None and with_tools.cache.status != "hit"
    assert with_tools.plan.steps[0].kind is StepKind.CALL_TOOL  # the planner was asked


async def write_corpus(root: Path, leave_text: str, leave_groups: str = "[hr]") -> None:
    (root / "hr").mkdir(parents=True, exist_ok=True)
    (root / "hr" / "leave.md").write_text(f"# Leave policy\n\n{leave_text}\n", encoding="utf-8")
    (root / "acl.yaml").write_text(
        f"tenant: contoso\nrules:\n  - match: 'hr/**'\n    groups: {leave_groups}\n",
        encoding="utf-8",
    )


async def test_a_changed_document_invalidates_its_entries(service: Service, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    await write_corpus(corpus, LEAVE_TEXT)
    index = service.knowledge.index
    # `lamina ingest` runs in another process: its own connection to the same file.
    ingest_index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await ingest_index.open()
    try:
        pipeline = IngestionPipeline(ingest_index, KnowledgeSettings())
        await pipeline.ingest(corpus)
        await index.delete_document("leave")  # only the ingested copy from now on
        orchestrator = service.orchestrator()

        first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
        assert first.cache == CacheOutcome("miss") and "27 days" in first.answer
        again = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
        assert again.cache is not None and again.cache.status == "hit"

        # Ingesting the same files again changes nothing: the entry survives.
        await pipeline.ingest(corpus)
        unchanged = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
        assert unchanged.cache is not None and unchanged.cache.status == "hit"

        await write_corpus(corpus, LEAVE_TEXT.replace("27 days", "30 days"))
        await pipeline.ingest(corpus)
        changed = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
        assert changed.cache == CacheOutcome("miss")
        assert "30 days" in changed.answer and "27 days" not in changed.answer

        # Access revoked: Alice's groups are no longer named, nothing of it comes back.
        await write_corpus(corpus, LEAVE_TEXT, leave_groups="[payroll]")
        await pipeline.ingest(corpus)
        revoked = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
        assert revoked.cache is not None and revoked.cache.status == "miss"
        assert "days" not in revoked.answer and revoked.citations == ()
    finally:
        await ingest_index.close()


async def test_a_hit_checks_its_sources_even_when_the_generation_did_not_move(
    service: Service,
) -> None:
    pinned = PinnedScopeRetriever(service.knowledge.retriever)
    orchestrator = service.orchestrator(retriever=pinned)
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert "27 days" in first.answer
    index = service.knowledge.index

    # Changed text: the digest differs, the entry is dropped, the answer is fresh.
    changed_text = LEAVE_TEXT.replace("27 days", "30 days")
    await index.replace_document(
        "leave", make_chunks("leave", changed_text, acl=access(groups=["hr"])), content_hash="test"
    )
    changed = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert changed.cache is not None
    assert (changed.cache.status, changed.cache.reason) == ("miss", "stale")
    assert "30 days" in changed.answer

    # Now hidden from Alice: the stored 30-day answer must not come back to her.
    await index.replace_document(
        "leave",
        make_chunks("leave", changed_text, acl=access(groups=["payroll"])),
        content_hash="test",
    )
    hidden = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert hidden.cache is not None
    assert (hidden.cache.status, hidden.cache.reason) == ("miss", "stale")
    assert "days" not in hidden.answer and hidden.citations == ()


async def test_an_answer_made_while_the_corpus_changed_is_not_stored(service: Service) -> None:
    retriever = IngestingRetriever(service.knowledge.retriever, service.knowledge.index)
    orchestrator = service.orchestrator(retriever=retriever)
    result = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert result.cache is not None
    assert (result.cache.status, result.cache.reason) == ("skipped", "corpus_changed")
    assert "27 days" in result.answer


async def test_a_hit_from_redis_and_a_redis_outage_is_a_miss_not_an_error(
    service: Service, redis: Redis
) -> None:
    service.store = RedisAnswerCacheStore(redis, prefix=f"test:{uuid.uuid4().hex}:")
    orchestrator = service.orchestrator()
    first = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    second = await orchestrator.run_turn(TurnRequest(LEAVE_QUESTION), DANA)
    assert second.cache is not None and second.cache.status == "hit"
    assert (second.answer, second.citations) == (first.answer, first.citations)

    with private_redis() as server:
        client = redis_client(server.url, connect_timeout_s=1.0, command_timeout_s=1.0)
        server.stop()
        try:
            service.store = RedisAnswerCacheStore(client)
            down = service.orchestrator()
            result = await down.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
            assert result.cache == CacheOutcome("miss", reason="unavailable")
            assert "27 days" in result.answer
            assert service.store.describe() == {"answer_cache": "unavailable"}
        finally:
            await client.aclose()


async def test_without_a_cache_nothing_changes(service: Service) -> None:
    plain = Orchestrator(
        retriever=service.knowledge.retriever,
        toolset=service.toolset,
        chat_model=service.model,
        planner=service.planner,
        conversations=service.conversations,
        audit=service.audit,
        prompts=PromptLibrary(PromptLibrary.bundled_directory()),
        settings=IntelligenceSettings(),
    )
    result = await plain.run_turn(TurnRequest(LEAVE_QUESTION), ALICE)
    assert result.cache is None
    [entry] = (await service.audit.query(AuditQuery("contoso"))).entries
    record = entry.record
    assert record.data["cache"] is None


async def test_a_hit_passes_the_output_check_of_today(service: Service) -> None:
    await service.knowledge.index.replace_document(
        "payroll",
        make_chunks(
            "payroll",
            "Questions about payroll deductions go to payroll.desk@contoso.com by email. "
            "Payroll deductions are listed on every monthly payslip.",
            acl=access(groups=["hr"]),
        ),
        content_hash="test",
    )
    question = "Where do questions about payroll deductions go?"
    # Stored while no redaction was configured...
    before = await service.orchestrator().run_turn(TurnRequest(question), ALICE)
    assert "payroll.desk@contoso.com" in before.answer

    # ...and served after it was: the cached answer goes through the same output check.
    safety = SafetyPolicy(
        shield=HeuristicPromptShield(),
        settings=SafetySettings(moderation=False),
        audit=service.audit,
    )
    after = await service.orchestrator(safety=safety).run_turn(TurnRequest(question), ALICE)
    assert after.cache is not None and after.cache.status == "hit"
    assert "payroll.desk@contoso.com" not in after.answer
    assert "Payroll deductions are listed" in after.answer
