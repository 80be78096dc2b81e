"""The ``lamina`` command line as a real process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import write_corpus
from tests.support.processes import lamina_env, run_lamina

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus)
    environment = lamina_env(LAMINA_DATA_DIR=str(tmp_path_factory.mktemp("data")))
    result = run_lamina("ingest", str(corpus), env=environment)
    assert result.returncode == 0, result.stderr
    return environment


def test_ask_streams_a_cited_answer_for_a_permitted_user(env: dict[str, str]) -> None:
    result = run_lamina(
        "ask", "What is the Project Falcon budget?", "--user", "bea", "--groups", "beta", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "4.2 million euros" in result.stdout
    assert "beta/falcon-budget.txt" in result.stdout


def test_ask_trims_for_a_user_who_may_not_see(env: dict[str, str]) -> None:
    result = run_lamina(
        "ask", "What is the Project Falcon budget?", "--user", "al", "--groups", "alpha", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "4.2 million" not in result.stdout
    assert "beta/" not in result.stdout


def test_ask_on_an_empty_index_says_what_to_do(tmp_path: Path) -> None:
    result = run_lamina(
        "ask", "anything", "--user", "u", env=lamina_env(LAMINA_DATA_DIR=str(tmp_path))
    )
    assert result.returncode == 1
    assert "lamina ingest" in result.stderr


def test_a_wrong_setting_stops_start_up_and_names_the_variable(tmp_path: Path) -> None:
    result = run_lamina(
        "serve",
        env=lamina_env(LAMINA_DATA_DIR=str(tmp_path), LAMINA_INFERENCING__PROVIDER="gpt5"),
        timeout_s=60,
    )
    assert result.returncode == 2
    assert "LAMINA_INFERENCING__PROVIDER" in result.stderr
    assert "'extractive'" in result.stderr


def test_serving_jwt_mode_without_an_identity_provider_is_refused(tmp_path: Path) -> None:
    result = run_lamina("serve", env=lamina_env(LAMINA_DATA_DIR=str(tmp_path)), timeout_s=60)
    assert result.returncode == 2
    assert "LAMINA_AUTH__OPENID_CONFIG_URL" in result.stderr
    assert "LAMINA_AUTH__MODE=dev" in result.stderr


def test_config_lists_every_variable(tmp_path: Path) -> None:
    result = run_lamina("config", env=lamina_env(COLUMNS="200"))
    assert result.returncode == 0
    assert "LAMINA_KNOWLEDGE__TOP_K" in result.stdout
    assert "LAMINA_AUTH__AUDIENCE" in result.stdout


def test_ingest_of_a_corpus_with_a_broken_acl_file_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "acl.yaml").write_text("rules: [oops")
    (tmp_path / "a.txt").write_text("hello")
    result = run_lamina(
        "ingest", str(tmp_path), env=lamina_env(LAMINA_DATA_DIR=str(tmp_path / "data"))
    )
    assert result.returncode == 1
    assert "Ingestion failed" in result.stderr
