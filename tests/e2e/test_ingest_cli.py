"""``lamina ingest`` as a real process: the summary a content owner reads, and --sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import PUBLIC_FACT, write_corpus
from tests.support.processes import lamina_env, run_lamina

pytestmark = pytest.mark.slow


def summary_row(output: str, label: str) -> str:
    """The count in the summary table's row starting with ``label``."""
    (line,) = [line for line in output.splitlines() if line.startswith(f"│ {label} ")]
    return line.split("│")[-2].strip()


def test_a_rerun_is_incremental_and_sync_removes_deleted_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    # The default embedding model (all-MiniLM-L6-v2, int8), as a real deployment runs it.
    env = lamina_env(
        LAMINA_DATA_DIR=str(tmp_path / "data"),
        LAMINA_KNOWLEDGE__EMBEDDINGS="local",
        COLUMNS="200",
    )

    first = run_lamina("ingest", str(corpus), env=env)
    assert first.returncode == 0, first.stderr
    assert summary_row(first.stdout, "indexed (new or changed)") == "3"
    assert "broken.pdf" in first.stdout
    assert "not a readable PDF" in first.stdout

    (corpus / "alpha" / "aurora.md").unlink()
    again = run_lamina("ingest", str(corpus), "--sync", env=env)

    assert again.returncode == 0, again.stderr
    assert summary_row(again.stdout, "indexed (new or changed)") == "0"
    assert summary_row(again.stdout, "unchanged") == "2"
    assert summary_row(again.stdout, "removed (file gone)") == "1"
    assert summary_row(again.stdout, "skipped") == "1"

    # The index and the query share the model: words the page does not contain find it
    # through its vector (a text search finds nothing), and a plain question is answered.
    reworded = run_lamina("ask", "breakfast canteen hours", "--user", "gil", env=env)
    assert reworded.returncode == 0, reworded.stderr
    assert "retrieve: 1 passage(s) found" in reworded.stdout
    asked = run_lamina("ask", "When does the cafeteria open?", "--user", "gil", env=env)
    assert asked.returncode == 0, asked.stderr
    assert PUBLIC_FACT.removesuffix(".") in asked.stdout
    assert "shared/facilities.md" in asked.stdout
