"""How hybrid search should fuse BM25 and vectors: an offline study on the corpus of
``bench.retrieval_quality`` (known-item search over Debian's manual pages).

Searching is cheap; embedding is not. So the script collects, once, each query's ranked
chunk lists with their scores (``--depth`` chunks each): BM25 from FTS5's ``bm25()``
over the same ``SqliteKnowledgeIndex`` the quality benchmark builds (for a few column
weightings of text, title and heading), and cosine similarity against the cached vectors
(an exact product, as the index computes). The lists are kept under
``bench/results/retrieval_quality_cache/``. Fusion variants are then scored in numpy:

- ``rrf``: weighted Reciprocal Rank Fusion, ``w_t/(k + rank_t) + w_v/(k + rank_v)``;
- ``minmax``: ``alpha * v + (1 - alpha) * t`` of each list's scores scaled to [0, 1]
  over the list (a chunk missing from a list scores 0 there);
- ``zscore``: the same over standardised scores (missing: the list's lowest);
- ``dbsf``: distribution-based score fusion, scores scaled over mean ± 3 sd, clipped;
- ``minmax@50``, ``zscore@50``: statistics from each list's best 50 only;
- ``product``: the index's own score fusion (``knowledge.backends.fusion``).

To keep parameters honest, queries are split in two by a hash of the page name: every
parameter is chosen on the *tune* half and reported on the *held-out* half (and on all
queries). Fusion depth is that of the product for ``top_k = 5`` (50 chunks per list)
unless ``--fusion-depth`` says otherwise. Metrics are those of the quality benchmark,
per page (a page ranks by its best chunk): nDCG@10, recall@10, recall@100.

Two ceilings close the report: nDCG@10 when every query, knowing its answer, takes the
better of the two lists, or the best vector share of the product's fusion for it. No
score fusion with one vector share for every query can beat the second.

    .venv/bin/python -m bench.retrieval_fusion [--pages 2000] [--max-words 1000] \
        [--corpus debian|installed]

Writes bench/results/retrieval_fusion.json (``retrieval_fusion-installed.json`` for
``--corpus installed``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.knowledge_support import LocalEmbedder, VectorCache, machine, write_result
from bench.retrieval_quality import (
    CACHE,
    add_corpus_argument,
    chunks_of,
    embed_all,
    index_pages,
    load_pages,
    result_name,
)
from knowledge.backends.fusion import score_fusion
from knowledge.backends.sqlite import SqliteKnowledgeIndex, to_match_expression
from knowledge.ingestion.pipeline import embedding_text
from knowledge.settings import KnowledgeSettings

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

# (text, title, section) weights of FTS5's bm25(); the first is the product's.
COLUMN_WEIGHTS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.5, 0.5),
    (1.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    (1.0, 2.0, 0.5),
)
_BM25_SQL = """
SELECT rowid, bm25(chunks_fts, {weights}, 0.0) AS rank FROM chunks_fts
WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?
"""


@dataclass(frozen=True, slots=True)
class Lists:
    """Per query, the best ``depth`` chunk positions of each mode (``-1`` pads) and scores."""

    names: list[str]
    target: Ints
    """The relevant page of each query, as a page number."""
    chunk_page: Ints
    """Page number of each chunk position."""
    vector_rows: Ints
    vector_scores: Floats
    text_rows: dict[str, Ints]
    """By column weighting (``"1.0,0.5,0.5"``)."""
    text_scores: dict[str, Floats]


def _weights_key(weights: Iterable[float]) -> str:
    return ",".join(f"{w:g}" for w in weights)


async def collect(args: argparse.Namespace) -> Lists:
    path = CACHE / f"fusion-lists-{args.corpus}-{args.pages}-{args.max_words}-{args.depth}.npz"
    if path.exists():
        with np.load(path) as stored:
            keys = [str(k) for k in stored["weight_keys"]]
            return Lists(
                [str(n) for n in stored["names"]],
                stored["target"],
                stored["chunk_page"],
                stored["vector_rows"],
                stored["vector_scores"],
                {k: stored[f"text_rows_{i}"] for i, k in enumerate(keys)},
                {k: stored[f"text_scores_{i}"] for i, k in enumerate(keys)},
            )
    settings = KnowledgeSettings()
    pages = load_pages(args.pages, args.seed, args.corpus)
    chunks = {page.name: chunks_of(page, settings, args.max_words) for page in pages}
    all_chunks = [c for page_chunks in chunks.values() for c in page_chunks]
    queries = [page.summary for page in pages]
    embedder = LocalEmbedder()
    cache = VectorCache(CACHE / "vectors.npz", embedder.identity)
    await embed_all(embedder, cache, [embedding_text(c) for c in all_chunks] + queries)
    number = {page.name: n for n, page in enumerate(pages)}
    position = {c.chunk_id: i for i, c in enumerate(all_chunks)}
    chunk_page = np.asarray([number[c.document_id] for c in all_chunks], dtype=np.int64)

    matrix = cache.matrix([embedding_text(c) for c in all_chunks])
    query_matrix = cache.matrix(queries)
    depth = args.depth
    vector_rows = np.zeros((len(pages), depth), dtype=np.int64)
    vector_scores = np.zeros((len(pages), depth), dtype=np.float64)
    for start in range(0, len(pages), 256):
        scores = query_matrix[start : start + 256] @ matrix.T
        best = np.argpartition(-scores, depth, axis=1)[:, :depth]
        picked = np.take_along_axis(scores, best, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        vector_rows[start : start + 256] = np.take_along_axis(best, order, axis=1)
        vector_scores[start : start + 256] = np.take_along_axis(picked, order, axis=1)

    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-fusion-"))
    index = SqliteKnowledgeIndex(workdir / "knowledge.db")
    await index.open()
    text_rows: dict[str, Ints] = {}
    text_scores: dict[str, Floats] = {}
    try:
        await index_pages(index, chunks, cache, embedder)
        await index.close()
        db = sqlite3.connect(workdir / "knowledge.db")
        by_row = {
            int(r): position[str(c)] for r, c in db.execute("SELECT id, chunk_id FROM chunks")
        }
        for weights in COLUMN_WEIGHTS:
            key = _weights_key(weights)
            rows = np.full((len(pages), depth), -1, dtype=np.int64)
            values = np.zeros((len(pages), depth), dtype=np.float64)
            sql = _BM25_SQL.format(weights=key)
            for n, query in enumerate(queries):
                expression = to_match_expression(query)
                if expression is None:
                    continue
                found = db.execute(sql, ("{text title section} : (" + expression + ")", depth))
                for i, (row, rank) in enumerate(found):
                    rows[n, i] = by_row[int(row)]
                    values[n, i] = -float(rank)
            text_rows[key], text_scores[key] = rows, values
            print(f"  BM25 {key}: done", file=sys.stderr)
        db.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keys = list(text_rows)
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "names": np.asarray([p.name for p in pages]),
        "target": np.arange(len(pages), dtype=np.int64),
        "chunk_page": chunk_page,
        "vector_rows": vector_rows,
        "vector_scores": vector_scores,
        "weight_keys": np.asarray(keys),
    }
    for i, k in enumerate(keys):
        arrays[f"text_rows_{i}"] = text_rows[k]
        arrays[f"text_scores_{i}"] = text_scores[k]
    np.savez(path, allow_pickle=False, **arrays)
    return Lists(
        [p.name for p in pages],
        np.arange(len(pages), dtype=np.int64),
        chunk_page,
        vector_rows,
        vector_scores,
        text_rows,
        text_scores,
    )


@dataclass(frozen=True, slots=True)
class Candidates:
    """One query's union of both lists: 1-based ranks (0: absent) and scores (nan: absent)."""

    rows: Ints
    text_rank: Ints
    text_score: Floats
    vector_rank: Ints
    vector_score: Floats


def candidates(lists: Lists, weights: str, depth: int) -> list[Candidates]:
    found: list[Candidates] = []
    t_rows_all, t_scores_all = lists.text_rows[weights], lists.text_scores[weights]
    for q in range(len(lists.names)):
        t_rows = t_rows_all[q, :depth]
        keep = t_rows >= 0
        t_rows, t_scores = t_rows[keep], t_scores_all[q, :depth][keep]
        v_rows, v_scores = lists.vector_rows[q, :depth], lists.vector_scores[q, :depth]
        rows = np.union1d(t_rows, v_rows)
        text_rank = np.zeros(rows.size, dtype=np.int64)
        text_score = np.full(rows.size, np.nan)
        at = np.searchsorted(rows, t_rows)
        text_rank[at] = np.arange(1, t_rows.size + 1)
        text_score[at] = t_scores
        vector_rank = np.zeros(rows.size, dtype=np.int64)
        vector_score = np.full(rows.size, np.nan)
        at = np.searchsorted(rows, v_rows)
        vector_rank[at] = np.arange(1, v_rows.size + 1)
        vector_score[at] = v_scores
        found.append(Candidates(rows, text_rank, text_score, vector_rank, vector_score))
    return found


Fusion = Callable[[Candidates], Floats]


def rrf(k: float, text_weight: float = 1.0, vector_weight: float = 1.0) -> Fusion:
    def fuse(c: Candidates) -> Floats:
        t = np.where(c.text_rank > 0, text_weight / (k + c.text_rank), 0.0)
        v = np.where(c.vector_rank > 0, vector_weight / (k + c.vector_rank), 0.0)
        return np.asarray(t + v, dtype=np.float64)

    return fuse


def _minmax(scores: Floats) -> Floats:
    present = scores[~np.isnan(scores)]
    if present.size == 0:
        return np.zeros_like(scores)
    low, high = float(present.min()), float(present.max())
    scaled = (scores - low) / (high - low) if high > low else np.ones_like(scores)
    return np.nan_to_num(scaled, nan=0.0)


def _zscore(scores: Floats) -> Floats:
    present = scores[~np.isnan(scores)]
    if present.size < 2:
        return np.nan_to_num(np.zeros_like(scores), nan=0.0)
    z = (scores - present.mean()) / (float(present.std()) or 1.0)
    return np.asarray(np.nan_to_num(z, nan=float(np.nanmin(z))), dtype=np.float64)


def _dbsf(scores: Floats) -> Floats:
    present = scores[~np.isnan(scores)]
    if present.size < 2:
        return np.nan_to_num(np.ones_like(scores), nan=0.0)
    mean, sd = float(present.mean()), float(present.std()) or 1.0
    scaled = np.clip((scores - (mean - 3 * sd)) / (6 * sd), 0.0, 1.0)
    return np.nan_to_num(scaled, nan=0.0)


def windowed(kind: str, window: int) -> Callable[[Floats], Floats]:
    """Min-max or z-score scaling whose statistics come from the list's best ``window``
    scores only, so that they do not move with the fusion depth; a chunk missing from
    the list scores as its lowest."""

    def scaled(scores: Floats) -> Floats:
        present = scores[~np.isnan(scores)]
        if present.size == 0:
            return np.zeros_like(scores)
        top = np.sort(present)[::-1][:window]
        if kind == "minmax":
            spread = float(top.max() - top.min())
            mapped = (scores - top.min()) / spread if spread > 0 else scores - top.max() + 1.0
        else:
            mapped = (scores - top.mean()) / (float(top.std()) or 1.0)
        return np.asarray(np.nan_to_num(mapped, nan=float(np.nanmin(mapped))), dtype=np.float64)

    return scaled


def convex(normalise: Callable[[Floats], Floats], alpha: float) -> Fusion:
    def fuse(c: Candidates) -> Floats:
        return alpha * normalise(c.vector_score) + (1 - alpha) * normalise(c.text_score)

    return fuse


def product(vector_share: float, depth: int) -> Fusion:
    """The index's own ``score`` fusion (``knowledge.backends.fusion``) on these lists."""

    def listed(ranks: Ints, scores: Floats, rows: Ints) -> list[tuple[int, float]]:
        present = np.flatnonzero(ranks > 0)
        present = present[np.argsort(ranks[present])]
        return [(int(rows[i]), float(scores[i])) for i in present]

    def fuse(c: Candidates) -> Floats:
        text = listed(c.text_rank, c.text_score, c.rows)
        vector = listed(c.vector_rank, c.vector_score, c.rows)
        fused = dict(score_fusion(text, vector, vector_share, text_complete=len(text) < depth))
        return np.asarray([fused[int(r)] for r in c.rows], dtype=np.float64)

    return fuse


def single(mode: str) -> Fusion:
    def fuse(c: Candidates) -> Floats:
        ranks = c.text_rank if mode == "text" else c.vector_rank
        return np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), -1.0)

    return fuse


def page_ranks(
    lists: Lists, cands: Sequence[Candidates], fusion: Fusion, *, single_mode: bool = False
) -> Ints:
    """Per query, the 1-based rank of its page among pages (0: not in the first 100).
    A page scores its best chunk; ties count against the target (pessimistic)."""
    ranks = np.zeros(len(cands), dtype=np.int64)
    for q, c in enumerate(cands):
        scores = fusion(c)
        # Candidates a fusion scores at all; a single mode's (see single) score above 0.
        valid = scores > 0 if single_mode else (c.text_rank > 0) | (c.vector_rank > 0)
        pages = lists.chunk_page[c.rows]
        mine = valid & (pages == lists.target[q])
        if not mine.any():
            continue
        best = scores[mine].max()
        ahead = np.unique(pages[valid & (scores >= best) & (pages != lists.target[q])]).size
        if ahead < 100:
            ranks[q] = ahead + 1
    return ranks


def metrics(ranks: Ints) -> dict[str, float]:
    n = max(ranks.size, 1)
    hit10 = (ranks > 0) & (ranks <= 10)
    ndcg = float(np.sum(1.0 / np.log2(ranks[hit10] + 1.0))) / n
    return {
        "ndcg@10": round(ndcg, 4),
        "recall@10": round(float(hit10.sum()) / n, 4),
        "recall@100": round(float((ranks > 0).sum()) / n, 4),
    }


def split(names: Sequence[str]) -> tuple[Ints, Ints]:
    """Tune and held-out query numbers: by the parity of the page name's SHA-256."""
    parity = np.asarray([hashlib.sha256(n.encode()).digest()[0] % 2 for n in names])
    return np.flatnonzero(parity == 0), np.flatnonzero(parity == 1)


@dataclass(frozen=True, slots=True)
class Variant:
    family: str
    params: dict[str, float | str]
    fusion: Fusion
    weights: str
    depth: int


def _grid(depth: int, weights: str) -> list[Variant]:
    variants: list[Variant] = []
    for k, wv in itertools.product((1, 5, 10, 20, 30, 60, 100), (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)):
        params: dict[str, float | str] = {"k": k, "vector_weight": wv}
        variants.append(Variant("rrf", params, rrf(k, 1.0, wv), weights, depth))
    alphas = [round(float(a), 2) for a in np.arange(0.3, 0.96, 0.05)]
    normalisers: list[tuple[str, Callable[[Floats], Floats]]] = [
        ("minmax", _minmax),
        ("zscore", _zscore),
        ("dbsf", _dbsf),
    ]
    if depth > 50:
        normalisers += [
            ("minmax@50", windowed("minmax", 50)),
            ("zscore@50", windowed("zscore", 50)),
        ]
    for alpha in alphas:
        variants.append(Variant("product", {"alpha": alpha}, product(alpha, depth), weights, depth))
    for family, normalise in normalisers:
        for alpha in alphas:
            variants.append(
                Variant(family, {"alpha": alpha}, convex(normalise, alpha), weights, depth)
            )
    return variants


def study(lists: Lists, fusion_depths: Sequence[int]) -> dict[str, object]:
    tune, held = split(lists.names)
    print(f"{len(tune)} tune queries, {len(held)} held-out", file=sys.stderr)
    cache: dict[tuple[str, int], list[Candidates]] = {}

    def evaluate(variant: Variant) -> dict[str, dict[str, float]]:
        key = (variant.weights, variant.depth)
        if key not in cache:
            cache[key] = candidates(lists, *key)
        ranks = page_ranks(
            lists, cache[key], variant.fusion, single_mode=variant.family in ("text", "vector")
        )
        return {
            "tune": metrics(ranks[tune]),
            "held_out": metrics(ranks[held]),
            "all": metrics(ranks),
        }

    base_weights = _weights_key(COLUMN_WEIGHTS[0])
    rows: list[dict[str, object]] = []

    def record(label: str, variant: Variant) -> dict[str, dict[str, float]]:
        figures = evaluate(variant)
        rows.append(
            {
                "label": label,
                "family": variant.family,
                "params": variant.params,
                "bm25_weights": variant.weights,
                "depth": variant.depth,
                **figures,
            }
        )
        return figures

    deep = max(fusion_depths)
    reference = {
        mode: record(mode, Variant(mode, {}, single(mode), base_weights, deep))
        for mode in ("text", "vector")
    }
    for weights in (_weights_key(w) for w in COLUMN_WEIGHTS[1:]):
        record(f"text bm25({weights})", Variant("text", {}, single("text"), weights, deep))
    chosen: list[dict[str, object]] = []
    for depth in fusion_depths:
        baseline = record(
            f"rrf k=60 depth {depth}", Variant("rrf", {"k": 60}, rrf(60), base_weights, depth)
        )
        families: dict[str, list[tuple[Variant, dict[str, dict[str, float]]]]] = {}
        for variant in _grid(depth, base_weights):
            families.setdefault(variant.family, []).append((variant, evaluate(variant)))
        for family, results in families.items():
            best_variant, best = max(results, key=lambda r: r[1]["tune"]["ndcg@10"])
            label = f"{family} {best_variant.params} depth {depth} (tuned)"
            rows.append(
                {
                    "label": label,
                    "family": family,
                    "params": best_variant.params,
                    "bm25_weights": base_weights,
                    "depth": depth,
                    **best,
                }
            )
            chosen.append(
                {
                    "family": family,
                    "depth": depth,
                    "params": best_variant.params,
                    "sensitivity_held_out": [
                        {"params": v.params, "ndcg@10": r["held_out"]["ndcg@10"]}
                        for v, r in results
                    ],
                }
            )
        print(
            f"  depth {depth}: baseline held-out {baseline['held_out']['ndcg@10']}", file=sys.stderr
        )
    # The tuned families again over other BM25 column weightings.
    for weights in (_weights_key(w) for w in COLUMN_WEIGHTS[1:]):
        for choice in chosen:
            if choice["depth"] != fusion_depths[0]:
                continue
            params = choice["params"]
            assert isinstance(params, dict)
            fusion = _fusion_of(str(choice["family"]), params, fusion_depths[0])
            record(
                f"{choice['family']} {params} bm25({weights})",
                Variant(str(choice["family"]), params, fusion, weights, fusion_depths[0]),
            )
    ceilings = oracle_ceilings(
        lists,
        cache_candidates(cache, lists, base_weights, fusion_depths[0]),
        fusion_depths[0],
    )
    return {
        "rows": rows,
        "chosen": chosen,
        "ceilings": ceilings,
        "best_single_held_out": max(r["held_out"]["ndcg@10"] for r in reference.values()),
        "best_single_all": max(r["all"]["ndcg@10"] for r in reference.values()),
    }


def cache_candidates(
    cache: dict[tuple[str, int], list[Candidates]], lists: Lists, weights: str, depth: int
) -> list[Candidates]:
    if (weights, depth) not in cache:
        cache[weights, depth] = candidates(lists, weights, depth)
    return cache[weights, depth]


ORACLE_SHARES = tuple(round(0.05 * i, 2) for i in range(21))


def oracle_ceilings(lists: Lists, cands: Sequence[Candidates], depth: int) -> dict[str, float]:
    """How far fusing these two lists *could* go: nDCG@10 when each query, knowing its
    answer, picks the better of the two lists, or the best vector share of the product's
    score fusion (0, text alone, to 1, vector alone, in steps of 0.05). No score fusion
    with one vector share for all queries can beat the second figure. ``depth`` is the
    depth ``cands`` were fused at: the product takes a shorter text list as complete."""

    def gains(ranks: Ints) -> Floats:
        hit = (ranks > 0) & (ranks <= 10)
        return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)

    text = gains(page_ranks(lists, cands, single("text"), single_mode=True))
    vector = gains(page_ranks(lists, cands, single("vector"), single_mode=True))
    per_share = np.stack(
        [gains(page_ranks(lists, cands, product(share, depth))) for share in ORACLE_SHARES]
    )
    best_share = per_share.max(axis=0)
    return {
        "better_list_per_query": round(float(np.maximum(text, vector).mean()), 4),
        "best_share_per_query": round(
            float(np.maximum(best_share, np.maximum(text, vector)).mean()), 4
        ),
        "vector": round(float(vector.mean()), 4),
    }


def _fusion_of(family: str, params: dict[str, float | str], depth: int) -> Fusion:
    if family == "product":
        return product(float(params["alpha"]), depth)
    if family == "rrf":
        return rrf(float(params["k"]), 1.0, float(params.get("vector_weight", 1.0)))
    normalise = {
        "minmax": _minmax,
        "zscore": _zscore,
        "dbsf": _dbsf,
        "minmax@50": windowed("minmax", 50),
        "zscore@50": windowed("zscore", 50),
    }[family]
    return convex(normalise, float(params["alpha"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--max-words", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=9)
    add_corpus_argument(parser)
    parser.add_argument("--depth", type=int, default=300, help="chunks collected per list")
    parser.add_argument("--fusion-depth", default="50,300", help="chunks fused per list")
    args = parser.parse_args()
    lists = asyncio.run(collect(args))
    depths = [min(int(d), args.depth) for d in args.fusion_depth.split(",")]
    result = study(lists, depths)
    rows = result["rows"]
    assert isinstance(rows, list)
    print(f"{'variant':<58} {'held nDCG':>9} {'all nDCG':>8} {'R@10':>6} {'R@100':>6} {'tune':>6}")
    for row in rows:
        held, every, tune = row["held_out"], row["all"], row["tune"]
        print(
            f"{str(row['label'])[:58]:<58} {held['ndcg@10']:>9.4f} {every['ndcg@10']:>8.4f}"
            f" {every['recall@10']:>6.3f} {every['recall@100']:>6.3f} {tune['ndcg@10']:>6.4f}"
        )
    path = write_result(
        result_name("retrieval_fusion", args.corpus),
        {"corpus": args.corpus, "pages": len(lists.names), **result, **machine()},
    )
    ceilings = result["ceilings"]
    assert isinstance(ceilings, dict)
    print(
        "ceilings (each query picks with its answer known): better list"
        f" {ceilings['better_list_per_query']}, best vector share"
        f" {ceilings['best_share_per_query']} (vector alone {ceilings['vector']})"
    )
    print(
        f"best single mode: held-out {result['best_single_held_out']},"
        f" all {result['best_single_all']}. Wrote {path}"
    )


if __name__ == "__main__":
    main()
