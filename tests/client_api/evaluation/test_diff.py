"""``lamina eval diff``: score deltas, items that got worse or better, a regression gate."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client_api.cli import app
from client_api.evaluation.diff import diff_summaries
from client_api.evaluation.scoring import aggregate
from client_api.evaluation.summary import EvalSummary, ItemResult, RunConfig, write_summary


def item(item_id: str, recall: float, *, outcome: str = "answered") -> ItemResult:
    return ItemResult.model_validate(
        {
            "id": item_id,
            "question": f"{item_id}?",
            "user": "u",
            "expect_refusal": False,
            "outcome": outcome,
            "gold_sources": ["a.md"],
            "gold_answer": "x",
            "citation_precision": recall,
            "citation_recall": recall,
            "answer_f1": 0.5,
            "answer_contains": True,
            "groundedness": None if outcome == "error" else 1.0,
            "refusal_correct": outcome == "answered",
            "latency_s": 0.1,
        }
    )


def summary(*items: ItemResult, dataset_sha256: str = "a" * 64) -> EvalSummary:
    config = RunConfig(
        target="embedded",
        corpus="samples/corpus",
        dataset="qa.jsonl",
        dataset_sha256=dataset_sha256,
        started_at=datetime(2025, 3, 3, tzinfo=UTC),
        duration_s=1.0,
        git_commit=None,
        models=["extractive (gpt-4o-mini)"],
        prompts={},
        passages="index",
        groundedness_method="overlap",
        concurrency=4,
        timeout_s=120,
    )
    return EvalSummary(config=config, aggregates=aggregate(items), items=list(items))


BEFORE = summary(item("one", 1.0), item("two", 1.0), item("three", 0.0), item("gone", 1.0))
AFTER = summary(item("one", 1.0), item("two", 0.0), item("three", 1.0), item("new", 1.0))


def test_metric_deltas_and_changed_items() -> None:
    changes = diff_summaries(BEFORE, AFTER)
    recall = next(m for m in changes.metrics if m.name == "citation_recall")
    assert (recall.before, recall.after, recall.delta) == (0.75, 0.75, 0.0)
    assert [c.id for c in changes.worse] == ["two"]
    assert [(m.name, m.before, m.after) for m in changes.worse[0].changes] == [
        ("citation_precision", 1.0, 0.0),
        ("citation_recall", 1.0, 0.0),
    ]
    assert [c.id for c in changes.better] == ["three"]
    assert (changes.only_before, changes.only_after) == (("gone",), ("new",))
    assert changes.same_dataset


def test_an_item_that_stops_getting_an_answer_is_worse() -> None:
    changes = diff_summaries(summary(item("one", 1.0)), summary(item("one", 0.0, outcome="error")))
    assert [c.id for c in changes.worse] == ["one"]
    assert changes.worse[0].outcome == ("answered", "error")


def test_a_drop_beyond_the_threshold_is_a_regression() -> None:
    worse = summary(item("one", 1.0), item("two", 0.0), item("three", 0.0), item("gone", 1.0))
    changes = diff_summaries(BEFORE, worse)
    assert [m.name for m in changes.regressions(0.2)] == ["citation_precision", "citation_recall"]
    assert changes.regressions(0.3) == []


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    write_summary(BEFORE, before)
    write_summary(
        summary(item("one", 0.0), item("two", 0.0), item("three", 0.0), dataset_sha256="b" * 64),
        after,
    )
    return before, after


def test_the_command_prints_deltas_and_gates_on_regression(runs: tuple[Path, Path]) -> None:
    before, after = runs
    shown = CliRunner().invoke(app, ["eval", "diff", str(before), str(after)])
    assert shown.exit_code == 0, shown.output
    assert "citation recall" in shown.output
    assert "-0.75" in shown.output
    assert "different question sets" in shown.output
    assert "Worse: 2 item(s)" in shown.output

    gated = CliRunner().invoke(
        app, ["eval", "diff", str(before), str(after), "--fail-on-regression", "0.1"]
    )
    assert gated.exit_code == 1
    assert "Regression: citation recall dropped by more than 0.1" in gated.output


def test_the_command_names_a_file_that_is_not_a_summary(tmp_path: Path) -> None:
    stray = tmp_path / "notes.json"
    stray.write_text('{"hello": 1}')
    result = CliRunner().invoke(app, ["eval", "diff", str(stray), str(stray)])
    assert result.exit_code == 2
    assert "is not a summary written by 'lamina eval'" in result.output
