"""What one ``lamina eval`` run found: the ``summary.json`` it writes and ``diff`` reads."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

Outcome = Literal["answered", "refused", "error"]

METRICS: dict[str, str] = {
    "citation_precision": "citation precision",
    "citation_recall": "citation recall",
    "answer_f1": "answer F1",
    "answer_containment": "answer containment",
    "groundedness": "groundedness",
    "refusal_accuracy": "refusal correctness",
}
"""The aggregate scores (higher is better, 0 to 1) by name, with their labels."""


class SummaryError(Exception):
    """A summary file that cannot be read; the message names the file."""


class RunConfig(BaseModel):
    """What was evaluated, so that two runs can be told apart and reproduced."""

    target: str
    """``embedded`` (a server started for the run) or the URL of a deployment."""
    corpus: str | None
    """The folder ingested for an embedded run."""
    dataset: str
    dataset_sha256: str
    started_at: datetime
    duration_s: float
    git_commit: str | None
    models: list[str]
    """The deployments that answered, as ``deployment (model@version)``."""
    prompts: dict[str, str]
    """Prompt role to versioned id, where the API explains its turns."""
    passages: Literal["index", "snippets"]
    """What groundedness was checked against: the cited chunks' full text (read from
    the embedded server's index) or the citations' snippets."""
    groundedness_method: str
    """``overlap`` (offline) or ``judge:<model>``."""
    concurrency: int
    timeout_s: float


class LatencySummary(BaseModel):
    p50_s: float
    p95_s: float
    mean_s: float


class Aggregates(BaseModel):
    items: int
    answerable: int
    refusal_expected: int
    answered: int
    refused: int
    errors: int
    citation_precision: float | None
    citation_recall: float | None
    answer_f1: float | None
    answer_containment: float | None
    groundedness: float | None
    refusal_accuracy: float | None
    false_refusals: int
    """Answerable questions that were declined."""
    missed_refusals: int
    """Questions that should have been declined and were answered."""
    groundedness_failures: int = 0
    """Answers the judge gave no readable verdict on (left out of ``groundedness``)."""
    latency: LatencySummary | None

    def score(self, metric: str) -> float | None:
        value = getattr(self, metric)
        return None if value is None else float(value)


class ItemResult(BaseModel):
    id: str
    question: str
    user: str
    expect_refusal: bool
    outcome: Outcome
    error: str | None = None
    answer: str = ""
    cited_sources: list[str] = []
    gold_sources: list[str] = []
    gold_answer: str = ""
    citation_precision: float | None = None
    citation_recall: float | None = None
    answer_f1: float | None = None
    answer_contains: bool | None = None
    groundedness: float | None = None
    unsupported_sentences: list[str] = []
    groundedness_error: str | None = None
    refusal_correct: bool
    latency_s: float | None = None

    def scores(self) -> dict[str, float]:
        """This item's defined scores, 0 to 1, named as in :data:`METRICS`."""
        found = {
            "citation_precision": self.citation_precision,
            "citation_recall": self.citation_recall,
            "answer_f1": self.answer_f1,
            "answer_containment": None if self.answer_contains is None else self.answer_contains,
            "groundedness": self.groundedness,
            "refusal_accuracy": self.refusal_correct,
        }
        return {name: float(value) for name, value in found.items() if value is not None}

    def quality(self) -> float:
        """One number to rank items by, worst first: the mean of its scores; -1 for an
        item that got no answer at all."""
        if self.outcome == "error":
            return -1.0
        scores = self.scores()
        return sum(scores.values()) / len(scores)


class EvalSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["lamina-eval/1"] = "lamina-eval/1"
    config: RunConfig
    aggregates: Aggregates
    items: list[ItemResult]


def write_summary(summary: EvalSummary, path: Path) -> None:
    path.write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_summary(path: Path) -> EvalSummary:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SummaryError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return EvalSummary.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SummaryError(
            f"{path} is not a summary written by 'lamina eval' ({where}: {first['msg']})"
        ) from None
