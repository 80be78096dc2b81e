"""``lamina replay``: a stored answer produced again from its recorded sources, in a real
``lamina`` process on the data a real app (in this process) wrote: the same answer from the
same sources, a source the owner may no longer read listed as missing, and a turn that
cannot be replayed refused with a clear message. Each replay is audited as the operator's
action on the owner's turn; the help says that ``--groups`` is trusted as given."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from client_api.app import create_app
from client_api.audit_events import operator
from client_api.cli import app
from client_api.cli_replay import token_f1
from intelligence.contracts import AuditEntry, AuditQuery
from intelligence.stores.sqlite_audit import SqliteAuditLog
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread, lamina_env, run_lamina

HANDBOOK = "# Leave\n\nEvery employee gets 27 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th of each month by bank transfer.\n"


@pytest.fixture(scope="module")
def turns(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The data folder, and two answered turns: Ann's about leave, Fin's about payroll."""
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with app_in_thread(create_app(dev_settings(data))) as base:
        leave = httpx.post(
            f"{base}/v1/chat",
            json={"message": "How many days of annual leave do I get?"},
            headers=dev_headers("ann"),
            timeout=30,
        )
        payroll = httpx.post(
            f"{base}/v1/chat",
            json={"message": "When are salaries paid?"},
            headers=dev_headers("fin", groups="finance"),
            timeout=30,
        )
    assert leave.status_code == payroll.status_code == 200
    return data, leave.json(), payroll.json()


def replays_audited(data: Path, turn: dict[str, Any]) -> list[AuditEntry]:
    async def query() -> list[AuditEntry]:
        audit = SqliteAuditLog(data / "audit.db")
        await audit.open()
        try:
            page = await audit.query(AuditQuery("contoso", event="chat.replay"))
        finally:
            await audit.close()
        return [e for e in page.entries if e.record.data["message_id"] == turn["message_id"]]

    return asyncio.run(query())


def replay(data: Path, turn: dict[str, Any], *options: str) -> Any:
    return run_lamina(
        "replay", turn["conversation_id"], turn["message_id"], "--tenant", "contoso", *options,
        env=lamina_env(LAMINA_DATA_DIR=str(data)),
    )  # fmt: skip


@pytest.mark.slow
def test_a_replay_from_the_same_sources_gives_the_same_answer(
    turns: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    data, leave, _ = turns
    done = replay(data, leave, "--user", "ann", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["original"]["answer"] == leave["answer"]
    assert report["replayed"]["answer"] == leave["answer"]
    cited = [c["chunk_id"] for c in leave["citations"]]
    assert [c["chunk_id"] for c in report["replayed"]["citations"]] == cited
    assert report["missing_sources"] == []
    assert report["similarity"] == 1.0
    assert report["prompt"] == "grounded_answer@v1"

    shown = replay(data, leave, "--user", "ann")
    assert shown.returncode == 0, shown.stderr
    assert "Similarity (token F1): 1.00" in shown.stdout
    assert "27 days" in shown.stdout

    # Each run is the operator's action on Ann's turn, with a correlation id of its own.
    audited = [entry.record for entry in replays_audited(data, leave)]
    assert [(r.user_id, r.data["owner"]) for r in audited] == [(operator(), "ann")] * 2
    correlation_ids = {r.correlation_id for r in audited}
    assert None not in correlation_ids and len(correlation_ids) == 2


@pytest.mark.slow
def test_a_source_the_owner_may_no_longer_read_is_missing(
    turns: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    data, _, payroll = turns
    assert "25th" in payroll["answer"]
    # Fin has left the finance group since: the payroll page is no longer theirs to read.
    done = replay(data, payroll, "--user", "fin", "--groups", "", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["missing_sources"] == [c["chunk_id"] for c in payroll["citations"]]
    assert report["replayed"]["citations"] == []
    assert "25th" not in report["replayed"]["answer"]
    assert report["similarity"] < 0.5


@pytest.mark.slow
def test_a_turn_that_is_not_the_users_is_not_replayed(
    turns: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    data, leave, _ = turns
    audited = len(replays_audited(data, leave))
    refused = replay(data, leave, "--user", "mallory")
    assert refused.returncode == 1
    assert "Not replayed: No such finished turn" in refused.stderr
    assert len(replays_audited(data, leave)) == audited


def test_the_help_says_the_groups_are_trusted_as_given() -> None:
    shown = CliRunner().invoke(app, ["replay", "--help"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.replace("│", " ").split())
    assert "trusted as given" in text
    assert "give the owner's current groups" in text


def test_token_f1_compares_the_words_of_two_answers() -> None:
    assert token_f1("27 days [1].", "27 days [1]") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("27 days", "nothing found") == 0.0
    assert token_f1("You get 27 days", "27 days") == 0.6667  # precision 1, recall 0.5
