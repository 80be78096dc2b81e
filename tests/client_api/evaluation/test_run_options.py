"""``lamina eval`` refuses what cannot make a run before anything starts (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from client_api.cli import app


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, " ".join(result.output.split())


def test_a_broken_question_set_is_named_with_its_line(tmp_path: Path) -> None:
    questions = tmp_path / "qa.jsonl"
    questions.write_text('{"id": "a", "question": "q", "gold_answer": "x"}\n{"id": "b",\n')
    code, output = run(str(questions), "--url", "http://127.0.0.1:9")
    assert code == 2
    assert f"{questions}, line 2: not valid JSON" in output


def test_credentials_need_a_url_and_a_corpus_needs_the_embedded_server(tmp_path: Path) -> None:
    assert run("--api-key", "k") == (2, "--api-key and --token go with --url")
    code, output = run("--url", "http://127.0.0.1:9", "--corpus", str(tmp_path))
    assert (code, output) == (
        2,
        "--corpus and --acl are for the server 'lamina eval' starts, not --url",
    )


def test_the_judge_needs_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_INFERENCING__PROVIDER", "extractive")
    monkeypatch.setenv("LAMINA_INFERENCING__DEPLOYMENTS", "[]")
    code, output = run("--judge")
    assert code == 2
    assert "--judge needs a model" in output
