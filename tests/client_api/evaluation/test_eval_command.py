"""``lamina eval`` as a real process: the bundled set on the default configuration, the
same set on a scrambled corpus (a retriever that finds the wrong documents), and a
deployment given by URL."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from client_api.app import create_app
from client_api.composition import build_knowledge, sample_corpus
from client_api.evaluation.dataset import bundled_dataset, load_dataset
from client_api.evaluation.summary import EvalSummary, read_summary
from tests.client_api.corpus import dev_settings
from tests.support.processes import app_in_thread, lamina_env, run_lamina

pytestmark = pytest.mark.slow

# Measured on the default configuration (extractive answers): recall 1.00, precision
# 0.97, groundedness 1.00, refusal correctness 0.97. The floors leave room for honest
# changes of ranking, not for a broken retriever (recall 0.22 on the scrambled corpus).
FLOORS = {
    "citation_recall": 0.9,
    "citation_precision": 0.85,
    "answer_containment": 0.9,
    "groundedness": 0.9,
    "refusal_accuracy": 0.85,
}


def scrambled_copy(target: Path) -> Path:
    """The sample corpus with every text document's content moved to the next text
    document's path (same paths, same access rules): search then finds each fact under
    the wrong document."""
    corpus = sample_corpus()
    shutil.copytree(corpus, target)
    texts = sorted(
        path
        for path in corpus.rglob("*")
        if path.suffix in {".md", ".html", ".txt"} and path.name != "README.md"
    )
    for here, there in zip(texts, [*texts[1:], texts[0]], strict=True):
        (target / here.relative_to(corpus)).write_text(there.read_text("utf-8"), "utf-8")
    return target


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvalSummary]:
    out = tmp_path_factory.mktemp("good")
    result = run_lamina("eval", "--out", str(out), env=lamina_env(), timeout_s=300)
    assert result.returncode == 0, result.stderr
    assert "citation recall" in result.stdout
    return out, read_summary(out / "summary.json")


@pytest.fixture(scope="module")
def scrambled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvalSummary, str]:
    corpus = scrambled_copy(tmp_path_factory.mktemp("scrambled") / "corpus")
    out = tmp_path_factory.mktemp("scrambled-run")
    result = run_lamina(
        "eval",
        str(bundled_dataset()),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--min-citation-recall",
        "0.9",
        env=lamina_env(),
        timeout_s=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # the gate failed
    return out, read_summary(out / "summary.json"), result.stderr


def test_the_bundled_set_on_the_default_configuration_scores_above_its_floors(
    good_run: tuple[Path, EvalSummary],
) -> None:
    out, summary = good_run
    totals = summary.aggregates
    assert (totals.items, totals.errors) == (len(load_dataset(bundled_dataset()).items), 0)
    for metric, floor in FLOORS.items():
        value = totals.score(metric)
        assert value is not None
        assert value >= floor, f"{metric} {value:.2f} is below its floor {floor}"
    assert totals.latency is not None
    assert totals.latency.p50_s > 0
    config = summary.config
    assert (config.target, config.passages, config.groundedness_method) == (
        "embedded",
        "index",
        "overlap",
    )
    assert config.dataset_sha256 == load_dataset(bundled_dataset()).sha256
    assert config.models
    assert "answer" in config.prompts  # from the API's explanation of a turn
    assert len(summary.items) == totals.items
    report = (out / "report.md").read_text()
    assert "## Scores" in report
    assert f"| citation recall | {totals.citation_recall:.2f} |" in report


def test_restricted_questions_are_declined_for_callers_who_may_not_read(
    good_run: tuple[Path, EvalSummary],
) -> None:
    _, summary = good_run
    denied = [item for item in summary.items if item.id.startswith("denied-")]
    assert denied
    assert all(item.outcome == "refused" and item.refusal_correct for item in denied)


def test_a_broken_retriever_lowers_citation_recall_and_fails_the_gate(
    good_run: tuple[Path, EvalSummary], scrambled_run: tuple[Path, EvalSummary, str]
) -> None:
    good, broken = good_run[1].aggregates, scrambled_run[1].aggregates
    assert good.citation_recall is not None
    assert broken.citation_recall is not None
    assert broken.citation_recall < good.citation_recall - 0.5
    assert broken.errors == 0  # the answers came; they cite the wrong documents
    assert "Gate failed: citation recall" in scrambled_run[2]


def test_diff_names_what_got_worse_and_gates_on_the_regression(
    good_run: tuple[Path, EvalSummary], scrambled_run: tuple[Path, EvalSummary, str]
) -> None:
    result = run_lamina(
        "eval",
        "diff",
        str(good_run[0] / "summary.json"),
        str(scrambled_run[0] / "summary.json"),
        "--fail-on-regression",
        "0.1",
        env=lamina_env(COLUMNS="200"),
    )
    assert result.returncode == 1
    assert "Regression: citation recall dropped by more than 0.1" in result.stderr
    assert "leave-annual-days" in result.stdout  # its leave text now sits in another file
    assert "citation recall 1.00 → 0.00" in result.stdout


def test_a_deployment_given_by_url_is_evaluated_on_snippets_and_a_failing_question_is_kept(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    settings = dev_settings(data, caps={"max_prompt_tokens": 600})

    async def ingest() -> None:
        index, ingestor, _ = build_knowledge(settings)
        await index.open()
        try:
            await ingestor.ingest(sample_corpus())
        finally:
            await index.close()

    asyncio.run(ingest())
    questions = tmp_path / "qa.jsonl"
    lines = [
        {
            "id": "atlas-retention",
            "question": "How long does Atlas keep my data by default?",
            "gold_sources": ["product/atlas-faq.txt"],
            "gold_answer": "400 days",
            "caller": {"user": "visitor@contoso.com"},
        },
        {
            "id": "too-long",
            "question": "Tell me about Atlas. " * 400,
            "gold_sources": ["product/atlas-faq.txt"],
            "gold_answer": "analytics",
        },
    ]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    with app_in_thread(create_app(settings)) as base_url:
        result = run_lamina(
            "eval", str(questions), "--url", base_url, "--out", str(out), env=lamina_env()
        )
    assert result.returncode == 0, result.stderr
    summary = read_summary(out / "summary.json")
    assert (summary.config.target, summary.config.passages) == (base_url, "snippets")
    answered, failed = summary.items
    assert answered.outcome == "answered"
    assert answered.citation_recall == 1.0
    assert answered.answer_contains
    assert failed.outcome == "error"
    assert failed.error is not None
    assert failed.error.startswith("HTTP 413")
    assert summary.aggregates.errors == 1
