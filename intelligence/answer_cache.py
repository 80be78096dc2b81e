"""The semantic answer cache: reuse an answer when the same question is asked again.

"The same question" means: asked in the same *key scope* with an embedding whose
cosine similarity to the cached question is at least the threshold (0.95 by
default). The scope is a hash of everything else the answer depends on:

- the tenant and the caller's ACL fingerprint (``Retriever.access_scope``): callers
  share entries only when they can see exactly the same chunks;
- the corpus generation: any document of the tenant added, changed or deleted, in
  any process, moves every caller to new scopes;
- the model version, the answer prompt's version (with a digest of its text and
  the answer settings) and the embedding model;
- a hash of the conversation so far (empty for a first turn), never the last
  message alone; follow-up turns are skipped unless ``multi_turn`` is on;
- with ``tool_turns`` on, for a turn that may call tools, the user and their roles (tool
  results are per caller). A turn without tools (``TurnRequest.tools`` false) is keyed
  without them, so it never meets an answer a tool helped to make.

On a hit every source chunk the answer was built from is fetched again with the
caller's identity and compared with a digest kept in the entry; if one is gone,
hidden from this caller or changed, the entry is deleted and the turn is a miss.
A cache that cannot answer (store down, embedder failing, too slow) is a miss:
it is logged and never fails the turn.

Entries live in an :class:`AnswerCacheStore`: :class:`InProcessAnswerCacheStore`
here, or ``intelligence.stores.redis_answer_cache.RedisAnswerCacheStore`` shared
by replicas. Both keep each scope bounded and expire entries after the TTL.

Every entry remembers whose turn stored it (its :class:`CacheOwner`, never part of
the key): an entry holds that person's question in its plan, so it is exported and
erased with their data (:meth:`AnswerCache.entries_of`, :meth:`AnswerCache.forget_user`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import operator
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import metrics, trace
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from inferencing.contracts import EmbeddingModel
from intelligence.contracts import (
    CacheOutcome,
    Citation,
    ConversationMessage,
    Plan,
    Principal,
    StepKind,
)
from intelligence.settings import AnswerCacheSettings
from knowledge.contracts import AccessScope, Chunk, Retriever

log = logging.getLogger(__name__)

_tracer = trace.get_tracer("lamina.intelligence")
_lookups = metrics.get_meter("lamina.intelligence").create_counter(
    "lamina.answer_cache.lookups",
    unit="{lookup}",
    description="Answer cache lookups by lamina.cache.outcome (hit, miss, bypass: a turn "
    "the cache does not answer, such as a follow-up); hit ratio = hit / all lookups",
)
_OUTCOMES = {"hit": "hit", "miss": "miss", "skipped": "bypass"}
"""``lamina.cache.outcome`` of each :class:`CacheOutcome` status."""

Clock = Callable[[], float]
"""Seconds since the epoch (``time.time``); injected so tests can move time."""

_KEY_VERSION = "answer-cache/v1"


# --- entries and the store port -------------------------------------------------------


class AnswerCacheUnavailable(Exception):
    """A store cannot answer now (and has already logged why): the turn is a miss."""


@dataclass(frozen=True, slots=True)
class SourceStamp:
    """A chunk an answer was built from, and a digest of what it said then."""

    chunk_id: str
    digest: str


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a hit replays, and what it must check first."""

    answer: str
    citations: tuple[Citation, ...]
    sources: tuple[SourceStamp, ...]
    """Every chunk the model was given, cited or not: uncited text may be in the answer."""
    plan: Mapping[str, Any] | None
    """Summary of the plan that produced the answer (for audit)."""
    created_at: float


@dataclass(frozen=True, slots=True)
class CacheOwner:
    """Whose turn stored an entry."""

    tenant_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached answer in a key scope, with the embedding of its question."""

    id: str
    vector: Sequence[float]
    """Unit-length embedding of the question; stores keep it as float32."""
    answer: CachedAnswer
    owner: CacheOwner | None = None
    """Whose turn stored it: the entry is erased with that person's data. It plays no
    part in lookups (callers of one access scope share entries)."""


@dataclass(frozen=True, slots=True)
class Nearest:
    """The live entry of a scope most similar to a question."""

    similarity: float
    entry: CacheEntry | None
    """``None`` when ``similarity`` is below the threshold asked for (not loaded)."""


class AnswerCacheStore(Protocol):
    """Entries grouped by key scope. Every adapter passes
    ``tests/intelligence/test_answer_cache.py::AnswerCacheStoreContract``.

    Entries older than ``ttl_s`` at ``now`` are neither returned nor kept; a scope
    holds at most ``max_entries``, the oldest leaving first. Errors propagate:
    :class:`AnswerCache` turns them into misses.
    """

    async def nearest(
        self,
        scope: str,
        vector: Sequence[float],
        *,
        min_similarity: float,
        now: float,
        ttl_s: float,
    ) -> Nearest | None:
        """The most similar live entry of ``scope``, or ``None`` when it has none."""
        ...

    async def put(
        self, scope: str, entry: CacheEntry, *, max_entries: int, now: float, ttl_s: float
    ) -> None: ...

    async def delete(self, scope: str, entry_id: str) -> None: ...

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Delete every entry stored from that user's turns, in every scope (expired ones
        still kept included); returns how many went."""
        ...

    async def entries_of(self, tenant_id: str, user_id: str) -> list[CacheEntry]:
        """Every entry stored from that user's turns that the store still keeps, oldest
        first (for a data-subject export)."""
        ...

    def describe(self) -> dict[str, str]:
        """For ``/readyz``: ``{"answer_cache": <backend or its state>}``."""
        ...


def unit(vector: Sequence[float]) -> tuple[float, ...]:
    """``vector`` scaled to length 1 (all zeros stays all zeros), so that cosine
    similarity is a plain dot product in the stores."""
    norm = math.sqrt(math.fsum(v * v for v in vector))
    if norm == 0.0 or not math.isfinite(norm):
        return tuple(0.0 for _ in vector)
    return tuple(v / norm for v in vector)


class QueryVector:
    """A question's unit vector, prepared to be compared with every entry of a scope.

    Cosine similarity of unit vectors is their dot product. Only the query's non-zero
    components are multiplied when they are few (the hashing embedder sets a few dozen
    of 512): pure Python pays per multiplication, and a scope holds many entries.
    """

    __slots__ = ("_dense", "_indices", "_size", "_values")

    def __init__(self, vector: Sequence[float]) -> None:
        self._size = len(vector)
        non_zero = [(i, v) for i, v in enumerate(vector) if v]
        self._dense = len(non_zero) * 2 > self._size
        self._indices = [i for i, _ in non_zero]
        self._values = list(vector) if self._dense else [v for _, v in non_zero]

    def similarity(self, stored: Sequence[float]) -> float:
        """Cosine similarity to a stored unit vector; 0.0 when the sizes differ (another
        embedding model wrote it: not comparable, never a hit)."""
        if len(stored) != self._size:
            return 0.0
        if self._dense:
            dot: float = sum(map(operator.mul, stored, self._values))
        else:
            dot = sum(map(operator.mul, map(stored.__getitem__, self._indices), self._values))
        return max(-1.0, min(1.0, dot))


def float32(vector: Sequence[float]) -> array[float]:
    """The vector as stored: float32, as the Redis store packs it, so both stores
    compute the very same similarities."""
    return array("f", vector)


# --- the in-process store ------------------------------------------------------------


@dataclass
class _Scope:
    entries: dict[str, tuple[array[float], CacheEntry]] = field(default_factory=dict)


class InProcessAnswerCacheStore:
    """An :class:`AnswerCacheStore` in this process's memory: the embedded default.

    At most ``max_scopes`` scopes are kept, the least recently used leaving first.
    Each replica has its own; use Redis to share entries between replicas.
    """

    def __init__(self, *, max_scopes: int = 10_000) -> None:
        if max_scopes < 1:
            raise ValueError("max_scopes must be at least 1")
        self._max_scopes = max_scopes
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()

    async def nearest(
        self,
        scope: str,
        vector: Sequence[float],
        *,
        min_similarity: float,
        now: float,
        ttl_s: float,
    ) -> Nearest | None:
        held = self._scopes.get(scope)
        if held is None:
            return None
        self._scopes.move_to_end(scope)
        _expire(held, now - ttl_s)
        query = QueryVector(vector)
        best: tuple[float, CacheEntry] | None = None
        for stored, entry in held.entries.values():
            similarity = query.similarity(stored)
            if best is None or similarity > best[0]:
                best = (similarity, entry)
        if best is None:
            return None
        similarity, entry = best
        return Nearest(similarity, entry if similarity >= min_similarity else None)

    async def put(
        self, scope: str, entry: CacheEntry, *, max_entries: int, now: float, ttl_s: float
    ) -> None:
        held = self._scopes.setdefault(scope, _Scope())
        self._scopes.move_to_end(scope)
        held.entries[entry.id] = (float32(entry.vector), entry)
        _expire(held, now - ttl_s)
        if len(held.entries) > max_entries:
            oldest = sorted(held.entries.values(), key=lambda item: item[1].answer.created_at)
            for _, gone in oldest[: len(held.entries) - max_entries]:
                del held.entries[gone.id]
        while len(self._scopes) > self._max_scopes:
            self._scopes.popitem(last=False)

    async def delete(self, scope: str, entry_id: str) -> None:
        held = self._scopes.get(scope)
        if held is not None:
            held.entries.pop(entry_id, None)

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        owner = CacheOwner(tenant_id, user_id)
        gone = 0
        # A walk over every scope: bounded by max_scopes, and erasure is rare.
        for held in self._scopes.values():
            for entry_id in [i for i, (_, e) in held.entries.items() if e.owner == owner]:
                del held.entries[entry_id]
                gone += 1
        return gone

    async def entries_of(self, tenant_id: str, user_id: str) -> list[CacheEntry]:
        owner = CacheOwner(tenant_id, user_id)
        found = [
            entry
            for held in self._scopes.values()
            for _, entry in held.entries.values()
            if entry.owner == owner
        ]
        return sorted(found, key=lambda entry: (entry.answer.created_at, entry.id))

    def describe(self) -> dict[str, str]:
        return {"answer_cache": "in-process"}


def _expire(scope: _Scope, created_before: float) -> None:
    for entry_id in [
        i for i, (_, e) in scope.entries.items() if e.answer.created_at < created_before
    ]:
        del scope.entries[entry_id]


# --- the cache -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A verified cached answer for this caller."""

    answer: str
    citations: tuple[Citation, ...]
    chunks: tuple[Chunk, ...]
    """The source chunks, fetched again just now with the caller's identity."""
    similarity: float
    plan: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Key:
    scope: str
    access: AccessScope
    vector: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """The result of :meth:`AnswerCache.lookup`; hand it back to :meth:`AnswerCache.remember`."""

    outcome: CacheOutcome
    hit: CacheHit | None = None
    key: _Key | None = field(default=None, repr=False)
    """Where a new answer would be stored; ``None`` when it must not be."""


def chunk_digest(chunk: Chunk) -> str:
    """Digest of everything of a chunk that can reach an answer or a citation."""
    fields = [
        chunk.document_id,
        chunk.source,
        chunk.title,
        chunk.text,
        chunk.ordinal,
        chunk.page,
        chunk.section,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def context_digest(history: Sequence[ConversationMessage]) -> str:
    """Hash of the conversation before the question ("" for a first turn). Every
    message counts, with its status: a superset of what the prompt shows."""
    if not history:
        return ""
    return _digest([[m.role, m.status.value, m.content] for m in history])


class AnswerCache:
    """Looks answers up before planning and stores complete answers after the turn.

    ``model_version`` names the model (deployments and versions) that answers; the
    composition root builds it from the inferencing settings. Public methods never
    raise for a failing store, embedder or index: such a turn is a miss.
    """

    def __init__(
        self,
        *,
        store: AnswerCacheStore,
        embedder: EmbeddingModel,
        retriever: Retriever,
        settings: AnswerCacheSettings,
        model_version: str,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._retriever = retriever
        self._settings = settings
        self._model_version = model_version
        self._clock = clock

    @property
    def settings(self) -> AnswerCacheSettings:
        return self._settings

    def describe(self) -> dict[str, str]:
        return self._store.describe()

    async def forget_user(self, principal: Principal) -> int:
        """Delete every entry stored from the caller's turns; returns how many went.
        Unlike a lookup, a failing store raises: an erasure must not pass for done."""
        return await self._store.forget_user(principal.tenant_id, principal.user_id)

    async def entries_of(self, principal: Principal) -> list[CacheEntry]:
        """Every entry stored from the caller's turns, oldest first; a failing store raises."""
        return await self._store.entries_of(principal.tenant_id, principal.user_id)

    async def lookup(
        self,
        *,
        question: str,
        history: Sequence[ConversationMessage],
        principal: Principal,
        prompt_version: str,
        tools: bool = True,
    ) -> CacheLookup:
        """The cached answer for this caller, or why there is none: a
        ``lamina.answer_cache.lookup`` span and a count of ``lamina.answer_cache.lookups``
        by outcome (the question never reaches the span). ``tools``: whether the turn may
        call tools (false: only answers made without any are looked up, and stored)."""
        with _tracer.start_as_current_span("lamina.answer_cache.lookup") as span:
            lookup = await self._lookup_or_miss(question, history, principal, prompt_version, tools)
            _observe(span, lookup.outcome)
            return lookup

    async def _lookup_or_miss(
        self,
        question: str,
        history: Sequence[ConversationMessage],
        principal: Principal,
        prompt_version: str,
        tools: bool,
    ) -> CacheLookup:
        if history and not self._settings.multi_turn:
            return CacheLookup(CacheOutcome("skipped", reason="multi_turn"))
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                return await self._lookup(question, history, principal, prompt_version, tools)
        except TimeoutError:
            log.warning(
                "answer cache: lookup slower than %ss, a miss", self._settings.lookup_timeout_s
            )
            return CacheLookup(CacheOutcome("miss", reason="timeout"))
        except AnswerCacheUnavailable:
            return CacheLookup(CacheOutcome("miss", reason="unavailable"))
        except Exception as exc:
            # Type and message only: the question may be personal data.
            log.warning("answer cache: lookup failed, a miss (%s: %s)", type(exc).__name__, exc)
            return CacheLookup(CacheOutcome("miss", reason="unavailable"))

    async def _lookup(
        self,
        question: str,
        history: Sequence[ConversationMessage],
        principal: Principal,
        prompt_version: str,
        tools: bool,
    ) -> CacheLookup:
        # Independent round trips (index, embedding model): overlap them.
        access, embedded = await asyncio.gather(
            self._retriever.access_scope(principal),
            self._embedder.embed([question], principal),
        )
        (raw,) = embedded.vectors
        vector = unit(raw)
        if not any(vector):
            return CacheLookup(CacheOutcome("miss", reason="no_terms"))
        scope = self._scope(access, history, principal, prompt_version, tools)
        key = _Key(scope, access, vector)
        now = self._clock()
        threshold = self._settings.similarity_threshold
        nearest = await self._store.nearest(
            key.scope, vector, min_similarity=threshold, now=now, ttl_s=self._settings.ttl_s
        )
        if nearest is None:
            return CacheLookup(CacheOutcome("miss"), key=key)
        similarity = round(nearest.similarity, 6)
        entry = nearest.entry
        if entry is None or nearest.similarity < threshold:
            return CacheLookup(CacheOutcome("miss", similarity), key=key)
        chunks = await self._verify(entry.answer.sources, principal)
        if chunks is None:
            await self._store.delete(key.scope, entry.id)
            return CacheLookup(CacheOutcome("miss", similarity, reason="stale"), key=key)
        cached = entry.answer
        hit = CacheHit(cached.answer, cached.citations, chunks, similarity, cached.plan)
        return CacheLookup(CacheOutcome("hit", similarity), hit=hit)

    async def _verify(
        self, sources: Iterable[SourceStamp], principal: Principal
    ) -> tuple[Chunk, ...] | None:
        """The source chunks as this caller sees them now, or ``None`` if any is gone,
        hidden from the caller or changed. Defence in depth: the generation in the key
        already changes with the corpus, but a backend that failed to move it, or a
        write between lookup and store, must not turn into a leak."""
        chunks: list[Chunk] = []
        for source in sources:
            chunk = await self._retriever.get_chunk(source.chunk_id, principal)
            if chunk is None or chunk_digest(chunk) != source.digest:
                return None
            chunks.append(chunk)
        return tuple(chunks)

    def _scope(
        self,
        access: AccessScope,
        history: Sequence[ConversationMessage],
        principal: Principal,
        prompt_version: str,
        tools: bool,
    ) -> str:
        # Tool results depend on who calls (roles, the user's own data): per user then.
        # Turns with and without tools never share: an answer made with tools turned off
        # (lamina-rag) must not stand in for a turn whose planner might have called one.
        per_caller = self._settings.tool_turns and tools
        caller = [principal.user_id, sorted(principal.roles)] if per_caller else None
        return _digest(
            [
                _KEY_VERSION,
                principal.tenant_id,
                access.fingerprint,
                access.generation,
                self._model_version,
                prompt_version,
                self._embedder.name,
                context_digest(history),
                "tools" if tools else "no-tools",
                caller,
            ]
        )

    async def remember(
        self,
        lookup: CacheLookup,
        *,
        answer: str,
        citations: Sequence[Citation],
        plan: Plan,
        sources: Sequence[Chunk],
        plan_summary: Mapping[str, Any] | None,
        principal: Principal,
    ) -> CacheOutcome:
        """Store a complete answer of a turn that missed; returns the turn's outcome."""
        key = lookup.key
        if key is None or lookup.hit is not None or not answer:
            return lookup.outcome
        if not self._settings.tool_turns and any(
            step.kind is StepKind.CALL_TOOL for step in plan.steps
        ):
            return CacheOutcome("skipped", reason="tool_steps")
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                # The corpus may have changed while the turn ran: an answer read from another
                # generation than the key names must not be stored under it.
                if await self._retriever.access_scope(principal) != key.access:
                    return CacheOutcome("skipped", lookup.outcome.similarity, "corpus_changed")
                unique = {chunk.chunk_id: chunk for chunk in sources}
                now = self._clock()
                entry = CacheEntry(
                    id=uuid.uuid4().hex,
                    vector=key.vector,
                    answer=CachedAnswer(
                        answer=answer,
                        citations=tuple(citations),
                        sources=tuple(
                            SourceStamp(c.chunk_id, chunk_digest(c)) for c in unique.values()
                        ),
                        plan=plan_summary,
                        created_at=now,
                    ),
                    owner=CacheOwner(principal.tenant_id, principal.user_id),
                )
                await self._store.put(
                    key.scope,
                    entry,
                    max_entries=self._settings.max_entries_per_scope,
                    now=now,
                    ttl_s=self._settings.ttl_s,
                )
        except AnswerCacheUnavailable:
            pass  # the store logged it when it went down
        except Exception as exc:
            log.warning("answer cache: could not store an answer (%s: %s)", type(exc).__name__, exc)
        return lookup.outcome


def _observe(span: Span, outcome: CacheOutcome) -> None:
    status = _OUTCOMES[outcome.status]
    attributes: dict[str, AttributeValue] = {"lamina.cache.outcome": status}
    if outcome.reason is not None:
        attributes["lamina.cache.reason"] = outcome.reason
    if outcome.similarity is not None:
        attributes["lamina.cache.similarity"] = outcome.similarity
    span.set_attributes(attributes)
    _lookups.add(1, {"lamina.cache.outcome": status})


def answer_variant(prompt_id: str, template: str, settings: Mapping[str, object]) -> str:
    """The prompt version for cache keys: the prompt's id, with a digest of its template
    and of the answer settings, so that a prompt edited without a new version, or other
    limits, never replay answers made the old way."""
    return f"{prompt_id}#{_digest([template, sorted(settings.items())])[:12]}"
