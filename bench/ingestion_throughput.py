"""Ingestion throughput: chunks per second through the real pipeline with the local model.

The bundled corpus (``samples/corpus``: Markdown, HTML, DOCX, PDF, text) is copied
``--copies`` times into a temporary folder (``copy-000/hr/...``, ...) with its ACL
rewritten to match every copy, then ingested by ``IngestionPipeline`` into a fresh
``SqliteKnowledgeIndex``, embedding with the local all-MiniLM-L6-v2 int8 model (loaded
before the clock starts): parse, chunk, embed, write, as ``lamina ingest`` does. The
figures are the wall time of ``ingest``, chunks and files per second, and the CPU
seconds the process spent per chunk (onnxruntime uses one thread per core).

    .venv/bin/python -m bench.ingestion_throughput [--copies 20] [--runs 3]

Each run starts from an empty index; the median run is reported. Writes
bench/results/ingestion_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.knowledge_support import LocalEmbedder, machine, write_result
from bench.processes import REPO
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.ingestion.pipeline import IngestionPipeline
from knowledge.settings import KnowledgeSettings

CORPUS = REPO / "samples" / "corpus"
ACL = "acl.yaml"


def scaled_corpus(root: Path, copies: int) -> None:
    """``copies`` copies of the sample corpus under ``root``, one ACL covering them all."""
    for n in range(copies):
        shutil.copytree(CORPUS, root / f"copy-{n:03d}", ignore=shutil.ignore_patterns(ACL))
    rules = (CORPUS / ACL).read_text()
    # The sample's globs are anchored at its root ("hr/**"); every copy sits one level down.
    (root / ACL).write_text(re.sub(r'match: "', 'match: "copy-*/', rules))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(embedder: LocalEmbedder, corpus: Path) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-ingest-"))
    index = SqliteKnowledgeIndex(workdir / "knowledge.db")
    await index.open()
    try:
        pipeline = IngestionPipeline(index, KnowledgeSettings(), embedder=embedder)
        cpu, started = _cpu_s(), time.perf_counter()
        report = await pipeline.ingest(corpus)
        wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
        if report.chunks_indexed == 0 or await index.count_chunks() != report.chunks_indexed:
            raise SystemExit(f"ingestion indexed nothing usable: {report}")
    finally:
        await index.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "files": report.files_indexed,
        "chunks": report.chunks_indexed,
        "wall_s": round(wall, 2),
        "chunks_per_s": round(report.chunks_indexed / wall, 1),
        "files_per_s": round(report.files_indexed / wall, 2),
        "cpu_ms_per_chunk": round(cpu / report.chunks_indexed * 1000, 1),
    }


async def run(copies: int, runs: int) -> list[dict[str, float]]:
    embedder = LocalEmbedder()
    await embedder.load()
    corpus = Path(tempfile.mkdtemp(prefix="lamina-bench-corpus-"))
    try:
        scaled_corpus(corpus, copies)
        results = []
        for n in range(runs):
            results.append(await one_run(embedder, corpus))
            print(f"run {n + 1}: {results[-1]}")
        return results
    finally:
        shutil.rmtree(corpus, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Ingestion throughput with the local model")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = asyncio.run(run(args.copies, args.runs))
    median = sorted(runs, key=lambda r: r["chunks_per_s"])[(len(runs) - 1) // 2]
    result = {
        "benchmark": "IngestionPipeline + local embeddings + SqliteKnowledgeIndex, sample corpus",
        "copies": args.copies,
        "runs": runs,
        "median_chunks_per_s": median["chunks_per_s"],
        "median_cpu_ms_per_chunk": median["cpu_ms_per_chunk"],
        "spread_chunks_per_s": round(statistics.pstdev(r["chunks_per_s"] for r in runs), 1),
        **machine(),
    }
    path = write_result("ingestion_throughput", result)
    print(
        f"{median['chunks']} chunks from {median['files']} files: {median['chunks_per_s']}"
        f" chunks/s, {median['cpu_ms_per_chunk']} CPU ms per chunk (median of {len(runs)});"
        f" cores {result['cores']}, load {result['load_average']}. Wrote {path}"
    )


if __name__ == "__main__":
    main()
