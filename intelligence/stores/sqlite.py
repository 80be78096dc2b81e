"""Embedded SQLite adapters for the conversation store and the audit log."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import aiosqlite
from pydantic import TypeAdapter

from intelligence.contracts import (
    AuditRecord,
    Citation,
    Conversation,
    ConversationMessage,
    ConversationPage,
    MessageStatus,
    Plan,
    Principal,
)

_CITATIONS = TypeAdapter(tuple[Citation, ...])
_PLAN: TypeAdapter[Plan | None] = TypeAdapter(Plan | None)

_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner
    ON conversations (tenant_id, user_id, updated_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    citations TEXT NOT NULL DEFAULT '[]',
    plan TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, seq);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class _Database:
    """One aiosqlite connection per store; SQLite serialises writers anyway."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        if self._db is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        self._db.row_factory = aiosqlite.Row
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db


class SqliteConversationStore(_Database):
    """Conversations scoped to (tenant, user): every query carries both."""

    async def create(self, principal: Principal, title: str) -> Conversation:
        now = _now()
        conversation_id = uuid.uuid4().hex
        await self.db.execute(
            "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, principal.tenant_id, principal.user_id, title, now, now),
        )
        await self.db.commit()
        stamp = datetime.fromisoformat(now)
        return Conversation(
            conversation_id, principal.tenant_id, principal.user_id, title, stamp, stamp
        )

    async def get(self, principal: Principal, conversation_id: str) -> Conversation | None:
        async with self.db.execute(
            "SELECT * FROM conversations WHERE id = ? AND tenant_id = ? AND user_id = ?",
            (conversation_id, principal.tenant_id, principal.user_id),
        ) as cursor:
            row = await cursor.fetchone()
        return _conversation(row) if row else None

    async def list_conversations(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> ConversationPage:
        after = _decode_cursor(cursor)
        query = "SELECT * FROM conversations WHERE tenant_id = ? AND user_id = ?"
        params: list[object] = [principal.tenant_id, principal.user_id]
        if after is not None:
            query += " AND (updated_at, id) < (?, ?)"
            params += list(after)
        query += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        async with self.db.execute(query, params) as rows:
            found = [_conversation(r) for r in await rows.fetchall()]
        items = tuple(found[:limit])
        next_cursor = _encode_cursor(items[-1]) if len(found) > limit else None
        return ConversationPage(items, next_cursor)

    async def delete(self, principal: Principal, conversation_id: str) -> bool:
        cursor = await self.db.execute(
            "DELETE FROM conversations WHERE id = ? AND tenant_id = ? AND user_id = ?",
            (conversation_id, principal.tenant_id, principal.user_id),
        )
        await self.db.commit()
        return cursor.rowcount > 0

    async def add_message(
        self,
        principal: Principal,
        conversation_id: str,
        role: Literal["user", "assistant"],
        content: str,
        *,
        status: MessageStatus = MessageStatus.COMPLETE,
    ) -> ConversationMessage:
        if await self.get(principal, conversation_id) is None:
            raise LookupError("no such conversation for this caller")
        now = _now()
        message_id = uuid.uuid4().hex
        try:
            await self.db.execute(
                "INSERT INTO messages (id, conversation_id, role, content, status, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, conversation_id, role, content, status.value, now),
            )
        except aiosqlite.IntegrityError:  # deleted since the ownership check above
            raise LookupError("no such conversation for this caller") from None
        await self.db.execute(
            "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
        )
        await self.db.commit()
        return ConversationMessage(
            message_id, conversation_id, role, content, datetime.fromisoformat(now), status
        )

    async def finish_message(
        self,
        principal: Principal,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        citations: Sequence[Citation] = (),
        plan: Plan | None = None,
    ) -> None:
        await self.db.execute(
            "UPDATE messages SET content = ?, status = ?, citations = ?, plan = ?"
            " WHERE id = ? AND conversation_id IN"
            " (SELECT id FROM conversations WHERE tenant_id = ? AND user_id = ?)",
            (
                content,
                status.value,
                _CITATIONS.dump_json(tuple(citations)).decode(),
                _PLAN.dump_json(plan).decode(),
                message_id,
                principal.tenant_id,
                principal.user_id,
            ),
        )
        await self.db.commit()

    async def messages(
        self, principal: Principal, conversation_id: str, *, last: int | None = None
    ) -> list[ConversationMessage]:
        if await self.get(principal, conversation_id) is None:
            return []
        query = "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq DESC"
        params: list[object] = [conversation_id]
        if last is not None:
            query += " LIMIT ?"
            params.append(last)
        async with self.db.execute(query, params) as rows:
            found = [_message(r) for r in await rows.fetchall()]
        return list(reversed(found))


class SqliteAuditLog(_Database):
    """Append-only: the adapter offers no update or delete."""

    async def append(self, record: AuditRecord) -> None:
        await self.db.execute(
            "INSERT INTO audit_log (at, event, tenant_id, user_id, correlation_id, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.at.isoformat(),
                record.event,
                record.tenant_id,
                record.user_id,
                record.correlation_id,
                json.dumps(record.data, default=str),
            ),
        )
        await self.db.commit()

    async def records(self, *, event: str | None = None) -> list[AuditRecord]:
        query = "SELECT * FROM audit_log"
        params: list[object] = []
        if event is not None:
            query += " WHERE event = ?"
            params.append(event)
        async with self.db.execute(query + " ORDER BY seq", params) as rows:
            return [
                AuditRecord(
                    event=r["event"],
                    tenant_id=r["tenant_id"],
                    user_id=r["user_id"],
                    correlation_id=r["correlation_id"],
                    data=json.loads(r["data"]),
                    at=datetime.fromisoformat(r["at"]),
                )
                for r in await rows.fetchall()
            ]


def _conversation(row: aiosqlite.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        title=row["title"],
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _message(row: aiosqlite.Row) -> ConversationMessage:
    return ConversationMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        created_at=datetime.fromisoformat(row["created_at"]),
        status=MessageStatus(row["status"]),
        citations=_CITATIONS.validate_json(row["citations"]),
        plan=_PLAN.validate_json(row["plan"]) if row["plan"] else None,
    )


def _encode_cursor(conversation: Conversation) -> str:
    raw = f"{conversation.updated_at.isoformat()}|{conversation.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str | None) -> tuple[str, str] | None:
    if not cursor:
        return None
    try:
        updated_at, conversation_id = base64.urlsafe_b64decode(cursor).decode().split("|", 1)
        datetime.fromisoformat(updated_at)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    return updated_at, conversation_id
