"""Retrieval quality of the knowledge index: known-item search over Debian's manual pages.

Each query is the one-line summary of a page's NAME section ("list directory contents"
for ls(1)); its one relevant document is that page, indexed *without* its NAME section,
so the query's wording is never copied verbatim from the target. Pages come from
``/usr/share/man/man[1-8]`` (English): a seeded sample of regular files (no links, no
``.so`` stubs) whose summary has at least three words and belongs to no other page of
the sample. By default (``--corpus debian``) only pages of packages that Debian's
archive carries count (dpkg names a page's package, ``apt-cache policy`` its origin): a
vendor's repository can install far more pages than Debian (google-cloud-cli alone ships
some 16,000 generated, near-identical command pages), which would make the sample mostly
one vendor's reference; ``--corpus installed`` takes every installed page. Pages are
rendered with ``man -P cat -l``, cut into sections at their headings, chunked and
embedded as ingestion does (``KnowledgeSettings`` defaults; each chunk's vector is of
its title, heading and text); a page contributes at most ``--max-words`` words, which
bounds the embedding time.

Everything goes through the knowledge contracts: the real ``SqliteKnowledgeIndex``,
vectors from the local model (all-MiniLM-L6-v2 int8) via ``replace_document``, and
``search(SearchRequest(mode=...))`` for text (BM25), vector and hybrid (fused as
``--fusion`` says; by default as ``KnowledgeSettings`` says). Scores
are per document: a page's best chunk ranks the page. Reported per mode: nDCG@10
(one relevant page: 1/log2(rank + 1) within the first ten), recall@10 and recall@100.

The script installs nothing. It needs the manual pages and man-db:

    apt-get install -y manpages manpages-dev man-db

(and no ``path-exclude=/usr/share/man/*`` in ``/etc/dpkg/dpkg.cfg.d/``, which slim
images use to strip them). Rendered pages and vectors are cached under
``bench/results/retrieval_quality_cache/``: a rerun embeds nothing.

    .venv/bin/python -m bench.retrieval_quality [--pages 2000] [--max-words 1000] \
        [--corpus debian|installed] [--fusion score|rrf] [--vector-share 0.6]

Writes bench/results/retrieval_quality.json (``retrieval_quality-installed.json`` for
``--corpus installed``).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from bench.knowledge_support import RESULTS, LocalEmbedder, VectorCache, machine, write_result
from knowledge.backends.fusion import HybridFusion
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import AccessControl, AccessFilter, Chunk, SearchMode, SearchRequest
from knowledge.ingestion.chunking import chunk_sections
from knowledge.ingestion.parsers import ParsedSection
from knowledge.ingestion.pipeline import embedding_text
from knowledge.settings import KnowledgeSettings

MAN_ROOT = Path("/usr/share/man")
CACHE = RESULTS / "retrieval_quality_cache"
TENANT = "bench"
SEARCH_CHUNKS = 300  # chunks fetched per query, so that 100 distinct pages remain
EMBED_BATCH = 256  # texts per cache save
INSTALL = "apt-get install -y manpages manpages-dev man-db"

_OVERSTRIKE = re.compile(".\b")
_HEADING = re.compile(r"^\S")


@dataclass(frozen=True, slots=True)
class ManPage:
    name: str
    """``ls.1``: the file name without compression suffix."""
    summary: str
    """The NAME section's text after the dash: the query."""
    sections: tuple[tuple[str, str], ...]
    """(heading, text) of every section but NAME, in order."""

    @property
    def title(self) -> str:
        """``ls(1)``, as the page's header names it."""
        stem, _, section = self.name.rpartition(".")
        return f"{stem}({section})"


Corpus = Literal["debian", "installed"]
"""Which pages: those Debian's archive ships, or every installed page."""


def _debian_pages() -> set[str]:
    """Paths of the installed pages whose package Debian's archive carries: dpkg says
    which package installed a file, ``apt-cache policy`` where the package comes from.
    Pages of packages from elsewhere (a vendor's repository, a local build) are left
    out: one vendor's generated command reference (google-cloud-cli ships some 16,000
    near-identical pages) would otherwise be most of the sample."""
    owner: dict[str, str] = {}
    for listing in Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            if line.startswith(f"{MAN_ROOT}/man"):
                owner[line] = package
    packages = sorted(set(owner.values()))
    policy = subprocess.run(
        ["apt-cache", "policy", *packages], capture_output=True, text=True, check=False
    ).stdout
    debian: set[str] = set()
    current = ""
    for line in policy.splitlines():
        # "libc6:" (or "libc6:i386:") opens a package; its version table follows,
        # indented. A package counts when any version apt knows comes from Debian's
        # archive: the installed one is often superseded there by a point release.
        if not line.startswith(" "):
            current = line.rstrip(":").split(":")[0]
        elif ".debian.org/" in line:
            debian.add(current)
    if not debian:
        sys.exit(
            "apt knows no package from Debian's archive: run apt-get update, or pass"
            " --corpus installed"
        )
    return {path for path, package in owner.items() if package in debian}


def _candidates(corpus: Corpus) -> list[Path]:
    """Regular page files of the English sections; links and ``.so`` stubs are aliases."""
    allowed = _debian_pages() if corpus == "debian" else None
    found: list[Path] = []
    for directory in sorted(MAN_ROOT.glob("man[1-8]")):
        for path in sorted(directory.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            if allowed is not None and str(path) not in allowed:
                continue
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as handle:
                if handle.read(4) == b".so ":
                    continue
            found.append(path)
    return found


def _render(path: Path) -> ManPage | None:
    """The page as text, split at its headings; ``None`` when it has no usable NAME."""
    env = {**os.environ, "MANWIDTH": "120", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    done = subprocess.run(
        ["man", "-P", "cat", "-l", str(path)], env=env, capture_output=True, timeout=60
    )
    if done.returncode != 0:
        return None
    lines = _OVERSTRIKE.sub("", done.stdout.decode("utf-8", "replace")).splitlines()[1:-1]
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if _HEADING.match(line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line.strip())
    texts = [(heading, "\n".join(body).strip()) for heading, body in sections]
    names = [text for heading, text in texts if heading == "NAME"]
    if len(names) != 1:
        return None
    _names, dash, summary = " ".join(names[0].split()).partition(" - ")
    if not dash or len(summary.split()) < 3:
        return None
    rest = tuple((h, t) for h, t in texts if h != "NAME" and t)
    if sum(len(t.split()) for _, t in rest) < 30:
        return None
    return ManPage(path.name.removesuffix(".gz"), summary.strip(), rest)


def load_pages(count: int, seed: int, corpus: Corpus = "debian") -> list[ManPage]:
    """``count`` pages with distinct summaries, rendered once and cached (a smaller
    ``count`` takes the first pages of a larger cached sample)."""
    cache = CACHE / f"pages-{corpus}-{seed}.json"
    if cache.exists():
        raw = json.loads(cache.read_text())
        if len(raw) >= count:
            return [
                ManPage(p["name"], p["summary"], tuple(map(tuple, p["sections"])))
                for p in raw[:count]
            ]
    candidates = _candidates(corpus)
    random.Random(seed).shuffle(candidates)
    rendered: list[ManPage] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        # Over-render, since duplicate summaries are dropped afterwards.
        for start in range(0, len(candidates), 500):
            batch = candidates[start : start + 500]
            rendered.extend(page for page in pool.map(_render, batch) if page is not None)
            if len(_distinct(rendered)) >= count:
                break
            print(f"  rendered {len(rendered)} pages", file=sys.stderr)
    pages = _distinct(rendered)[:count]
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([asdict(p) for p in pages]))
    return pages


def _distinct(pages: Sequence[ManPage]) -> list[ManPage]:
    """Pages whose summary no other page shares: a shared summary has no single answer."""
    counts: dict[str, int] = {}
    for page in pages:
        counts[page.summary.lower()] = counts.get(page.summary.lower(), 0) + 1
    return [p for p in pages if counts[p.summary.lower()] == 1]


def result_name(benchmark: str, corpus: Corpus) -> str:
    """The result file's name: ``benchmark`` for Debian's pages, suffixed otherwise, so a
    run over every installed page never overwrites the figures the docs cite."""
    return benchmark if corpus == "debian" else f"{benchmark}-{corpus}"


def add_corpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        choices=("debian", "installed"),
        default="debian",
        help="pages of packages from Debian's archive (default), or every installed page",
    )


def chunks_of(page: ManPage, settings: KnowledgeSettings, max_words: int) -> list[Chunk]:
    sections: list[ParsedSection] = []
    budget = max_words
    for heading, text in page.sections:
        words = text.split()
        if budget <= 0:
            break
        if len(words) > budget:
            text = " ".join(words[:budget])
        budget -= len(words)
        sections.append(ParsedSection(text=text, heading=heading.title()))
    pieces = chunk_sections(
        sections, chunk_words=settings.chunk_tokens, overlap_words=settings.chunk_overlap
    )
    access = AccessControl(tenant_id=TENANT, public=True)
    return [
        Chunk(
            chunk_id=f"{page.name}-{ordinal:05d}",
            document_id=page.name,
            source=f"man/{page.name}",
            title=page.title,
            text=piece.text,
            ordinal=ordinal,
            access=access,
            section=piece.section,
        )
        for ordinal, piece in enumerate(pieces)
    ]


async def embed_all(embedder: LocalEmbedder, cache: VectorCache, texts: Sequence[str]) -> None:
    missing = cache.missing(texts)
    if not missing:
        return
    await embedder.load()
    started = time.perf_counter()
    for start in range(0, len(missing), EMBED_BATCH):
        batch = missing[start : start + EMBED_BATCH]
        cache.add(batch, await embedder.embed(batch, tenant_id=TENANT))
        cache.save()
        done = start + len(batch)
        rate = done / (time.perf_counter() - started)
        print(f"  embedded {done}/{len(missing)} ({rate:.0f}/s)", file=sys.stderr)


async def index_pages(
    index: SqliteKnowledgeIndex,
    chunks: dict[str, list[Chunk]],
    cache: VectorCache,
    embedder: LocalEmbedder,
) -> None:
    """Write each page as a document, with its chunks' cached vectors."""
    for name, page_chunks in chunks.items():
        vectors = cache.matrix([embedding_text(c) for c in page_chunks])
        digest = hashlib.sha256("\0".join(c.text for c in page_chunks).encode()).hexdigest()
        await index.replace_document(
            name,
            page_chunks,
            content_hash=digest,
            vectors=vectors.tolist(),
            embedding=embedder.identity,
        )


def _rank_of(target: str, passages_pages: Sequence[str]) -> int | None:
    """1-based rank of ``target`` among distinct pages in ranked order (first = best)."""
    seen: list[str] = []
    for page in passages_pages:
        if page not in seen:
            seen.append(page)
            if page == target:
                return len(seen)
            if len(seen) >= 100:
                return None
    return None


async def evaluate(args: argparse.Namespace) -> dict[str, object]:
    settings = KnowledgeSettings()
    pages = load_pages(args.pages, args.seed, args.corpus)
    chunks = {page.name: chunks_of(page, settings, args.max_words) for page in pages}
    all_chunks = [c for page_chunks in chunks.values() for c in page_chunks]
    queries = [page.summary for page in pages]
    print(f"{len(pages)} pages, {len(all_chunks)} chunks, {len(queries)} queries", file=sys.stderr)

    embedder = LocalEmbedder()
    cache = VectorCache(CACHE / "vectors.npz", embedder.identity)
    await embed_all(embedder, cache, [embedding_text(c) for c in all_chunks] + queries)

    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-quality-"))
    fusion = HybridFusion(args.fusion, args.vector_share)
    index = SqliteKnowledgeIndex(workdir / "knowledge.db", fusion=fusion)
    await index.open()
    try:
        started = time.perf_counter()
        await index_pages(index, chunks, cache, embedder)
        index_s = time.perf_counter() - started
        access = AccessFilter(tenant_id=TENANT, user_id="reader", groups=frozenset())
        query_vectors = cache.matrix(queries)
        modes: dict[str, dict[str, float]] = {}
        for mode in (SearchMode.TEXT, SearchMode.VECTOR, SearchMode.HYBRID):
            ranks: list[int | None] = []
            started = time.perf_counter()
            for page, vector in zip(pages, query_vectors, strict=True):
                hits = await index.search(
                    SearchRequest(
                        text=page.summary,
                        top_k=SEARCH_CHUNKS,
                        mode=mode,
                        vector=None if mode is SearchMode.TEXT else tuple(vector.tolist()),
                        embedding=None if mode is SearchMode.TEXT else embedder.identity,
                    ),
                    access,
                )
                # Hits come best first, so the first chunk of a page carries its best score.
                ranks.append(_rank_of(page.name, [p.chunk.document_id for p in hits.passages]))
            elapsed = time.perf_counter() - started
            modes[mode.value] = _metrics(ranks) | {
                "ms_per_query": round(elapsed / len(pages) * 1000, 2)
            }
            print(f"  {mode.value}: {modes[mode.value]}", file=sys.stderr)
    finally:
        await index.close()
        shutil.rmtree(workdir, ignore_errors=True)

    best_single = max(modes["text"]["ndcg@10"], modes["vector"]["ndcg@10"])
    gain = round(100 * (modes["hybrid"]["ndcg@10"] - best_single), 2)
    return {
        "benchmark": "known-item retrieval, Debian manual pages (NAME summary -> page)",
        "corpus": args.corpus,
        "pages": len(pages),
        "queries": len(queries),
        "chunks": len(all_chunks),
        "max_words_per_page": args.max_words,
        "chunk_words": settings.chunk_tokens,
        "chunk_overlap": settings.chunk_overlap,
        "embedding_model": embedder.identity.model,
        "fusion": fusion.method,
        "vector_share": fusion.vector_share if fusion.method == "score" else None,
        "index_build_s": round(index_s, 1),
        "modes": modes,
        "hybrid_gain_ndcg_points": gain,
        "hybrid_goal_met": gain >= 3.0,
        **machine(),
    }


def _metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    n = len(ranks)
    return {
        "ndcg@10": round(sum(1 / math.log2(r + 1) for r in ranks if r and r <= 10) / n, 4),
        "recall@10": round(sum(1 for r in ranks if r and r <= 10) / n, 4),
        "recall@100": round(sum(1 for r in ranks if r) / n, 4),
        "mrr": round(sum(1 / r for r in ranks if r) / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=2000, help="queries (one per page)")
    parser.add_argument("--max-words", type=int, default=1000, help="words indexed per page")
    parser.add_argument("--seed", type=int, default=9)
    add_corpus_argument(parser)
    defaults = KnowledgeSettings()
    parser.add_argument("--fusion", choices=("score", "rrf"), default=defaults.hybrid_fusion)
    parser.add_argument(
        "--vector-share", type=float, default=defaults.hybrid_vector_share, help="score fusion"
    )
    args = parser.parse_args()
    if shutil.which("man") is None or not any(MAN_ROOT.glob("man1/*")):
        raise SystemExit(f"needs Debian's manual pages and man-db: {INSTALL}")
    result = asyncio.run(evaluate(args))
    path = write_result(result_name("retrieval_quality", args.corpus), result)
    print(f"{'mode':<8} {'nDCG@10':>8} {'R@10':>6} {'R@100':>6} {'MRR':>6} {'ms/q':>6}")
    modes = result["modes"]
    assert isinstance(modes, dict)
    for mode, figures in modes.items():
        print(
            f"{mode:<8} {figures['ndcg@10']:>8.4f} {figures['recall@10']:>6.3f}"
            f" {figures['recall@100']:>6.3f} {figures['mrr']:>6.3f} {figures['ms_per_query']:>6.1f}"
        )
    print(
        f"{result['queries']} queries over {result['pages']} pages / {result['chunks']} chunks;"
        f" hybrid ({result['fusion']}) - best single mode:"
        f" {result['hybrid_gain_ndcg_points']:+.2f} nDCG points"
        f" (goal +3: {'met' if result['hybrid_goal_met'] else 'not met'});"
        f" cores {result['cores']}, load {result['load_average']}. Wrote {path}"
    )


if __name__ == "__main__":
    main()
