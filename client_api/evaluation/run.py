"""One evaluation run: ask every question, score every answer, summarise."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from client_api.evaluation.client import ApiTarget, ItemDone, ItemRun, ask_all, fetch_prompt_ids
from client_api.evaluation.dataset import Dataset
from client_api.evaluation.embedded import embedded_lamina
from client_api.evaluation.groundedness import GroundednessCheck
from client_api.evaluation.passages import CitationSnippets, IndexedPassages, PassageSource
from client_api.evaluation.scoring import aggregate, score_run
from client_api.evaluation.summary import EvalSummary, ItemResult, RunConfig
from knowledge.contracts import IngestionReport, IngestProgress

_REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class RunOptions:
    concurrency: int = 4
    timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where the questions go, and where the cited passages' text comes from."""

    target: ApiTarget
    passages: PassageSource
    label: str
    """``embedded`` or the URL, as the summary records it."""
    corpus: Path | None = None
    ingested: IngestionReport | None = None


@asynccontextmanager
async def embedded_deployment(
    corpus: Path, *, acl: Path | None = None, progress: IngestProgress | None = None
) -> AsyncIterator[Deployment]:
    """A Lamina server of the environment's configuration over ``corpus``, with a
    temporary data folder that is deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="lamina-eval-") as data:
        async with embedded_lamina(corpus, Path(data), acl=acl, progress=progress) as server:
            yield Deployment(
                target=ApiTarget(server.base_url),
                passages=IndexedPassages(
                    server.retriever, dev_tenant=server.settings.auth.dev_tenant
                ),
                label="embedded",
                corpus=corpus,
                ingested=server.ingested,
            )


def remote_deployment(target: ApiTarget) -> Deployment:
    return Deployment(target=target, passages=CitationSnippets(), label=target.base_url)


async def evaluate(
    dataset: Dataset,
    deployment: Deployment,
    groundedness: GroundednessCheck,
    options: RunOptions = RunOptions(),
    *,
    on_done: ItemDone | None = None,
) -> EvalSummary:
    """Ask ``dataset`` of ``deployment`` and score the answers."""
    started_at, started = datetime.now(UTC), time.perf_counter()
    runs = await ask_all(
        deployment.target,
        dataset.items,
        concurrency=options.concurrency,
        timeout_s=options.timeout_s,
        on_done=on_done,
    )
    prompts = await fetch_prompt_ids(deployment.target, runs)
    # Scoring may call a judge model: as many at once as questions were asked at once.
    gate = asyncio.Semaphore(options.concurrency)

    async def scored(run: ItemRun) -> ItemResult:
        async with gate:
            return await score_run(run, deployment.passages, groundedness)

    results = list(await asyncio.gather(*(scored(run) for run in runs)))
    models = sorted({run.answer.model for run in runs if run.answer and run.answer.model})
    config = RunConfig(
        target=deployment.label,
        corpus=None if deployment.corpus is None else str(deployment.corpus),
        dataset=str(dataset.path),
        dataset_sha256=dataset.sha256,
        started_at=started_at,
        duration_s=time.perf_counter() - started,
        git_commit=await asyncio.to_thread(_git_commit) if deployment.corpus else None,
        models=models,
        prompts=prompts,
        passages=deployment.passages.kind,
        groundedness_method=groundedness.method,
        concurrency=options.concurrency,
        timeout_s=options.timeout_s,
    )
    return EvalSummary(config=config, aggregates=aggregate(results), items=results)


def _git_commit() -> str | None:
    """The commit of the code the embedded server ran, when it runs from a checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(_REPOSITORY), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None
