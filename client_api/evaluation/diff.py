"""``lamina eval diff``: what changed between two runs, metric by metric and item by item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from client_api.evaluation.report import score_text
from client_api.evaluation.summary import METRICS, EvalSummary, ItemResult

_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class MetricDelta:
    name: str
    before: float | None
    after: float | None

    @property
    def label(self) -> str:
        return METRICS[self.name]

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


@dataclass(frozen=True, slots=True)
class ItemChange:
    id: str
    direction: Literal["worse", "better"]
    changes: tuple[MetricDelta, ...]
    outcome: tuple[str, str]
    """The item's outcome before and after (answered, refused, error)."""


@dataclass(frozen=True, slots=True)
class SummaryDiff:
    metrics: tuple[MetricDelta, ...]
    latency_p50_s: tuple[float | None, float | None]
    worse: tuple[ItemChange, ...]
    better: tuple[ItemChange, ...]
    only_before: tuple[str, ...]
    only_after: tuple[str, ...]
    same_dataset: bool

    def regressions(self, threshold: float) -> list[MetricDelta]:
        """Metrics that dropped by more than ``threshold`` (absolute, on the 0–1 scale),
        or that had a value and lost it."""
        return [
            m
            for m in self.metrics
            if (m.delta is not None and m.delta < -threshold - _EPSILON)
            or (m.before is not None and m.after is None)
        ]


def diff_summaries(before: EvalSummary, after: EvalSummary) -> SummaryDiff:
    metrics = tuple(
        MetricDelta(name, before.aggregates.score(name), after.aggregates.score(name))
        for name in METRICS
    )
    earlier = {item.id: item for item in before.items}
    later = {item.id: item for item in after.items}
    changed = [
        change
        for item_id in earlier.keys() & later.keys()
        if (change := _compare(earlier[item_id], later[item_id])) is not None
    ]
    order = {item.id: n for n, item in enumerate(after.items)}
    changed.sort(key=lambda change: order[change.id])
    old_latency, new_latency = before.aggregates.latency, after.aggregates.latency
    return SummaryDiff(
        metrics=metrics,
        latency_p50_s=(
            None if old_latency is None else old_latency.p50_s,
            None if new_latency is None else new_latency.p50_s,
        ),
        worse=tuple(c for c in changed if c.direction == "worse"),
        better=tuple(c for c in changed if c.direction == "better"),
        only_before=tuple(i for i in earlier if i not in later),
        only_after=tuple(i for i in later if i not in earlier),
        same_dataset=before.config.dataset_sha256 == after.config.dataset_sha256,
    )


def _compare(before: ItemResult, after: ItemResult) -> ItemChange | None:
    """An item is worse when any of its scores dropped or it stopped getting an answer,
    better when none dropped and one rose or it got an answer again."""
    old, new = before.scores(), after.scores()
    changes = tuple(
        MetricDelta(name, old.get(name), new.get(name))
        for name in METRICS
        if (name in old or name in new) and old.get(name) != new.get(name)
    )
    dropped = any(c.delta is not None and c.delta < -_EPSILON for c in changes)
    rose = any(c.delta is not None and c.delta > _EPSILON for c in changes)
    broke = after.outcome == "error" and before.outcome != "error"
    recovered = before.outcome == "error" and after.outcome != "error"
    outcome = (before.outcome, after.outcome)
    if dropped or broke:
        return ItemChange(after.id, "worse", changes, outcome)
    if rose or recovered:
        return ItemChange(after.id, "better", changes, outcome)
    return None


def _signed(delta: float | None) -> Text:
    if delta is None:
        return Text("–")
    if abs(delta) <= _EPSILON:
        return Text("0.00", style="dim")
    return Text(f"{delta:+.2f}", style="green" if delta > 0 else "red")


def _describe(change: ItemChange) -> str:
    parts = [f"{c.label} {score_text(c.before)} → {score_text(c.after)}" for c in change.changes]
    if change.outcome[0] != change.outcome[1]:
        parts.insert(0, f"{change.outcome[0]} → {change.outcome[1]}")
    return "; ".join(parts)


def render_diff(diff: SummaryDiff, before_name: str, after_name: str) -> RenderableType:
    table = Table("metric", before_name, after_name, "change", title="Metrics")
    for metric in diff.metrics:
        table.add_row(
            metric.label, score_text(metric.before), score_text(metric.after), _signed(metric.delta)
        )
    p50_before, p50_after = diff.latency_p50_s
    table.add_row(
        "latency p50 (s)",
        "–" if p50_before is None else f"{p50_before:.3f}",
        "–" if p50_after is None else f"{p50_after:.3f}",
        "–"
        if p50_before is None or p50_after is None
        else Text(f"{p50_after - p50_before:+.3f}", style="dim"),
    )
    parts: list[RenderableType] = []
    if not diff.same_dataset:
        parts.append(
            Text("The runs asked different question sets (their hashes differ).", style="yellow")
        )
    parts.append(table)
    for title, changes in (("Worse", diff.worse), ("Better", diff.better)):
        if changes:
            items = Table("id", "what changed", title=f"{title}: {len(changes)} item(s)")
            for change in changes:
                items.add_row(Text(change.id), Text(_describe(change)))
            parts.append(items)
    if not diff.worse and not diff.better:
        parts.append(Text("No item changed."))
    for label, ids in (("Only in", diff.only_before), ("New in", diff.only_after)):
        if ids:
            name = before_name if label == "Only in" else after_name
            parts.append(Text(f"{label} {name}: {', '.join(ids)}"))
    return Group(*parts)
