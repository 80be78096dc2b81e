"""``lamina eval``: run a question set through the API and score it; ``lamina eval diff``.

Exit codes: 0 done (and every gate passed), 1 a gate failed (``--min-*``,
``--max-errors``, ``--fail-on-regression``), 2 the run could not be made (bad
question set, settings, options, or a server that did not start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

if TYPE_CHECKING:
    from client_api.evaluation.dataset import Dataset
    from client_api.evaluation.groundedness import GroundednessCheck
    from client_api.evaluation.run import Deployment, RunOptions
    from client_api.evaluation.summary import EvalSummary

GATE_FAILED = 1
CANNOT_RUN = 2

console = Console()
errors = Console(stderr=True)


class _RunUnlessNamed(TyperGroup):
    """``lamina eval DATASET …`` means ``lamina eval run DATASET …``: any first word
    that is not a subcommand (or --help) is the run's."""

    # ctx is typer's own (vendored) click context, a class typer does not export.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    name="eval",
    cls=_RunUnlessNamed,
    help="Evaluate answers: 'lamina eval [DATASET]' runs a question set through the API "
    "and scores it (see 'lamina eval run --help'); 'lamina eval diff A B' compares two runs.",
)


def _fail(message: str, code: int = CANNOT_RUN) -> typer.Exit:
    errors.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    return typer.Exit(code)


@eval_app.command("run")
def run(
    dataset: Annotated[
        Path | None,
        typer.Argument(
            help="Question set, one JSON object a line (default: the bundled set over the "
            "sample corpus)",
            dir_okay=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write summary.json and report.md into this folder", file_okay=False),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Evaluate this deployment (its corpus must be the one the set is about) "
            "instead of starting Lamina on the environment's settings"
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LAMINA_EVAL_API_KEY", help="API key for --url (X-API-Key)"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="LAMINA_EVAL_TOKEN", help="Bearer token for --url"),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Folder the started server ingests (default: the sample corpus)",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    acl: Annotated[
        Path | None,
        typer.Option(help="Access rules of --corpus (default: its acl.yaml)", exists=True),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Questions in flight at once")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer")] = 120,
    judge: Annotated[
        bool,
        typer.Option(
            help="Judge groundedness with the configured model (LAMINA_INFERENCING__*) "
            "instead of the offline overlap check"
        ),
    ] = False,
    judge_deployment: Annotated[
        str | None, typer.Option(help="Registry deployment of the judge (with --judge)")
    ] = None,
    min_citation_precision: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    min_citation_recall: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    min_answer_f1: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    min_groundedness: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    min_refusal_accuracy: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    max_errors: Annotated[
        int | None, typer.Option(min=0, help="Most questions allowed to fail")
    ] = None,
) -> None:
    """Ask a question set through the API, score the answers, report.

    Each question goes through POST /v1/chat as its item's caller; the answers are scored
    on citations, answer, groundedness, refusals and latency. The --min-* gates exit 1
    when a score falls below them."""
    from client_api.evaluation.dataset import DatasetError, bundled_dataset, load_dataset
    from client_api.evaluation.run import RunOptions

    if url is None and (api_key or token):
        raise _fail("--api-key and --token go with --url")
    if url is not None and (corpus or acl):
        raise _fail("--corpus and --acl are for the server 'lamina eval' starts, not --url")
    if api_key and token:
        raise _fail("give --api-key or --token, not both")
    if judge_deployment and not judge:
        raise _fail("--judge-deployment goes with --judge")
    try:
        questions = load_dataset(dataset or bundled_dataset())
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    if url is not None and (api_key or token):
        errors.print(
            "[yellow]With a credential every question is asked as its identity: the items' "
            "callers are ignored, and refusals that depend on them may not hold.[/yellow]",
            soft_wrap=True,
        )
    check = _groundedness_check(judge, judge_deployment)
    options = RunOptions(concurrency=concurrency, timeout_s=timeout)
    summary = asyncio.run(_run(questions, check, options, url, api_key, token, corpus, acl))
    _show(summary, out)
    gates = {
        "citation_precision": min_citation_precision,
        "citation_recall": min_citation_recall,
        "answer_f1": min_answer_f1,
        "groundedness": min_groundedness,
        "refusal_accuracy": min_refusal_accuracy,
    }
    failed = _failed_gates(summary, gates, max_errors)
    for line in failed:
        errors.print(f"[red]Gate failed: {escape(line)}[/red]", soft_wrap=True)
    raise typer.Exit(GATE_FAILED if failed else 0)


def _groundedness_check(judge: bool, deployment: str | None) -> GroundednessCheck:
    from client_api.evaluation.groundedness import JudgeError, OverlapCheck, build_judge
    from client_api.settings import SettingsError, load_settings

    if not judge:
        return OverlapCheck()
    try:
        return build_judge(load_settings().inferencing, deployment)
    except (SettingsError, JudgeError) as exc:
        raise _fail(str(exc)) from None


async def _run(
    questions: Dataset,
    check: GroundednessCheck,
    options: RunOptions,
    url: str | None,
    api_key: str | None,
    token: str | None,
    corpus: Path | None,
    acl: Path | None,
) -> EvalSummary:
    from client_api.composition import sample_corpus
    from client_api.evaluation.client import ApiTarget
    from client_api.evaluation.embedded import EmbeddedServerError
    from client_api.evaluation.run import embedded_deployment, remote_deployment
    from client_api.settings import SettingsError
    from knowledge.contracts import KnowledgeError

    try:
        with _progress() as progress:
            if url is not None:
                deployment = remote_deployment(ApiTarget(url.rstrip("/"), api_key, token))
                return await _ask(questions, check, options, deployment, progress)
            ingesting = progress.add_task("Ingesting", total=None)

            def ingested(name: str, done: int, total: int) -> None:
                progress.update(ingesting, completed=done, total=total)

            async with embedded_deployment(
                corpus or sample_corpus(), acl=acl, progress=ingested
            ) as deployment:
                progress.remove_task(ingesting)
                return await _ask(questions, check, options, deployment, progress)
    except (SettingsError, EmbeddedServerError, KnowledgeError) as exc:
        raise _fail(f"Could not start Lamina for the evaluation: {exc}") from None
    finally:
        await check.aclose()


async def _ask(
    questions: Dataset,
    check: GroundednessCheck,
    options: RunOptions,
    deployment: Deployment,
    progress: Progress,
) -> EvalSummary:
    from client_api.evaluation.run import evaluate

    asking = progress.add_task("Asking", total=len(questions.items))
    return await evaluate(
        questions, deployment, check, options, on_done=lambda _: progress.advance(asking)
    )


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(
        TextColumn("[bold]{task.description}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
    ) as progress:
        yield progress


def _show(summary: EvalSummary, out: Path | None) -> None:
    from client_api.evaluation.report import render_markdown, render_terminal
    from client_api.evaluation.summary import write_summary

    console.print(render_terminal(summary))
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_summary(summary, out / "summary.json")
    (out / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    console.print(f"Wrote {out / 'summary.json'} and {out / 'report.md'}.")


def _failed_gates(
    summary: EvalSummary, minimums: dict[str, float | None], max_errors: int | None
) -> list[str]:
    from client_api.evaluation.summary import METRICS

    failed = []
    for metric, minimum in minimums.items():
        if minimum is None:
            continue
        value = summary.aggregates.score(metric)
        if value is None or value < minimum:
            shown = "no value" if value is None else f"{value:.3f}"
            failed.append(f"{METRICS[metric]} is {shown}, below {minimum:g}")
    if max_errors is not None and summary.aggregates.errors > max_errors:
        failed.append(f"failed questions: {summary.aggregates.errors}, more than {max_errors}")
    return failed


@eval_app.command("diff")
def diff(
    before: Annotated[Path, typer.Argument(help="summary.json of the earlier run", dir_okay=False)],
    after: Annotated[Path, typer.Argument(help="summary.json of the later run", dir_okay=False)],
    fail_on_regression: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="Exit 1 when a score dropped by more than this (e.g. 0.02)",
        ),
    ] = None,
) -> None:
    """Compare two runs: each score's change, and the items that got worse or better."""
    from client_api.evaluation.diff import diff_summaries, render_diff
    from client_api.evaluation.summary import SummaryError, read_summary

    try:
        earlier, later = read_summary(before), read_summary(after)
    except SummaryError as exc:
        raise _fail(str(exc)) from None
    changes = diff_summaries(earlier, later)
    console.print(render_diff(changes, str(before), str(after)))
    if fail_on_regression is None:
        raise typer.Exit(0)
    regressed = changes.regressions(fail_on_regression)
    for metric in regressed:
        errors.print(
            f"[red]Regression: {metric.label} dropped by more than {fail_on_regression:g}[/red]",
            soft_wrap=True,
        )
    raise typer.Exit(GATE_FAILED if regressed else 0)
