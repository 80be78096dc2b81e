"""The SQLite audit log: the contract suite, with tampering done in the file itself, and
what is SQLite's own: triggers, the upgrade of an unchained file, several processes."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from intelligence.contracts import AuditEntry, AuditLog, AuditQuery, AuditRecord
from intelligence.stores.sqlite_audit import SqliteAuditLog
from intelligence.stores.stamps import stamp
from tests.intelligence.stores.audit_contract import AuditLogContract, everything, record
from tests.support.lifecycle import opened
from tests.support.processes import REPO

_COLUMNS = {"event": "event", "user_id": "user_id", "at": "at", "data": "data"}


class SqliteTamperer:
    """Edits ``audit.db`` with the sqlite3 module, dropping the append-only triggers
    first, as anyone who can write the file could."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _run(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
            db.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
            for sql, params in statements:
                db.execute(sql, params)

    async def set(self, tenant: str, seq: int, field: str, value: Any) -> None:
        if isinstance(value, datetime):
            value = stamp(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        column = {"prev_hash": "prev_hash", **_COLUMNS}[field]
        self._run(
            (
                f"UPDATE audit_log SET {column} = ? WHERE tenant_id = ? AND seq = ?",
                (value, tenant, seq),
            )
        )

    async def remove(self, tenant: str, seq: int) -> None:
        self._run(("DELETE FROM audit_log WHERE tenant_id = ? AND seq = ?", (tenant, seq)))

    async def swap(self, tenant: str, a: int, b: int) -> None:
        move = "UPDATE audit_log SET seq = ? WHERE tenant_id = ? AND seq = ?"
        self._run((move, (-1, tenant, a)), (move, (a, tenant, b)), (move, (b, tenant, -1)))

    async def put(self, entry: AuditEntry) -> None:
        r = entry.record
        self._run(
            (
                "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.tenant_id,
                    entry.seq,
                    stamp(r.at),
                    r.event,
                    r.user_id,
                    r.correlation_id,
                    json.dumps(dict(r.data)),
                    entry.prev_hash,
                    entry.hash,
                ),
            )
        )


class TestSqliteAuditLog(AuditLogContract):
    @pytest.fixture
    async def log(self, tmp_path: Path) -> AsyncIterator[SqliteAuditLog]:
        async with opened(SqliteAuditLog(tmp_path / "audit.db")) as log:
            yield log

    @pytest.fixture
    async def replicas(self, tmp_path: Path, log: SqliteAuditLog) -> AsyncIterator[list[AuditLog]]:
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(opened(SqliteAuditLog(tmp_path / "audit.db")))
                for _ in range(3)
            ]

    @pytest.fixture
    def tamper(self, tmp_path: Path) -> SqliteTamperer:
        return SqliteTamperer(tmp_path / "audit.db")


async def test_the_table_refuses_update_and_delete(tmp_path: Path) -> None:
    async with opened(SqliteAuditLog(tmp_path / "audit.db")) as log:
        await log.append(record())
    with closing(sqlite3.connect(tmp_path / "audit.db")) as db:
        for statement in ("UPDATE audit_log SET user_id = 'mallory'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
        assert db.execute("SELECT user_id FROM audit_log").fetchall() == [("alice",)]


async def test_the_chain_continues_after_reopening(tmp_path: Path) -> None:
    async with opened(SqliteAuditLog(tmp_path / "audit.db")) as log:
        first = await log.append(record())
    async with opened(SqliteAuditLog(tmp_path / "audit.db")) as log:
        second = await log.append(record(minute=1))
        assert (second.seq, second.prev_hash) == (2, first.hash)
        assert (await log.verify("contoso")).intact


async def test_a_bare_nan_edited_into_the_file_is_a_modification(tmp_path: Path) -> None:
    """An append stores NaN as the text "NaN"; a bare NaN would hash as that same text,
    so reading one back as a number would hide the edit."""
    path = tmp_path / "audit.db"
    async with opened(SqliteAuditLog(path)) as log:
        await log.append(record("tool.call", amount=math.nan))
        await log.append(record(minute=1))
        assert (await log.verify("contoso")).intact
        await SqliteTamperer(path).set("contoso", 1, "data", {"amount": math.nan})
        result = await log.verify("contoso")
        assert (result.intact, result.first_bad_seq) == (False, 1)
        assert result.problem and "modified" in result.problem


# --- upgrading a file written before the log was chained -----------------------------------

_UNCHAINED_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY);
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL
);
"""


def unchained_file(path: Path, rows: list[AuditRecord]) -> None:
    """An ``audit.db`` as the log wrote it before it was chained."""
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(_UNCHAINED_SCHEMA)
        for r in rows:
            db.execute(
                "INSERT INTO audit_log (at, event, tenant_id, user_id, correlation_id, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    r.at.isoformat(),
                    r.event,
                    r.tenant_id,
                    r.user_id,
                    r.correlation_id,
                    json.dumps(r.data, default=str),
                ),
            )


async def test_an_unchained_file_is_chained_in_the_order_it_was_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    old = [
        record("chat.turn", minute=0, correlation_id="c-1"),
        record("privacy.erase", tenant="fabrikam", minute=1, counts={"conversations": 2}),
        record("tool.call", minute=2, user="bob", tool="lookup"),
        AuditRecord("chat.turn", "contoso", "carol", None, {}, datetime(2024, 5, 1, 8, 0)),
    ]
    unchained_file(path, old)

    async with opened(SqliteAuditLog(path)) as log:
        contoso = await everything(log, "contoso")
        assert [(e.seq, e.record.event, e.record.user_id) for e in contoso] == [
            (1, "chat.turn", "alice"),
            (2, "tool.call", "bob"),
            (3, "chat.turn", "carol"),
        ]
        assert contoso[0].record.correlation_id == "c-1"
        assert contoso[1].record.data == {"tool": "lookup"}
        # A time written without its zone was UTC.
        assert contoso[2].record.at == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
        [erasure] = await everything(log, "fabrikam")
        assert (erasure.seq, erasure.record.data) == (1, {"counts": {"conversations": 2}})
        for tenant in ("contoso", "fabrikam"):
            assert (await log.verify(tenant)).intact
        appended = await log.append(record(minute=9))
        assert (appended.seq, appended.prev_hash) == (4, contoso[-1].hash)

    async with opened(SqliteAuditLog(path)) as log:  # opening again changes nothing
        assert [e.seq for e in await everything(log, "contoso")] == [1, 2, 3, 4]
        assert (await log.verify("contoso")).entries == 4
    with closing(sqlite3.connect(path)) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "audit_log_unchained" not in tables and "audit_log" in tables


async def test_an_unchained_row_holding_nan_is_chained_with_it_as_text(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    odd = {"amount": math.nan, "cap": math.inf, "floor": -math.inf}
    unchained_file(path, [record("tool.call", tool="pay", arguments=odd), record(minute=1)])
    with closing(sqlite3.connect(path)) as db:
        [(written,)] = db.execute("SELECT data FROM audit_log WHERE seq = 1").fetchall()
    assert '"amount": NaN' in written  # as the old writer left it: not JSON

    async with opened(SqliteAuditLog(path)) as log:
        first, second = await everything(log, "contoso")
        assert first.record.data == {
            "tool": "pay",
            "arguments": {"amount": "NaN", "cap": "Infinity", "floor": "-Infinity"},
        }
        assert (second.seq, second.prev_hash) == (2, first.hash)
        result = await log.verify("contoso")
        assert (result.intact, result.entries) == (True, 2), result.problem


# --- several processes, one file ----------------------------------------------------------

_APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from pathlib import Path

    from intelligence.contracts import AuditRecord
    from intelligence.stores.sqlite_audit import SqliteAuditLog

    async def main(path: str, writer: str) -> None:
        log = SqliteAuditLog(Path(path))
        await log.open()
        try:
            for n in range(25):
                await log.append(
                    AuditRecord("chat.turn", "contoso", writer, None, {"n": n}, datetime.now(UTC))
                )
        finally:
            await log.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.slow
async def test_processes_appending_to_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with opened(SqliteAuditLog(path)):
        pass  # the file exists before the writers race to open it
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _APPENDER, str(path), f"writer-{i}", cwd=REPO
        )
        for i in range(4)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(w.wait() for w in writers)), timeout=120)
    assert codes == [0, 0, 0, 0]

    async with opened(SqliteAuditLog(path)) as log:
        result = await log.verify("contoso")
        assert (result.intact, result.entries) == (True, 100), result.problem
        page = await log.query(AuditQuery("contoso", limit=1000))
        by_writer = {
            w: [e.record.data["n"] for e in page.entries if e.record.user_id == w]
            for w in {e.record.user_id for e in page.entries}
        }
        assert by_writer == {f"writer-{i}": list(range(25)) for i in range(4)}
