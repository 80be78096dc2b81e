"""Latency and recall of security-trimmed retrieval in the embedded index, on synthetic chunks.

For each corpus size (10k, 100k, 1M chunks; a size is skipped, with the reason printed,
when the machine lacks the memory for it) the script fills a fresh ``SqliteKnowledgeIndex``
through ``replace_document``: documents of ten chunks, each chunk ~60 words drawn from a
Zipf-distributed vocabulary of 20,000 made-up words, and a 384-d unit vector near one of
1,000 random centroids (so that neighbourhoods mean something, as real embeddings do).
Every document is private to the tenant and grants nested groups: ``sees-1`` to about
1 % of the documents, ``sees-10`` to about 10 %, ``sees-50`` to about 50 %; a caller in
exactly one of them is the ACL filter. Queries are a stored chunk's vector plus noise,
with four words of that chunk as their text (none of the vocabulary's 50 commonest
words, which occur in nearly every chunk: queries lose them as they lose stopwords); each
query is aimed at a chunk the caller may see.

Per size and filter, after a warm-up, ``--queries`` searches in each mode (top 10):
p50 / p95 of ``KnowledgeIndex.search`` (the query vector is given, so no embedding time
is included), recall@10 of vector mode against an exact brute-force search over the
chunks the filter permits (numpy, cosine), and a check that no hit is outside the
filter. Targets at 100k chunks: hybrid p50 <= 10 ms, recall@10 >= 0.95.

    .venv/bin/python -m bench.retrieval_latency [--sizes 10000,100000,1000000] [--queries 200]

Writes bench/results/retrieval_latency.json (``retrieval_latency-<sizes>.json`` with
other ``--sizes``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.knowledge_support import Matrix, machine, write_result
from bench.load import percentile
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import (
    AccessControl,
    AccessFilter,
    Chunk,
    EmbeddingIdentity,
    SearchMode,
    SearchRequest,
)

TENANT = "bench"
DIMENSIONS = 384
IDENTITY = EmbeddingIdentity("synthetic-unit-vectors", DIMENSIONS)
CHUNKS_PER_DOCUMENT = 10
WORDS_PER_CHUNK = 60
VOCABULARY = 20_000
CENTROIDS = 1_000
COMMON = 50  # the vocabulary's most frequent words, left out of queries like stopwords
TOP_K = 10
WARMUP = 10
SELECTIVITY = {"sees-1": 0.01, "sees-10": 0.10, "sees-50": 0.50}
# Vectors, text, FTS postings and SQLite's page cache, per chunk, with room to spare.
BYTES_PER_CHUNK = 12_000


@dataclass(frozen=True, slots=True)
class Corpus:
    vectors: Matrix
    texts: list[str]
    terms: list[str]
    """Per chunk, four of its words outside the 50 most frequent: a query's text."""
    groups_of_document: list[frozenset[str]]

    def permitted(self, group: str) -> npt.NDArray[np.bool_]:
        """Which chunks a member of ``group`` may see (documents are contiguous)."""
        per_document = np.array([group in g for g in self.groups_of_document])
        return np.repeat(per_document, CHUNKS_PER_DOCUMENT)


def _unit(rows: Matrix) -> Matrix:
    normalised: Matrix = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return normalised


def synthesise(size: int, rng: np.random.Generator) -> Corpus:
    centroids = _unit(rng.standard_normal((CENTROIDS, DIMENSIONS), dtype=np.float32))
    around = centroids[rng.integers(0, CENTROIDS, size)]
    vectors = _unit(around + 0.6 * rng.standard_normal((size, DIMENSIONS), dtype=np.float32))
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "dre", "pan", "zel", "or"]
    words = np.array(
        [
            "".join(syllables[(w // len(syllables) ** k) % len(syllables)] for k in range(4))
            for w in range(VOCABULARY)
        ]
    )
    picks = np.minimum(rng.zipf(1.2, (size, WORDS_PER_CHUNK)) - 1, VOCABULARY - 1)
    texts = [" ".join(row) for row in words[picks]]
    # As a query loses its stopwords, it loses the synthetic vocabulary's commonest words.
    terms = [" ".join(words[row[row >= COMMON]][:4]) for row in picks]
    documents = size // CHUNKS_PER_DOCUMENT
    draws = rng.random(documents)
    groups = [frozenset(g for g, share in SELECTIVITY.items() if u < share) for u in draws]
    return Corpus(vectors, texts, terms, groups)


async def fill(
    index: SqliteKnowledgeIndex,
    corpus: Corpus,
    *,
    tenant: str = TENANT,
    embedding: EmbeddingIdentity = IDENTITY,
) -> float:
    """Write ``corpus`` document by document; ``embedding`` names the model of its vectors."""
    started = time.perf_counter()
    for d, groups in enumerate(corpus.groups_of_document):
        access = AccessControl(
            tenant_id=tenant, users=frozenset({f"owner-{d % 97}"}), groups=groups
        )
        first = d * CHUNKS_PER_DOCUMENT
        chunks = [
            Chunk(
                chunk_id=f"c{first + i}",
                document_id=f"d{d}",
                source=f"synthetic/{d}.txt",
                title=f"Document {d}",
                text=corpus.texts[first + i],
                ordinal=i,
                access=access,
            )
            for i in range(CHUNKS_PER_DOCUMENT)
        ]
        await index.replace_document(
            f"d{d}",
            chunks,
            content_hash=f"h{d}",
            vectors=corpus.vectors[first : first + CHUNKS_PER_DOCUMENT].tolist(),
            embedding=embedding,
        )
        if d and d % 10_000 == 0:
            print(f"  {d * CHUNKS_PER_DOCUMENT} chunks indexed", file=sys.stderr)
    return time.perf_counter() - started


async def measure(
    index: SqliteKnowledgeIndex,
    corpus: Corpus,
    group: str,
    queries: int,
    rng: np.random.Generator,
) -> dict[str, object]:
    allowed = corpus.permitted(group)
    allowed_ids = np.flatnonzero(allowed)
    access = AccessFilter(tenant_id=TENANT, user_id="reader", groups=frozenset({group}))
    targets = rng.choice(allowed_ids, WARMUP + queries)
    noise = 0.3 * rng.standard_normal((len(targets), DIMENSIONS), dtype=np.float32)
    query_vectors = _unit(corpus.vectors[targets] + noise)
    query_texts = [corpus.terms[t] for t in targets]
    permitted_vectors = corpus.vectors[allowed_ids]

    figures: dict[str, object] = {"permitted_share": round(float(allowed.mean()), 4)}
    leaked = 0
    for mode in (SearchMode.HYBRID, SearchMode.VECTOR, SearchMode.TEXT):
        timings: list[float] = []
        recalls: list[float] = []
        for q in range(len(targets)):
            request = SearchRequest(
                text=query_texts[q],
                top_k=TOP_K,
                mode=mode,
                vector=None if mode is SearchMode.TEXT else tuple(query_vectors[q].tolist()),
                embedding=None if mode is SearchMode.TEXT else IDENTITY,
            )
            started = time.perf_counter()
            hits = await index.search(request, access)
            elapsed = (time.perf_counter() - started) * 1000
            if q < WARMUP:
                continue
            timings.append(elapsed)
            found = [int(p.chunk.chunk_id[1:]) for p in hits.passages]
            leaked += int((~allowed[found]).sum()) if found else 0
            if mode is SearchMode.VECTOR:
                scores = permitted_vectors @ query_vectors[q]
                exact = allowed_ids[np.argsort(-scores)[:TOP_K]]
                recalls.append(len(set(found) & set(exact.tolist())) / len(exact))
        ordered = sorted(timings)
        figures[mode.value] = {
            "p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(percentile(ordered, 95), 2),
        }
        if recalls:
            figures["vector_recall@10"] = round(statistics.fmean(recalls), 4)
    figures["hits_outside_filter"] = leaked
    return figures


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


async def run(sizes: list[int], queries: int, seed: int) -> dict[str, object]:
    results: dict[str, object] = {}
    for size in sizes:
        need, have = size * BYTES_PER_CHUNK, _available_bytes()
        if need > have:
            reason = f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
            print(f"{size} chunks: skipped ({reason})")
            results[str(size)] = {"skipped": reason}
            continue
        rng = np.random.default_rng(seed)
        corpus = synthesise(size, rng)
        workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-latency-"))
        index = SqliteKnowledgeIndex(workdir / "knowledge.db")
        await index.open()
        try:
            fill_s = await fill(index, corpus)
            by_filter: dict[str, object] = {"fill_s": round(fill_s, 1)}
            for group in SELECTIVITY:
                by_filter[group] = await measure(index, corpus, group, queries, rng)
                print(f"{size:>8} chunks, {group}: {by_filter[group]}")
            results[str(size)] = by_filter
        finally:
            await index.close()
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Security-trimmed retrieval latency and recall")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200, help="per size, filter and mode")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = asyncio.run(run(sizes, args.queries, args.seed))
    result = {
        "benchmark": "security-trimmed search, synthetic chunks, SqliteKnowledgeIndex",
        "top_k": TOP_K,
        "queries": args.queries,
        "sizes": results,
        **machine(),
    }
    default = args.sizes == parser.get_default("sizes")
    path = write_result("retrieval_latency" + ("" if default else f"-{args.sizes}"), result)
    print(f"cores {result['cores']}, load {result['load_average']}. Wrote {path}")


if __name__ == "__main__":
    main()
