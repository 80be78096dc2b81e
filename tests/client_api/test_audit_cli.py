"""``lamina audit list`` and ``lamina audit verify`` (typer's runner, in process) over the
SQLite log of a data directory, and the ``lamina keys`` changes they show."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from client_api.cli import app as cli
from intelligence.contracts import AuditQuery, AuditRecord
from intelligence.stores.sqlite_audit import SqliteAuditLog
from tests.support.lifecycle import opened

T0 = datetime.now(UTC) - timedelta(hours=2)


def lamina(data: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"LAMINA_DATA_DIR": str(data)})


def seed(data: Path, records: list[AuditRecord]) -> None:
    async def append() -> None:
        async with opened(SqliteAuditLog(data / "audit.db")) as log:
            for record in records:
                await log.append(record)

    asyncio.run(append())


def stored(data: Path, tenant: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with opened(SqliteAuditLog(data / "audit.db")) as log:
            page = await log.query(AuditQuery(tenant, limit=1000))
        return [{"event": e.record.event, **e.record.data} for e in page.entries]

    return asyncio.run(read())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    seed(
        tmp_path,
        [
            AuditRecord("chat.turn", "contoso", "alice", "c-1", {"question": "Leave?"}, T0),
            AuditRecord("tool.call", "contoso", "bob", "c-2", {"tool": "lookup"}, T0),
            AuditRecord(
                "tool.approval_decided", "contoso", "bob", None, {}, T0 + timedelta(hours=1)
            ),
            AuditRecord("privacy.erase", "fabrikam", "fred", None, {"counts": {}}, T0),
        ],
    )
    return tmp_path


def json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_list_prints_every_tenants_entries(data: Path) -> None:
    result = lamina(data, "audit", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    titles = [line.strip() for line in lines if "Audit log of tenant" in line]
    assert titles == ["Audit log of tenant contoso", "Audit log of tenant fabrikam"]
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")
    ]
    assert [(row[0], row[2], row[3]) for row in rows if row[0]] == [
        ("1", "chat.turn", "alice"),
        ("2", "tool.call", "bob"),
        ("3", "tool.approval_decided", "bob"),
        ("1", "privacy.erase", "fred"),
    ]


def test_list_as_json_lines_with_the_chain(data: Path) -> None:
    lines = json_lines(lamina(data, "audit", "list", "--tenant", "contoso", "--json"))
    assert [(e["tenant_id"], e["seq"], e["event"]) for e in lines] == [
        ("contoso", 1, "chat.turn"),
        ("contoso", 2, "tool.call"),
        ("contoso", 3, "tool.approval_decided"),
    ]
    assert lines[0]["prev_hash"] == "0" * 64
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert (lines[0]["user_id"], lines[0]["correlation_id"]) == ("alice", "c-1")
    assert lines[0]["data"] == {"question": "Leave?"}
    assert datetime.fromisoformat(lines[0]["at"]) == T0


def test_list_filters(data: Path) -> None:
    def events(*options: str) -> list[str]:
        return [e["event"] for e in json_lines(lamina(data, "audit", "list", "--json", *options))]

    assert events("--event", "tool.") == ["tool.call", "tool.approval_decided"]
    assert events("--user", "bob", "--event", "tool.call") == ["tool.call"]
    assert events("--correlation-id", "c-1") == ["chat.turn"]
    assert events("--since", "90m") == ["tool.approval_decided"]
    assert events("--until", "90m") == ["chat.turn", "tool.call", "privacy.erase"]
    assert events("--tenant", "fabrikam") == ["privacy.erase"]
    assert events("--tenant", "nobody") == []


def test_list_says_when_the_limit_cut_it_short(data: Path) -> None:
    result = lamina(data, "audit", "list", "--json", "--limit", "2")
    assert [e["seq"] for e in json_lines(result)] == [1, 2]
    assert "first 2 entries" in result.stderr


def test_list_refuses_bad_input_with_exit_2(data: Path) -> None:
    result = lamina(data, "audit", "list", "--since", "last tuesday")
    assert result.exit_code == 2
    assert "since must be a span ago" in result.stderr
    too_far = lamina(data, "audit", "list", "--since", "9999999d")
    assert too_far.exit_code == 2
    assert "since '9999999d' is outside the calendar" in too_far.stderr


def test_verify_reports_each_tenants_head(data: Path) -> None:
    result = lamina(data, "audit", "verify")
    assert result.exit_code == 0, result.output
    head = json_lines(lamina(data, "audit", "list", "--tenant", "contoso", "--json"))[-1]
    assert f"contoso: 3 entries intact; head #3 {head['hash']}" in result.stdout
    assert "fabrikam: 1 entry intact" in result.stdout
    empty = lamina(data, "audit", "verify", "--tenant", "nobody")
    assert (empty.exit_code, empty.stdout.strip()) == (0, "nobody: no entries")


def test_verify_exits_1_naming_the_first_bad_entry_of_a_tampered_chain(data: Path) -> None:
    with closing(sqlite3.connect(data / "audit.db")) as db, db:
        db.execute("DROP TRIGGER audit_log_no_delete")
        db.execute("DELETE FROM audit_log WHERE tenant_id = 'contoso' AND seq = 2")
    result = lamina(data, "audit", "verify")
    assert result.exit_code == 1
    assert "contoso: BROKEN at entry 2: entry 2 is missing" in result.stderr
    assert "fabrikam: 1 entry intact" in result.stdout
    assert lamina(data, "audit", "verify", "--tenant", "fabrikam").exit_code == 0


def test_key_changes_are_recorded_without_the_key(tmp_path: Path) -> None:
    created = lamina(tmp_path, "keys", "create", "--tenant", "contoso", "--name", "billing")
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    key_id = key.split("_")[1]
    rotated = lamina(tmp_path, "keys", "rotate", key_id, "--grace", "1h")
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.stdout.strip()
    new_id = new_key.split("_")[1]
    assert lamina(tmp_path, "keys", "revoke", new_id).exit_code == 0
    assert lamina(tmp_path, "keys", "revoke", new_id).exit_code == 0  # already revoked

    changes = stored(tmp_path, "contoso")
    assert [(c["event"], c["key_id"]) for c in changes] == [
        ("admin.key_created", key_id),
        ("admin.key_rotated", key_id),
        ("admin.key_revoked", new_id),
    ]
    assert changes[1]["new_key_id"] == new_id and changes[1]["grace_s"] == 3600
    listed = lamina(tmp_path, "audit", "list", "--json")
    assert "cli:" in listed.stdout
    for secret in (key, new_key, key.split("_", 2)[2], new_key.split("_", 2)[2]):
        assert secret not in listed.stdout


def test_an_auditor_recomputes_the_chain_from_the_json_lines_alone(data: Path) -> None:
    """As docs/audit.md tells an auditor to: with hashlib and json only."""
    lines = json_lines(lamina(data, "audit", "list", "--tenant", "contoso", "--json"))
    prev = "0" * 64
    for line in lines:
        at = datetime.fromisoformat(line["at"]).astimezone(UTC).isoformat(timespec="microseconds")
        fields = {k: line[k] for k in ("seq", "tenant_id", "user_id", "event", "correlation_id")}
        canonical = json.dumps(
            {**fields, "at": at, "data": line["data"]}, sort_keys=True, separators=(",", ":")
        )
        assert line["prev_hash"] == prev
        assert line["hash"] == hashlib.sha256((prev + canonical).encode()).hexdigest()
        prev = line["hash"]
