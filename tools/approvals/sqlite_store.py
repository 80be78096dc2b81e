"""Approvals in a SQLite file: the embedded :class:`~tools.approvals.store.ApprovalStore`.

One row per approval. Mappings are JSON text, datetimes ISO 8601 text; ``expires_ms``
repeats the expiry as a number so SQL can compare it. The connection runs in
autocommit mode, and every change is one ``UPDATE … WHERE id = ? AND status IN (…)
RETURNING *``: SQLite runs each statement atomically under its write lock, so two
coroutines, two store objects, or two processes on one file cannot both win a
transition. A busy file is waited for (``busy_timeout_s``), not failed at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from tools.approvals.store import (
    DEFAULT_RETENTION,
    ERASED_USER,
    MAPPING_FIELDS,
    NO_CHANGES,
    ApprovalChanges,
    ApprovalStoreUnavailable,
    DuplicateApprovalId,
    decode_approval,
    dump_json,
    encode_approval,
    epoch_ms,
)
from tools.contracts import ApprovalRequest, ApprovalStatus, JsonValue

_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    summary TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    requested_arguments TEXT,
    decided_by TEXT,
    decided_at TEXT,
    reason TEXT,
    resume TEXT NOT NULL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (tenant_id, status, requested_by);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (expires_ms);
"""


def _column_value(name: str, value: JsonValue) -> Any:
    if name in MAPPING_FIELDS and value is not None:
        return dump_json(value)
    return value


def _row_approval(row: aiosqlite.Row) -> ApprovalRequest:
    encoded: dict[str, JsonValue] = {}
    # Iterating a Row yields its values; keys() gives the column names.
    for name in row.keys():  # noqa: SIM118
        value = row[name]
        encoded[name] = json.loads(value) if name in MAPPING_FIELDS and value is not None else value
    return decode_approval(encoded)


class SqliteApprovalStore:
    """Approvals in one SQLite file (default ``<data_dir>/approvals.db``).

    Call :meth:`open` before use and :meth:`close` at shutdown. Approvals older than
    their expiry plus ``retention`` are deleted as new ones are created.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: timedelta = DEFAULT_RETENTION,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self._path = path
        self._retention = retention
        self._busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        """Open (creating if need be) the file and its table; a second call does nothing."""
        if self._db is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each statement is its own transaction
        # and no transaction is left open between two awaits.
        db = await aiosqlite.connect(self._path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            await db.executescript(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the approval store is not open; call open() first")
        return self._db

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[aiosqlite.Connection]:
        db = self._connection
        try:
            yield db
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full, I/O
            raise ApprovalStoreUnavailable() from exc

    async def create(self, approval: ApprovalRequest) -> None:
        encoded = encode_approval(approval)
        columns = [*encoded, "expires_ms"]
        values = [_column_value(name, value) for name, value in encoded.items()]
        values.append(epoch_ms(approval.expires_at))
        forgotten_before = epoch_ms(approval.created_at - self._retention)
        async with self._errors() as db:
            try:
                await db.execute(
                    f"INSERT INTO approvals ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' for _ in columns)})",
                    values,
                )
            except sqlite3.IntegrityError:
                raise DuplicateApprovalId(f"approval {approval.id!r} already exists") from None
            await db.execute("DELETE FROM approvals WHERE expires_ms < ?", (forgotten_before,))

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        async with (
            self._errors() as db,
            db.execute("SELECT * FROM approvals WHERE id = ?", (approval_id,)) as cursor,
        ):
            row = await cursor.fetchone()
        return None if row is None else _row_approval(row)

    async def transition(
        self,
        approval_id: str,
        expected: Collection[ApprovalStatus],
        new: ApprovalStatus,
        changes: ApprovalChanges = NO_CHANGES,
        *,
        unexpired_at: datetime | None = None,
    ) -> ApprovalRequest | None:
        if not expected:
            return None
        updates = {"status": ApprovalStatus(new).value, **changes.encoded()}
        # Column names come from ApprovalChanges' fields, never from input.
        sql = f"UPDATE approvals SET {', '.join(f'{name} = ?' for name in updates)}"
        params: list[Any] = [_column_value(name, value) for name, value in updates.items()]
        statuses = sorted({ApprovalStatus(status).value for status in expected})
        sql += f" WHERE id = ? AND status IN ({', '.join('?' for _ in statuses)})"
        params += [approval_id, *statuses]
        if unexpired_at is not None:
            sql += " AND expires_ms > ?"
            params.append(epoch_ms(unexpired_at))
        return await self._update_one(sql + " RETURNING *", params)

    async def set_outcome(
        self, approval_id: str, outcome: Mapping[str, JsonValue]
    ) -> ApprovalRequest | None:
        return await self._update_one(
            "UPDATE approvals SET outcome = ?"
            " WHERE id = ? AND status = ? AND outcome IS NULL RETURNING *",
            [dump_json(dict(outcome)), approval_id, ApprovalStatus.EXECUTED.value],
        )

    async def list_pending(
        self, tenant_id: str, *, requested_by: str | None = None
    ) -> list[ApprovalRequest]:
        sql = "SELECT * FROM approvals WHERE tenant_id = ? AND status = ?"
        params: list[Any] = [tenant_id, ApprovalStatus.PENDING.value]
        if requested_by is not None:
            sql += " AND requested_by = ?"
            params.append(requested_by)
        async with self._errors() as db, db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        # Sorted here, on datetimes: ISO text sorts wrongly across UTC offsets.
        found = [_row_approval(row) for row in rows]
        return sorted(found, key=lambda approval: (approval.created_at, approval.id))

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        async with self._errors() as db:
            deleted = await db.execute(
                "DELETE FROM approvals WHERE tenant_id = ? AND requested_by = ?",
                (tenant_id, user_id),
            )
            renamed = await db.execute(
                "UPDATE approvals SET decided_by = ? WHERE tenant_id = ? AND decided_by = ?",
                (ERASED_USER, tenant_id, user_id),
            )
        return deleted.rowcount + renamed.rowcount

    async def of_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        async with (
            self._errors() as db,
            db.execute(
                "SELECT * FROM approvals"
                " WHERE tenant_id = ? AND (requested_by = ? OR decided_by = ?)",
                (tenant_id, user_id, user_id),
            ) as cursor,
        ):
            rows = await cursor.fetchall()
        found = [_row_approval(row) for row in rows]
        return sorted(found, key=lambda approval: (approval.created_at, approval.id))

    async def _update_one(self, sql: str, params: list[Any]) -> ApprovalRequest | None:
        async with self._errors() as db, db.execute(sql, params) as cursor:
            # All rows are read before the cursor closes: the statement (and with it
            # the autocommit transaction) ends only then.
            rows = list(await cursor.fetchall())
        return _row_approval(rows[0]) if rows else None
