"""Cache isolation, property-based: whatever the tenants, users, groups, documents, ACL
changes and rewordings, no answer ever carries text or a citation from a document the
requester may not see (now), cached or not.

Every turn runs through the real orchestrator, the real SQLite index, the extractive
answerer, the deterministic planner, the SQLite conversation and audit stores and the
answer cache (in-process, and over a real Redis). Each document carries a unique marker
word that the extractive answerer copies into its answer and citations, so a leak is
visible as a marker where it must not be.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferencing.gateway.redis_state import redis_client
from inferencing.providers import build_chat_model
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from inferencing.settings import InferencingSettings
from intelligence.answer_cache import AnswerCache, AnswerCacheStore, InProcessAnswerCacheStore
from intelligence.contracts import Principal, TurnRequest, TurnResult
from intelligence.orchestrator import Orchestrator
from intelligence.planning.deterministic import DeterministicPlanner
from intelligence.prompts import PromptLibrary
from intelligence.settings import AnswerCacheSettings, IntelligenceSettings
from intelligence.stores.redis_answer_cache import RedisAnswerCacheStore
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.stores.sqlite_audit import SqliteAuditLog
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import AccessControl, AccessFilter, Chunk
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.support.redis_server import RedisServer, private_redis
from tools.policy import build_toolset
from tools.settings import ToolsSettings

TENANTS = ("contoso", "fabrikam")
USERS = ("ana", "ben")
GROUPS = ("hr", "finance", "eng")
UNNAMED_GROUP = "book-club"  # in no ACL: changes nothing a caller may see
TOPICS = ("annual leave", "travel expenses", "parking permits", "laptop refresh")
MARKERS = (
    "amberwolf",
    "bluecrane",
    "coppermoth",
    "duskheron",
    "emberlynx",
    "frostviper",
)
REWRITTEN = tuple(f"{marker}prime" for marker in MARKERS)  # a document's text after a change
EVERY_MARKER = MARKERS + REWRITTEN


# --- the world -------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    number: int
    topic: str
    marker: str
    access: AccessControl

    @property
    def id(self) -> str:
        return f"doc{self.number}"

    def chunks(self) -> list[Chunk]:
        text = (
            f"The {self.marker} rule covers {self.topic} for every team. "
            f"Under the {self.marker} rule staff get {self.number + 2} days for {self.topic}."
        )
        return [
            Chunk(
                chunk_id=f"{self.id}-0",
                document_id=self.id,
                source=f"{self.id}.md",
                title=f"Policy {self.number}",
                text=text,
                ordinal=0,
                access=self.access,
            )
        ]


@dataclass(frozen=True)
class Ask:
    requester: Principal
    question: str
    original: str
    """The question before rewording."""


@dataclass(frozen=True)
class Change:
    number: int
    access: AccessControl
    rewrite: bool


@dataclass(frozen=True)
class Scenario:
    documents: tuple[Document, ...]
    steps: tuple[Ask | Change, ...]


def acls(tenant: str) -> st.SearchStrategy[AccessControl]:
    some_users = st.frozensets(st.sampled_from(USERS), min_size=1, max_size=2)
    some_groups = st.frozensets(st.sampled_from(GROUPS), min_size=1, max_size=2)
    return st.one_of(
        st.just(AccessControl(tenant, public=True)),
        some_users.map(lambda users: AccessControl(tenant, users=users)),
        some_groups.map(lambda groups: AccessControl(tenant, groups=groups)),
        st.tuples(some_users, some_groups).map(
            lambda ug: AccessControl(tenant, users=ug[0], groups=ug[1])
        ),
    )


@st.composite
def documents(draw: st.DrawFn) -> tuple[Document, ...]:
    found = []
    for number in range(draw(st.integers(1, len(MARKERS)))):
        tenant = draw(st.sampled_from(TENANTS))
        found.append(
            Document(number, draw(st.sampled_from(TOPICS)), MARKERS[number], draw(acls(tenant)))
        )
    return tuple(found)


requesters = st.builds(
    Principal,
    tenant_id=st.sampled_from(TENANTS),
    user_id=st.sampled_from((*USERS, "walk-in")),
    groups=st.frozensets(st.sampled_from((*GROUPS, UNNAMED_GROUP)), max_size=3),
)


def questions(document: Document) -> st.SearchStrategy[str]:
    return st.sampled_from(
        (
            f"What does the {document.marker} rule say about {document.topic}?",
            f"How many days do staff get for {document.topic}?",
            f"Tell me about the {document.marker} rule.",
            f"What covers {document.topic}?",
        )
    )


@st.composite
def reworded(draw: st.DrawFn, question: str) -> str:
    """The same question in other words: case, punctuation, fillers, order, spacing."""
    text = question
    if draw(st.booleans()) and " about " in text:
        head, _, tail = text.rstrip("?.").partition(" about ")
        text = f"About {tail}, {head[0].lower()}{head[1:]}?"
    text = draw(st.sampled_from(("", "Please, ", "Hey, ", "Hi! ", "So, "))) + text
    punctuation = draw(st.sampled_from(("keep", "strip", "shout")))
    if punctuation == "strip":
        text = re.sub(r"[?,.!]", "", text)
    elif punctuation == "shout":
        text = text.rstrip("?.") + "?!!"
    case = draw(st.sampled_from(("keep", "lower", "upper")))
    text = {"keep": text, "lower": text.lower(), "upper": text.upper()}[case]
    if draw(st.booleans()):
        text = text.replace(" ", "  ")
    return text


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    docs = draw(documents())
    steps: list[Ask | Change] = []
    asked: list[str] = []
    for _ in range(draw(st.integers(2, 7))):
        if draw(st.integers(0, 5)) == 0:
            document = draw(st.sampled_from(docs))
            new_acl = draw(acls(document.access.tenant_id))
            steps.append(Change(document.number, new_acl, draw(st.booleans())))
            continue
        # Often the same question again, reworded, by whoever: that is what the cache serves.
        if asked and draw(st.booleans()):
            original = draw(st.sampled_from(asked))
        else:
            original = draw(questions(draw(st.sampled_from(docs))))
            asked.append(original)
        steps.append(Ask(draw(requesters), draw(reworded(original)), original))
    # Always at least one reuse across users: two walk-ins no ACL names, one in an extra
    # unnamed group, ask the same question reworded only in ways the embedder ignores.
    tenant, groups = draw(st.sampled_from(TENANTS)), draw(st.frozensets(st.sampled_from(GROUPS)))
    document = draw(st.sampled_from(docs))
    original = draw(questions(document))
    first = Principal(tenant, "walk-in-1", groups)
    second = Principal(tenant, "walk-in-2", groups | {UNNAMED_GROUP})
    steps.append(Ask(first, original, original))
    steps.append(Ask(second, "please, " + original.lower().rstrip("?."), original))
    # Then that document changes (text, ACL or both) and the question comes back.
    new_acl = draw(acls(document.access.tenant_id))
    steps.append(Change(document.number, new_acl, draw(st.booleans())))
    steps.append(Ask(draw(st.sampled_from((first, second))), original, original))
    return Scenario(docs, tuple(steps))


# --- playing a scenario ----------------------------------------------------------------


@dataclass
class Tally:
    turns: int = 0
    hits: int = 0
    reworded_hits: int = 0
    """Hits on a question asked in other words than the one stored."""
    hits_from_another_user: int = 0
    """Hits by a requester who had not asked before: the entry was someone else's."""
    leaks: list[str] = field(default_factory=list)


def check(result: TurnResult, requester: Principal, world: dict[int, Document]) -> list[str]:
    """Every way this answer could show what the requester may not see."""
    caller = AccessFilter.for_caller(requester)
    visible = {d.id: d for d in world.values() if caller.allows(d.access)}
    allowed = {d.marker for d in visible.values()}
    problems = []
    shown = [result.answer.lower()] + [
        f"{c.snippet} {c.title} {c.source}".lower() for c in result.citations
    ]
    for marker in EVERY_MARKER:
        if marker not in allowed and any(re.search(rf"\b{marker}\b", text) for text in shown):
            problems.append(f"{requester} was shown {marker!r}: {result.answer!r}")
    for citation in result.citations:
        if citation.document_id not in visible:
            problems.append(f"{requester} was cited {citation.document_id}")
    return problems


async def play(scenario: Scenario, tally: Tally, redis_url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = SqliteKnowledgeIndex(Path(tmp) / "knowledge.db")
        conversations = SqliteConversationStore(Path(tmp) / "conversations.db")
        audit = SqliteAuditLog(Path(tmp) / "audit.db")
        redis = (
            None
            if redis_url is None
            else redis_client(redis_url, connect_timeout_s=2.0, command_timeout_s=2.0)
        )
        for part in (index, conversations, audit):
            await part.open()
        try:
            if redis is not None:
                await redis.flushdb()
            world = {d.number: d for d in scenario.documents}
            for document in world.values():
                await index.replace_document(document.id, document.chunks(), content_hash="test")
            retriever = SecurityTrimmedRetriever(index)
            store: AnswerCacheStore = (
                InProcessAnswerCacheStore() if redis is None else RedisAnswerCacheStore(redis)
            )
            (deployment,) = InferencingSettings().registry()
            orchestrator = Orchestrator(
                retriever=retriever,
                toolset=build_toolset(ToolsSettings(load_entry_points=False)),
                chat_model=build_chat_model(deployment),
                planner=DeterministicPlanner(),
                conversations=conversations,
                audit=audit,
                prompts=PromptLibrary(PromptLibrary.bundled_directory()),
                settings=IntelligenceSettings(),
                answer_cache=AnswerCache(
                    store=store,
                    embedder=HashingEmbeddingModel(),
                    retriever=retriever,
                    settings=AnswerCacheSettings(enabled=True),
                    model_version="extractive",
                ),
            )
            askers: set[Principal] = set()
            for step in scenario.steps:
                if isinstance(step, Change):
                    before = world[step.number]
                    marker = REWRITTEN[step.number] if step.rewrite else before.marker
                    world[step.number] = replace(before, access=step.access, marker=marker)
                    await index.replace_document(
                        before.id, world[step.number].chunks(), content_hash="test"
                    )
                    continue
                result = await orchestrator.run_turn(TurnRequest(step.question), step.requester)
                tally.turns += 1
                tally.leaks += check(result, step.requester, world)
                assert result.cache is not None and result.cache.status in ("hit", "miss")
                if result.cache.status == "hit":
                    tally.hits += 1
                    tally.reworded_hits += step.question != step.original
                    tally.hits_from_another_user += step.requester not in askers
                askers.add(step.requester)
        finally:
            for part in (index, conversations, audit):
                await part.close()
            if redis is not None:
                await redis.aclose()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for this module (the pattern of tests/inferencing/conftest.py)."""
    with private_redis() as server:
        yield server


@pytest.mark.parametrize("backend", ["in-process", "redis"])
def test_no_answer_ever_shows_a_document_the_requester_may_not_see(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # Each example runs in its own event loop (asyncio.run), with its own stores.
    redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    tally = Tally()

    @settings(
        max_examples=25,
        deadline=None,
        database=None,  # no .hypothesis/ folder in the checkout; failures print their example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scenario=scenarios())
    def isolated(scenario: Scenario) -> None:
        before = len(tally.leaks)
        asyncio.run(play(scenario, tally, redis_url))
        assert tally.leaks[before:] == []

    isolated()

    assert tally.leaks == []
    # Not vacuous: answers really were served from the cache, to other users than the one
    # who stored them, and for questions asked in other words.
    assert tally.hits > 0, tally
    assert tally.hits_from_another_user > 0, tally
    assert tally.reworded_hits > 0, tally
