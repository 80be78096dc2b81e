"""Latency of answer-cache lookups: a hit and a miss, in-process and in Redis.

Ingests the bundled sample corpus into a fresh SQLite index, fills one key scope
with ``--entries`` cached answers (each built from a real retrieval, so a hit
re-checks real source chunks), then times ``AnswerCache.lookup`` for questions that
hit (stored questions, reworded in case and punctuation) and for questions that
miss (nothing similar stored). A lookup is everything the orchestrator waits for
before it would plan: the caller's access scope from the index, the question's
embedding (the offline hashing embedder), the nearest-neighbour scan of the scope
and, on a hit, the re-check of every source chunk with the caller's identity.

Redis: ``--redis-url``, or a private ``redis-server`` on a free loopback port when
one is on PATH (skipped otherwise). Prints p50/p99 per case and writes JSON to
bench/results/answer_cache.json.

    .venv/bin/python -m bench.answer_cache --lookups 2000 --entries 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.processes import REPO, free_port
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from intelligence.answer_cache import AnswerCache, AnswerCacheStore, InProcessAnswerCacheStore
from intelligence.contracts import Plan, PlanStep, Principal, StepKind
from intelligence.settings import AnswerCacheSettings
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import RetrievalQuery
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.retrieval import SecurityTrimmedRetriever
from knowledge.settings import KnowledgeSettings

CALLER = Principal(
    "contoso", "adele@contoso.com", frozenset({"employees", "hr"}), frozenset({"employee"})
)
QUESTIONS = [
    "How many days of annual leave do I get?",
    "Can I carry over unused leave?",
    "What is the meal allowance when travelling?",
    "Who approves remote work requests?",
    "How do I claim home office equipment?",
    "What happens to leave when I change teams?",
    "How long does Atlas keep my data?",
    "How do I open the command palette in Atlas?",
]
PLAN = Plan(
    steps=(
        PlanStep("s1", StepKind.RETRIEVE, "search", query="q"),
        PlanStep("s2", StepKind.ANSWER, "answer", depends_on=("s1",)),
    ),
    planner="deterministic",
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def _redis(url: str | None) -> Iterator[str | None]:
    """The Redis to use: the given URL, a private server, or none."""
    if url is not None:
        yield url
        return
    executable = shutil.which("redis-server")
    if executable is None:
        yield None
        return
    port = free_port()
    server = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)  # a local redis-server listens within milliseconds
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def _fill(cache: AnswerCache, retriever: SecurityTrimmedRetriever, entries: int) -> None:
    """``entries`` answers in the caller's scope: the real questions, then fillers."""
    fillers = [f"Question number {n} about policy area {n * 7919 % 1000}" for n in range(entries)]
    for question in (QUESTIONS + fillers)[:entries]:
        lookup = await cache.lookup(
            question=question, history=(), principal=CALLER, prompt_version="bench@v1"
        )
        result = await retriever.retrieve(RetrievalQuery(question), CALLER)
        await cache.remember(
            lookup,
            answer=f"A cached answer to: {question} [1]",
            citations=(),
            plan=PLAN,
            sources=[p.chunk for p in result.passages],
            plan_summary=None,
            principal=CALLER,
        )


async def _time(cache: AnswerCache, questions: list[str], lookups: int, want: str) -> list[float]:
    timings: list[float] = []
    for n in range(lookups):
        question = questions[n % len(questions)]
        started = time.perf_counter()
        lookup = await cache.lookup(
            question=question, history=(), principal=CALLER, prompt_version="bench@v1"
        )
        timings.append((time.perf_counter() - started) * 1000)
        if lookup.outcome.status != want:
            raise SystemExit(f"expected a {want} for {question!r}, got {lookup.outcome}")
    return timings


async def _measure(
    store: AnswerCacheStore,
    retriever: SecurityTrimmedRetriever,
    args: argparse.Namespace,
) -> dict[str, object]:
    cache = AnswerCache(
        store=store,
        embedder=HashingEmbeddingModel(dimensions=args.dimensions),
        retriever=retriever,
        settings=AnswerCacheSettings(enabled=True, max_entries_per_scope=args.entries),
        model_version="bench",
    )
    await _fill(cache, retriever, args.entries)
    stored = QUESTIONS[: args.entries]
    hits = [q.upper().rstrip("?") + "!" for q in stored]  # reworded, same words
    misses = [f"Is there a rule about {word} number {n}?" for n, word in enumerate("xyzuvw")]
    await _time(cache, hits, 50, "hit")  # warm-up
    await _time(cache, misses, 50, "miss")
    figures: dict[str, object] = {}
    for case, questions in (("hit", hits), ("miss", misses)):
        timings = await _time(cache, questions, args.lookups, case)
        figures[case] = {
            "p50_ms": round(statistics.median(timings), 3),
            "p99_ms": round(_percentile(timings, 0.99), 3),
            "mean_ms": round(statistics.fmean(timings), 3),
        }
    return figures


async def _run(args: argparse.Namespace) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="lamina-bench-cache-"))
    index = SqliteKnowledgeIndex(data / "knowledge.db")
    await index.open()
    try:
        await IngestionPipeline(index, KnowledgeSettings()).ingest(REPO / "samples" / "corpus")
        retriever = SecurityTrimmedRetriever(index)
        results: dict[str, object] = {
            "in-process": await _measure(InProcessAnswerCacheStore(), retriever, args)
        }
        with _redis(args.redis_url) as url:
            if url is None:
                results["redis"] = "skipped: no --redis-url and no redis-server on PATH"
            else:
                from inferencing.gateway.redis_state import redis_client
                from intelligence.stores.redis_answer_cache import RedisAnswerCacheStore

                client = redis_client(url, connect_timeout_s=1.0, command_timeout_s=1.0)
                try:
                    await client.ping()
                    prefix = f"bench:{os.getpid()}:"
                    store = RedisAnswerCacheStore(client, prefix=prefix)
                    results["redis"] = await _measure(store, retriever, args)
                    async for key in client.scan_iter(match=prefix + "*"):
                        await client.delete(key)
                finally:
                    await client.aclose()
        return results
    finally:
        await index.close()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency of answer-cache lookups")
    parser.add_argument("--lookups", type=int, default=2000, help="Timed lookups per case")
    parser.add_argument("--entries", type=int, default=64, help="Cached answers in the scope")
    parser.add_argument("--dimensions", type=int, default=512, help="Embedding size")
    parser.add_argument("--redis-url", default=None, help="Default: a private redis-server")
    args = parser.parse_args()
    if args.entries < len(QUESTIONS):
        parser.error(f"--entries must be at least {len(QUESTIONS)}")

    figures = asyncio.run(_run(args))
    result = {
        "benchmark": "AnswerCache.lookup, sample corpus, hashing embedder, sequential",
        "lookups_per_case": args.lookups,
        "entries_in_scope": args.entries,
        "dimensions": args.dimensions,
        "results": figures,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer_cache.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
