"""What a grounded chat turn costs in Lamina itself, the model left out: POST /v1/chat over
100,000 security-trimmed chunks, at concurrency 1 and 50.

What runs, each as its own process:

- ``python -m inferencing.simulator --latency 0`` as the model (the deployment ``bench``):
  it answers the planning call at once, and every answer with a fixed text citing
  ``[1]`` and ``[2]``, so each turn cites the first two passages retrieval returned;
- the loopback OpenID provider of ``tests/support/identity.py`` (in this process): eight
  callers, each with an RS256 token whose ``groups`` claim holds one group;
- ``lamina serve`` (one uvicorn worker): JWT auth, every per-user and per-tenant rate
  limit and token quota on (far too high to refuse, so each is checked and recorded),
  hashing embeddings (``LAMINA_KNOWLEDGE__EMBEDDINGS=hashing``, the offline model of the
  tests), the embedded SQLite index, telemetry off (``bench.tracing_overhead`` measures
  that), the answer cache off (its default).

The index is built once per invocation, in this process, through the knowledge index API
(``SqliteKnowledgeIndex.replace_document``): the synthetic chunks of
``bench.retrieval_latency`` (documents of ten chunks of ~60 made-up words) in the tenant
of the tokens, each document granted to ``sees-1`` (~1 % of documents), ``sees-10``
(~10 %), ``sees-50`` (~50 %) and an owner, with the hashing model's vectors of the chunk
texts (computed per word, and checked equal to ``HashingEmbeddingModel.vector`` on a
sample). Callers are members of ``sees-10`` or ``sees-50``, so trimming drops 50-90 % of
the index from every search. Each question is four words of a chunk its caller may read.

Per run (``--runs``), Lamina starts on a fresh copy of the built data dir, answers
``--warmup`` turns, then, per concurrency, ``--requests`` turns from that many
concurrent clients (aiohttp, closed loop, in this process: a load generator apart from
Lamina). A turn is auth, limits, the planning call, security-trimmed hybrid retrieval,
the answer call, and storing the conversation. Every response must be a 200 carrying the
rate-limit headers and citing at least one passage, each of a document the caller may
read; else the run fails. Figures are per run, and the medians over runs.

    .venv/bin/python -m bench.rag_turn [--chunks 100000] [--requests 400] [--runs 3] \\
        [--concurrency 1,50] [--warmup 20]

Writes bench/results/rag_turn.json (``rag_turn-<chunks>.json`` with other ``--chunks``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from itertools import chain, pairwise
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt

from bench.cpu import process_cpu_s
from bench.knowledge_support import Matrix, machine, write_result
from bench.retrieval_latency import Corpus, fill, synthesise
from bench.simulated import Served, deployment, lamina_env, start_lamina, start_simulator
from bench.turn_support import (
    LIMIT_HEADER,
    LIMITS_ON,
    jwt_settings,
    machine_line,
    median_over_runs,
    model_calls,
    summarise,
    with_machine,
)
from inferencing.providers import hashing_embeddings
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import EmbeddingIdentity
from tests.support.identity import TENANT, IdentityProvider, running_identity_provider

REPLY = "The documents answer this [1], with more detail in [2]."
CALLER_GROUPS = ("sees-10", "sees-50")
CALLERS = 8
CHECKED_VECTORS = 200


# --- the index ---------------------------------------------------------------------------


def hashing_vectors(texts: list[str], model: HashingEmbeddingModel) -> Matrix:
    """``model.vector(text)`` for every text, several times faster: a word's features
    are summed once per distinct word, not once per occurrence. Checked against the model
    on a sample, so a change of the model's features fails here rather than measuring an
    index whose vectors no longer match its queries."""
    dims = model.dimensions

    def features(word: str) -> npt.NDArray[np.float64]:
        # As HashingEmbeddingModel.vector adds the features of one word.
        raw = np.zeros(dims)
        add = hashing_embeddings._slot
        if word in hashing_embeddings._NEGATIONS or any(ch.isdigit() for ch in word):
            slot, sign = add("w:" + word, dims)
            raw[slot] += sign * hashing_embeddings._DECISIVE_WEIGHT
            return raw
        slot, sign = add("w:" + word, dims)
        raw[slot] += sign * hashing_embeddings._WORD_WEIGHT
        padded, n = f"<{word}>", hashing_embeddings._NGRAM
        for start in range(len(padded) - n + 1):
            slot, sign = add("c:" + padded[start : start + n], dims)
            raw[slot] += sign * hashing_embeddings._NGRAM_WEIGHT
        return raw

    tokenised = [hashing_embeddings.normalized_words(text) for text in texts]
    vocabulary = {word: n for n, word in enumerate(dict.fromkeys(chain.from_iterable(tokenised)))}
    per_word = np.stack([features(word) for word in vocabulary]) if vocabulary else None
    out = np.zeros((len(texts), dims), dtype=np.float32)
    bigram = hashing_embeddings._BIGRAM_WEIGHT
    for i, words in enumerate(tokenised):
        if per_word is None or not words:
            continue
        raw = per_word[[vocabulary[word] for word in words]].sum(axis=0)
        for first, second in pairwise(words):
            slot, sign = hashing_embeddings._slot(f"b:{first} {second}", dims)
            raw[slot] += sign * bigram
        norm = float(np.linalg.norm(raw))
        out[i] = raw / norm if norm else raw
    sample = np.asarray([model.vector(t) for t in texts[:CHECKED_VECTORS]], dtype=np.float32)
    if not np.allclose(out[: len(sample)], sample, atol=1e-5):
        raise SystemExit(
            "bench.rag_turn: its per-word hashing vectors differ from "
            "HashingEmbeddingModel.vector: update hashing_vectors to the model's features"
        )
    return out


async def build_index(path: Path, corpus: Corpus) -> dict[str, float]:
    """The corpus, with hashing vectors, into a fresh index at ``path``; seconds taken."""
    model = HashingEmbeddingModel()
    started = time.perf_counter()
    vectors = hashing_vectors(corpus.texts, model)
    embed_s = time.perf_counter() - started
    index = SqliteKnowledgeIndex(path)
    await index.open()
    try:
        write_s = await fill(
            index,
            replace(corpus, vectors=vectors),
            tenant=TENANT,
            embedding=EmbeddingIdentity(model.name, model.dimensions),
        )
        chunks = await index.count_chunks()
    finally:
        await index.close()
    if chunks != len(corpus.texts):
        raise SystemExit(f"the index holds {chunks} chunks, not {len(corpus.texts)}")
    return {"embed_s": round(embed_s, 1), "write_s": round(write_s, 1)}


# --- callers and questions --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    user: str
    group: str
    token: str


@dataclass(frozen=True, slots=True)
class Ask:
    caller: Caller
    question: str


def callers(identity: IdentityProvider, ttl_s: int) -> list[Caller]:
    made = []
    for n in range(CALLERS):
        group = CALLER_GROUPS[n % len(CALLER_GROUPS)]
        token = identity.token(f"reader-{n}", groups=(group,), expires_in=ttl_s)
        made.append(Caller(f"reader-{n}", group, token))
    return made


def asks(corpus: Corpus, people: list[Caller], count: int, rng: np.random.Generator) -> list[Ask]:
    """``count`` questions, callers in turn, each four words of a chunk its caller may read."""
    permitted = {g: np.flatnonzero(corpus.permitted(g)) for g in CALLER_GROUPS}
    made = []
    for n in range(count):
        caller = people[n % len(people)]
        target = int(rng.choice(permitted[caller.group]))
        made.append(Ask(caller, f"What do the documents say about {corpus.terms[target]}?"))
    return made


# --- the load -------------------------------------------------------------------------------


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def drive(url: str, work: list[Ask], concurrency: int, corpus: Corpus) -> Outcome:
    """``work`` sent from ``concurrency`` clients back to back; every answer checked after
    the clock stops (parsing is not the server's time, and would slow the clients)."""
    outcome = Outcome()
    answers: list[tuple[Ask, int, bool, bytes]] = []
    pending = iter(work)

    async def client(session: aiohttp.ClientSession) -> None:
        for ask in pending:
            headers = {"Authorization": f"Bearer {ask.caller.token}"}
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{url}/v1/chat", json={"message": ask.question}, headers=headers
                ) as response:
                    body = await response.read()
                    status, limited = response.status, LIMIT_HEADER in response.headers
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            outcome.latencies_ms.append((time.perf_counter() - started) * 1000)
            answers.append((ask, status, limited, body))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        outcome.wall_s = time.perf_counter() - started
    for ask, status, limited, body in answers:
        problem = _check(ask, status, limited, body, corpus)
        if problem:
            outcome.failures.append(problem)
    return outcome


def _check(ask: Ask, status: int, limited: bool, body: bytes, corpus: Corpus) -> str | None:
    """Why this answer is not a real one, or None."""
    if status != 200:
        return f"HTTP {status}: {body[:300]!r}"
    if not limited:
        return f"no {LIMIT_HEADER} header: the rate limits did not run"
    answer = json.loads(body)
    if answer["answer"] != REPLY:
        return f"answer {answer['answer']!r} is not the model's"
    citations = answer["citations"]
    if not citations:
        return f"no citation: retrieval found nothing for {ask.question!r}"
    for citation in citations:
        document = int(citation["document_id"].removeprefix("d"))
        if ask.caller.group not in corpus.groups_of_document[document]:
            return f"{ask.caller.user} ({ask.caller.group}) was shown d{document}"
    return None


# --- a run ------------------------------------------------------------------------------


def _run(
    number: int,
    template: Path,
    workdir: Path,
    simulator: Served,
    identity: IdentityProvider,
    corpus: Corpus,
    people: list[Caller],
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> dict[str, dict[str, object]]:
    data = workdir / f"run{number}"
    shutil.copytree(template, data)
    settings = jwt_settings(identity) | LIMITS_ON
    env = lamina_env(data, [deployment("bench", simulator)], **settings)
    figures: dict[str, dict[str, object]] = {}
    with ExitStack() as stack:
        lamina = start_lamina(stack, workdir, env)
        # Connections, first-use imports, and the first search loading the index's vectors.
        warm = asyncio.run(drive(lamina.url, asks(corpus, people, args.warmup, rng), 1, corpus))
        if warm.failures:
            raise SystemExit(f"warm-up failed: {warm.failures[:3]}")
        for concurrency in args.concurrency:
            work = asks(corpus, people, args.requests, rng)
            cpu_before, calls_before = process_cpu_s(lamina.pid) or 0.0, model_calls(simulator)
            outcome = asyncio.run(drive(lamina.url, work, concurrency, corpus))
            cpu_s = (process_cpu_s(lamina.pid) or 0.0) - cpu_before
            calls = model_calls(simulator) - calls_before
            lamina.child.ensure_running()
            if outcome.failures:
                raise SystemExit(
                    f"run {number}, concurrency {concurrency}: {len(outcome.failures)} of "
                    f"{len(work)} turns failed, e.g. {outcome.failures[:3]}"
                )
            turns = len(outcome.latencies_ms)
            figures[str(concurrency)] = with_machine(
                summarise(outcome.latencies_ms)
                | {
                    "turns_per_s": round(turns / outcome.wall_s, 1),
                    "server_cpu_ms_per_turn": round(cpu_s * 1000 / turns, 2),
                    "model_calls_per_turn": round(calls / turns, 2),
                }
            )
            print(
                f"  run {number}, concurrency {concurrency:>3}: {_row(figures[str(concurrency)])}"
            )
    shutil.rmtree(data, ignore_errors=True)
    return figures


def _row(figures: dict[str, object]) -> str:
    return (
        f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
        f"{figures['turns_per_s']} turns/s, server CPU {figures['server_cpu_ms_per_turn']} "
        f"ms/turn, {figures['model_calls_per_turn']} model calls/turn {machine_line(figures)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="A RAG turn's cost in Lamina, model excluded")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=400, help="turns per concurrency per run")
    parser.add_argument("--runs", type=int, default=3, help="fresh servers, medians over runs")
    parser.add_argument("--concurrency", default="1,50", help="comma-separated client counts")
    parser.add_argument("--warmup", type=int, default=20, help="sequential turns before timing")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="lamina-rag-turn-"))
    try:
        print(f"building {args.chunks} chunks ...", file=sys.stderr)
        corpus = synthesise(args.chunks, rng)
        template = workdir / "template"
        build = with_machine(asyncio.run(build_index(template / "knowledge.db", corpus)))
        print(f"index built: {build}")
        with ExitStack() as stack:
            simulator = start_simulator(
                stack, workdir, "simulator", "--latency", "0", "--default-reply", REPLY
            )
            identity = stack.enter_context(running_identity_provider())
            people = callers(identity, ttl_s=3600 * 6)
            runs = [
                _run(n, template, workdir, simulator, identity, corpus, people, args, rng)
                for n in range(args.runs)
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    by_concurrency = {
        str(c): median_over_runs([run[str(c)] for run in runs]) for c in args.concurrency
    }
    result = {
        "benchmark": "POST /v1/chat, JWT auth, limits on, model mode (zero-latency simulator), "
        "hybrid security-trimmed retrieval over synthetic chunks in the SQLite index, "
        "hashing embeddings",
        "chunks": args.chunks,
        "turns_per_concurrency_per_run": args.requests,
        "build": build,
        "median_over_runs": by_concurrency,
        "per_run": runs,
        **machine(),
    }
    default = args.chunks == parser.get_default("chunks")
    path = write_result("rag_turn" + ("" if default else f"-{args.chunks}"), result)
    for concurrency, figures in by_concurrency.items():
        print(f"median of {args.runs} run(s), concurrency {concurrency:>3}: {_row(figures)}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
