"""The readable side of a run: ``report.md`` and the tables printed on the terminal."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from client_api.evaluation.summary import METRICS, EvalSummary, ItemResult

_ANSWER_CHARS = 400


def score_text(value: float | bool | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.2f}"


def worst_first(summary: EvalSummary) -> list[ItemResult]:
    """Items from the worst to the best, errors first; ties keep the dataset's order."""
    return sorted(summary.items, key=lambda item: item.quality())


def _headline(summary: EvalSummary) -> str:
    totals = summary.aggregates
    return (
        f"{totals.items} questions: {totals.answered} answered, {totals.refused} declined, "
        f"{totals.errors} failed; {totals.false_refusals} answerable declined, "
        f"{totals.missed_refusals} answered that should have been declined."
    )


def _latency(summary: EvalSummary) -> str:
    latency = summary.aggregates.latency
    if latency is None:
        return "–"
    return f"{latency.p50_s:.3f} s / {latency.p95_s:.3f} s / {latency.mean_s:.3f} s"


def _note(item: ItemResult) -> str:
    if item.error:
        return item.error
    if item.expect_refusal and item.outcome == "answered":
        return "answered; should have declined"
    if not item.expect_refusal and item.outcome == "refused":
        return "declined an answerable question"
    if item.groundedness_error:
        return item.groundedness_error
    if item.unsupported_sentences:
        return f"{len(item.unsupported_sentences)} unsupported sentence(s)"
    notes = []
    if missing := sorted(set(item.gold_sources) - set(item.cited_sources)):
        notes.append("did not cite " + ", ".join(missing))
    if item.gold_sources and (extra := sorted(set(item.cited_sources) - set(item.gold_sources))):
        notes.append("also cited " + ", ".join(extra))
    if item.answer_contains is False:
        notes.append("gold answer not in the answer")
    return "; ".join(notes)


_COLUMNS = (
    "id",
    "outcome",
    "refusal ok",
    "cit. P",
    "cit. R",
    "F1",
    "contains",
    "grounded",
    "latency",
    "note",
)


def _row(item: ItemResult) -> list[str]:
    return [
        item.id,
        item.outcome,
        score_text(item.refusal_correct),
        score_text(item.citation_precision),
        score_text(item.citation_recall),
        score_text(item.answer_f1),
        score_text(item.answer_contains),
        score_text(item.groundedness),
        "–" if item.latency_s is None else f"{item.latency_s:.3f} s",
        _note(item),
    ]


def render_markdown(summary: EvalSummary) -> str:
    config, totals = summary.config, summary.aggregates
    where = config.target + (f" over `{config.corpus}`" if config.corpus else "")
    lines = [
        "# Lamina evaluation",
        "",
        f"- Question set: `{config.dataset}` (sha256 `{config.dataset_sha256[:12]}`)",
        f"- Target: {where}",
        f"- Run: {config.started_at:%Y-%m-%d %H:%M:%S} UTC, {config.duration_s:.1f} s, "
        f"concurrency {config.concurrency}"
        + (f", commit `{config.git_commit[:12]}`" if config.git_commit else ""),
        f"- Models: {', '.join(config.models) or 'not reported'}",
        f"- Prompts: {', '.join(f'{k}: {v}' for k, v in config.prompts.items()) or 'not reported'}",
        f"- Groundedness: {config.groundedness_method}, against the cited passages' "
        + ("full text" if config.passages == "index" else "snippets"),
        "",
        "## Scores",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {score_text(totals.score(name))} |" for name, label in METRICS.items()]
    lines += [f"| latency p50 / p95 / mean | {_latency(summary)} |", "", _headline(summary), ""]
    lines += [
        "## Items, worst first",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(map(_cell, _row(item))) + " |" for item in worst_first(summary)]
    attention = [item for item in worst_first(summary) if _note(item)]
    if attention:
        lines += ["", "## What went wrong", ""]
        for item in attention:
            lines += _details(item)
    return "\n".join(lines) + "\n"


def _details(item: ItemResult) -> list[str]:
    expected = (
        "a refusal"
        if item.expect_refusal
        else f"{item.gold_answer!r} from {', '.join(item.gold_sources) or 'any source'}"
    )
    answer = item.answer if len(item.answer) <= _ANSWER_CHARS else item.answer[:_ANSWER_CHARS] + "…"
    lines = [
        f"### {item.id}",
        "",
        f"- Question ({item.user}): {item.question}",
        f"- Expected: {expected}",
    ]
    if item.error:
        lines.append(f"- Error: {item.error}")
    else:
        lines.append(f"- Answer ({item.outcome}): {answer or '(empty)'}")
        lines.append(f"- Cited: {', '.join(item.cited_sources) or 'nothing'}")
    lines += [f"- Unsupported: {sentence}" for sentence in item.unsupported_sentences]
    if item.groundedness_error:
        lines.append(f"- Groundedness not judged: {item.groundedness_error}")
    return [*lines, ""]


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def render_terminal(summary: EvalSummary, *, worst: int = 10) -> RenderableType:
    """The scores, and the worst items that fell short of perfect."""
    scores = Table("metric", "value", title="Lamina evaluation")
    for name, label in METRICS.items():
        scores.add_row(label, score_text(summary.aggregates.score(name)))
    scores.add_row("latency p50 / p95 / mean", _latency(summary))
    shown = [item for item in worst_first(summary) if _note(item)][:worst]
    parts: list[RenderableType] = [scores, Text(_headline(summary))]
    if shown:
        items = Table(title=f"The {len(shown)} worst items with a problem")
        items.add_column("id", no_wrap=True)
        for column in ("outcome", "cit. P/R", "F1", "grounded"):
            items.add_column(column, no_wrap=True)
        items.add_column("note")
        for item in shown:
            items.add_row(
                Text(item.id),
                item.outcome,
                f"{score_text(item.citation_precision)}/{score_text(item.citation_recall)}",
                score_text(item.answer_f1),
                score_text(item.groundedness),
                Text(_note(item)),
            )
        parts.append(items)
    return Group(*parts)
