"""Embedded SQLite adapter of the audit log (its own file, ``<data_dir>/audit.db``).

One table, ``audit_log``, keyed by (tenant, seq): each tenant's hash chain
(:mod:`intelligence.audit_chain`). An append is one ``BEGIN IMMEDIATE`` transaction that
reads the tenant's head and inserts the next entry, so any number of processes may append
to one file without forking a chain; the primary key refuses a second entry at a position
even if something else wrote to the file. The adapter has no update or delete, and
triggers make the table refuse both (defence in depth: whoever can write the file can drop
a trigger, which the chain then still exposes).

A file written before the log was chained (a table ``audit_log`` without hash columns) is
upgraded in place when opened: its rows are chained in the order they were written, each
tenant's from seq 1, in the same transaction that replaces the table. The old writer let
NaN and the infinities through as bare ``NaN`` / ``Infinity``, which are not JSON: they
are chained as the text the log now stores for them
(:func:`~intelligence.audit_chain.stored_record`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from intelligence.audit_chain import GENESIS, ChainCheck, event_bounds, link
from intelligence.contracts import (
    AuditEntry,
    AuditPage,
    AuditQuery,
    AuditRecord,
    ChainVerification,
)
from intelligence.stores.sqlite_common import SerialisedSqliteStore
from intelligence.stores.stamps import stamp

T = TypeVar("T")

_TABLE = """
CREATE TABLE IF NOT EXISTS audit_log (
    tenant_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    user_id TEXT NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
) WITHOUT ROWID
"""
_SCHEMA = (
    _TABLE,
    "CREATE INDEX IF NOT EXISTS audit_log_event ON audit_log (tenant_id, event, seq)",
    "CREATE INDEX IF NOT EXISTS audit_log_user ON audit_log (tenant_id, user_id, seq)",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)
_UNCHAINED = "audit_log_unchained"
"""Where an unchained table waits while its rows are chained (inside one transaction)."""

_VERIFY_PAGE = 1000


async def _shielded(write: Coroutine[Any, Any, T]) -> T:
    """Run a write to its end even when its caller is cancelled: a transaction cut off
    between BEGIN and COMMIT would leave the shared connection inside it."""
    return await asyncio.shield(write)


class SqliteAuditLog(SerialisedSqliteStore):
    """The audit log in one SQLite file: append, query and verify, never change."""

    _kind = "audit log"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    async def open(self) -> None:
        if self._db is not None:
            return
        await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
        # Autocommit: every write below opens its own IMMEDIATE transaction.
        db = await aiosqlite.connect(self._path, isolation_level=None, timeout=30.0)
        db.row_factory = aiosqlite.Row
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            self._db = db
            await _shielded(self._create_or_upgrade())
        except BaseException:
            self._db = None
            await db.close()
            raise

    async def _create_or_upgrade(self) -> None:
        # IMMEDIATE: of two processes opening one old file, one chains it, the other then
        # finds it chained.
        async with self._writing() as db:
            async with db.execute("PRAGMA table_info(audit_log)") as rows:
                columns = {row["name"] for row in await rows.fetchall()}
            unchained = bool(columns) and "hash" not in columns
            if unchained:
                await db.execute(f"ALTER TABLE audit_log RENAME TO {_UNCHAINED}")
            for statement in _SCHEMA:
                await db.execute(statement)
            if unchained:
                await _chain_unchained(db)

    # --- the port -------------------------------------------------------------------

    async def append(self, record: AuditRecord) -> AuditEntry:
        return await _shielded(self._append(record))

    async def _append(self, record: AuditRecord) -> AuditEntry:
        async with self._writing() as db:
            return await _insert_next(db, record, await _head(db, record.tenant_id))

    async def query(self, query: AuditQuery) -> AuditPage:
        sql = "SELECT * FROM audit_log WHERE tenant_id = ? AND seq > ?"
        params: list[object] = [query.tenant_id, query.after_seq]
        if query.event is not None:
            bounds = event_bounds(query.event)
            if bounds is None:
                sql += " AND event = ?"
                params.append(query.event)
            else:
                sql += " AND event >= ? AND event < ?"
                params += list(bounds)
        for column, value in (
            ("user_id", query.user_id),
            ("correlation_id", query.correlation_id),
        ):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if query.since is not None:
            sql += " AND at >= ?"
            params.append(stamp(query.since))
        if query.until is not None:
            sql += " AND at < ?"
            params.append(stamp(query.until))
        limit = max(1, query.limit)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit + 1)
        async with self._reading() as db, db.execute(sql, params) as rows:
            found = [_entry(row) for row in await rows.fetchall()]
        entries = tuple(found[:limit])
        return AuditPage(entries, entries[-1].seq if len(found) > limit else None)

    async def verify(self, tenant_id: str) -> ChainVerification:
        check = ChainCheck(tenant_id)
        after = 0
        while True:
            async with (
                self._reading() as db,
                db.execute(
                    "SELECT * FROM audit_log WHERE tenant_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (tenant_id, after, _VERIFY_PAGE),
                ) as rows,
            ):
                page = list(await rows.fetchall())
            for row in page:
                try:
                    entry = _entry(row)
                except ValueError:
                    check.add_unreadable(row["seq"])
                    return check.result()
                if not check.add(entry):
                    return check.result()
            if len(page) < _VERIFY_PAGE:
                return check.result()
            after = page[-1]["seq"]

    async def tenants(self) -> list[str]:
        async with (
            self._reading() as db,
            db.execute("SELECT DISTINCT tenant_id FROM audit_log ORDER BY tenant_id") as rows,
        ):
            return [row["tenant_id"] for row in await rows.fetchall()]


# --- statements (run inside the store's lock) ---------------------------------------------


async def _head(db: aiosqlite.Connection, tenant_id: str) -> tuple[int, str]:
    """The seq and hash of the tenant's last entry; (0, GENESIS) before the first."""
    async with db.execute(
        "SELECT seq, hash FROM audit_log WHERE tenant_id = ? ORDER BY seq DESC LIMIT 1",
        (tenant_id,),
    ) as rows:
        row = await rows.fetchone()
    return (0, GENESIS) if row is None else (row["seq"], row["hash"])


async def _insert_next(
    db: aiosqlite.Connection, record: AuditRecord, head: tuple[int, str]
) -> AuditEntry:
    seq, prev_hash = head
    entry = link(record, seq + 1, prev_hash)
    kept = entry.record
    await db.execute(
        "INSERT INTO audit_log (tenant_id, seq, at, event, user_id, correlation_id, data,"
        " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            kept.tenant_id,
            entry.seq,
            stamp(kept.at),
            kept.event,
            kept.user_id,
            kept.correlation_id,
            json.dumps(kept.data, sort_keys=True, separators=(",", ":")),
            entry.prev_hash,
            entry.hash,
        ),
    )
    return entry


async def _chain_unchained(db: aiosqlite.Connection) -> None:
    """Chain the rows of a table written before the log was chained, in the order they
    were written, then drop that table."""
    heads: dict[str, tuple[int, str]] = {}
    async with db.execute(f"SELECT * FROM {_UNCHAINED} ORDER BY seq") as rows:
        old_rows: Sequence[aiosqlite.Row] = list(await rows.fetchall())
    for row in old_rows:
        at = datetime.fromisoformat(row["at"])
        record = AuditRecord(
            event=row["event"],
            tenant_id=row["tenant_id"],
            user_id=row["user_id"],
            correlation_id=row["correlation_id"],
            data=json.loads(row["data"]),  # NaN and Infinity included
            # Written as isoformat() of an aware time; a naive one can only have been UTC.
            at=at if at.tzinfo is not None else at.replace(tzinfo=UTC),
        )
        entry = await _insert_next(db, record, heads.get(record.tenant_id, (0, GENESIS)))
        heads[record.tenant_id] = (entry.seq, entry.hash)
    await db.execute(f"DROP TABLE {_UNCHAINED}")


def _entry(row: aiosqlite.Row) -> AuditEntry:
    """The stored entry; ``ValueError`` when its time or data is not what an append
    writes (the file was edited). That includes a bare ``NaN`` or ``Infinity``: an append
    stores them as text, and reading them back as numbers would hash them as that text
    again, hiding the edit."""
    return AuditEntry(
        record=AuditRecord(
            event=row["event"],
            tenant_id=row["tenant_id"],
            user_id=row["user_id"],
            correlation_id=row["correlation_id"],
            data=json.loads(row["data"], parse_constant=_not_json),
            at=datetime.fromisoformat(row["at"]),
        ),
        seq=row["seq"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")
