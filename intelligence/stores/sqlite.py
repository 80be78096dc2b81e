"""Embedded SQLite adapter of the conversation store."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import aiosqlite
from pydantic import TypeAdapter

from intelligence.contracts import (
    AnswerRating,
    Citation,
    Conversation,
    ConversationExport,
    ConversationMessage,
    ConversationPage,
    MessageStatus,
    NewTurn,
    Plan,
    Principal,
    RetentionPolicy,
    TurnExplanation,
    TurnRecord,
)
from intelligence.stores.sqlite_common import SerialisedSqliteStore, retention_scopes
from intelligence.stores.stamps import now_stamp, stamp

_CITATIONS = TypeAdapter(tuple[Citation, ...])
_PLAN: TypeAdapter[Plan | None] = TypeAdapter(Plan | None)
_EXPLANATION: TypeAdapter[TurnExplanation] = TypeAdapter(TurnExplanation)
_RATING: TypeAdapter[AnswerRating] = TypeAdapter(AnswerRating)

_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    summary_through TEXT
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
    created_at TEXT NOT NULL,
    lease_until TEXT,
    attempt TEXT,
    explanation TEXT,
    feedback TEXT
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, seq);
"""

_ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "conversations": (("summary", "TEXT NOT NULL DEFAULT ''"), ("summary_through", "TEXT")),
    "messages": (
        ("lease_until", "TEXT"),
        ("attempt", "TEXT"),
        ("explanation", "TEXT"),
        ("feedback", "TEXT"),
    ),
}
"""Columns later versions added: a database made by an earlier version gains them on open."""

_SCHEMA_OF_TURNS = """
CREATE TABLE IF NOT EXISTS turns (
    reply_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    user_message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS turns_key ON turns (tenant_id, user_id, idempotency_key);
CREATE INDEX IF NOT EXISTS turns_user_message ON turns (user_message_id);
CREATE INDEX IF NOT EXISTS turns_conversation ON turns (conversation_id);
CREATE INDEX IF NOT EXISTS messages_lease ON messages (status, lease_until);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created_at);
"""

_KEEP_FOREVER = RetentionPolicy()

_OWNED = "SELECT id FROM conversations WHERE tenant_id = ? AND user_id = ?"


class _Database(SerialisedSqliteStore):
    """One aiosqlite connection per store; SQLite serialises writers anyway."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    async def open(self) -> None:
        if self._db is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        self._db.row_factory = aiosqlite.Row
        await self._db.executescript(_SCHEMA)
        await self._db.commit()
        await self._migrate(self._db)

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        # IMMEDIATE: two processes opening one old file at once must not both add a column.
        await db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in _ADDED_COLUMNS.items():
                async with db.execute(f"PRAGMA table_info({table})") as rows:
                    present = {row["name"] for row in await rows.fetchall()}
                for name, declaration in columns:
                    if name not in present:
                        await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                        if (table, name) == ("messages", "lease_until"):
                            # Written by a version without leases, whose process is gone:
                            # such a reply counts as abandoned from the moment it began.
                            await db.execute(
                                "UPDATE messages SET lease_until = created_at WHERE status = ?",
                                (MessageStatus.STREAMING.value,),
                            )
        except BaseException:
            await db.rollback()
            raise
        await db.commit()
        await db.executescript(_SCHEMA_OF_TURNS)


class SqliteConversationStore(_Database):
    """Conversations scoped to (tenant, user): every query carries both; its operations
    take the connection one at a time (see :class:`SerialisedSqliteStore`)."""

    def __init__(self, path: Path, *, retention: RetentionPolicy = _KEEP_FOREVER) -> None:
        super().__init__(path)
        self._retention = retention

    # --- conversations and messages -------------------------------------------------

    async def get(self, principal: Principal, conversation_id: str) -> Conversation | None:
        async with self._reading() as db:
            row = await _owned_conversation(db, principal, conversation_id)
        return _conversation(row) if row else None

    async def list_conversations(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> ConversationPage:
        items, next_cursor = await self._newest_first(
            "conversations", "updated_at", principal, limit=limit, cursor=cursor
        )
        return ConversationPage(tuple(_conversation(r) for r in items), next_cursor)

    async def delete(self, principal: Principal, conversation_id: str) -> bool:
        async with self._writing() as db:
            cursor = await db.execute(
                "DELETE FROM conversations WHERE id = ? AND tenant_id = ? AND user_id = ?",
                (conversation_id, principal.tenant_id, principal.user_id),
            )
        return cursor.rowcount > 0

    async def rename(self, principal: Principal, conversation_id: str, title: str) -> bool:
        async with self._writing() as db:
            cursor = await db.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND tenant_id = ? AND user_id = ?",
                (title, conversation_id, principal.tenant_id, principal.user_id),
            )
        return cursor.rowcount > 0

    async def finish_message(
        self,
        principal: Principal,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        citations: Sequence[Citation] = (),
        plan: Plan | None = None,
        attempt: str | None = None,
        explanation: TurnExplanation | None = None,
    ) -> bool:
        async with self._writing() as db:
            cursor = await db.execute(
                "UPDATE messages SET content = ?, status = ?, citations = ?, plan = ?,"
                f" explanation = ? WHERE id = ? AND conversation_id IN ({_OWNED})"
                " AND (? IS NULL OR attempt = ?)",
                (
                    content,
                    status.value,
                    _CITATIONS.dump_json(tuple(citations)).decode(),
                    _PLAN.dump_json(plan).decode(),
                    _EXPLANATION.dump_json(explanation).decode() if explanation else None,
                    message_id,
                    principal.tenant_id,
                    principal.user_id,
                    attempt,
                    attempt,
                ),
            )
        return cursor.rowcount > 0

    async def messages(
        self, principal: Principal, conversation_id: str, *, last: int | None = None
    ) -> list[ConversationMessage]:
        query = (
            "SELECT * FROM messages WHERE conversation_id ="
            " (SELECT id FROM conversations WHERE id = ? AND tenant_id = ? AND user_id = ?)"
            " ORDER BY seq DESC"
        )
        params: list[object] = [conversation_id, principal.tenant_id, principal.user_id]
        if last is not None:
            query += " LIMIT ?"
            params.append(last)
        async with self._reading() as db, db.execute(query, params) as rows:
            found = [_message(r) for r in await rows.fetchall()]
        return list(reversed(found))

    async def rate(
        self, principal: Principal, conversation_id: str, message_id: str, rating: AnswerRating
    ) -> ConversationMessage | None:
        async with self._writing() as db:
            # Read and write in one transaction: a racing rating sees this one or none.
            async with db.execute(
                "SELECT * FROM messages WHERE id = ? AND conversation_id = ?"
                " AND role = 'assistant' AND status IN (?, ?, ?)"
                f" AND conversation_id IN ({_OWNED})",
                (
                    message_id,
                    conversation_id,
                    MessageStatus.COMPLETE.value,
                    MessageStatus.INTERRUPTED.value,
                    MessageStatus.FAILED.value,
                    principal.tenant_id,
                    principal.user_id,
                ),
            ) as rows:
                before = await rows.fetchone()
            if before is None:
                return None
            await db.execute(
                "UPDATE messages SET feedback = ? WHERE id = ?",
                (_RATING.dump_json(rating).decode(), message_id),
            )
        return _message(before)

    # --- turns ----------------------------------------------------------------------

    async def begin_turn(self, principal: Principal, turn: NewTurn) -> TurnRecord:
        lease_until = stamp(turn.lease_until)
        async with self._writing() as db:
            # Inside the write transaction: of racing calls with one key, the first to
            # take the lock writes, and every later one finds its turn here.
            if turn.idempotency_key is not None:
                async with db.execute(
                    "SELECT reply_id FROM turns"
                    " WHERE tenant_id = ? AND user_id = ? AND idempotency_key = ?",
                    (principal.tenant_id, principal.user_id, turn.idempotency_key),
                ) as rows:
                    earlier = await rows.fetchone()
                if earlier is not None:
                    record = await _turn_record(db, principal, earlier["reply_id"], created=False)
                    if record is not None:
                        return record
                    # Its messages expired under the retention policy: the key is free.
                    await db.execute("DELETE FROM turns WHERE reply_id = ?", (earlier["reply_id"],))
            now = now_stamp()
            if turn.conversation_id is None:
                conversation_id = uuid.uuid4().hex
                await _insert_conversation(db, conversation_id, principal, turn.title, now)
            else:
                conversation_id = turn.conversation_id
                if await _owned_conversation(db, principal, conversation_id) is None:
                    raise LookupError("no such conversation for this caller")
                await _touch(db, conversation_id, now)
            user_message_id, reply_id = uuid.uuid4().hex, uuid.uuid4().hex
            await _insert_message(
                db,
                user_message_id,
                conversation_id,
                "user",
                turn.question,
                MessageStatus.COMPLETE,
                now,
            )
            await _insert_message(
                db,
                reply_id,
                conversation_id,
                "assistant",
                "",
                MessageStatus.STREAMING,
                now,
                lease_until=lease_until,
                attempt=uuid.uuid4().hex,
            )
            await db.execute(
                "INSERT INTO turns (reply_id, user_message_id, conversation_id, tenant_id,"
                " user_id, idempotency_key, request_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    reply_id,
                    user_message_id,
                    conversation_id,
                    principal.tenant_id,
                    principal.user_id,
                    turn.idempotency_key,
                    turn.request_hash,
                ),
            )
            record = await _turn_record(db, principal, reply_id, created=True)
        if record is None:  # pragma: no cover - written in this very transaction
            raise RuntimeError("the turn just written could not be read back")
        return record

    async def find_turn(self, principal: Principal, idempotency_key: str) -> TurnRecord | None:
        async with self._reading() as db:
            async with db.execute(
                "SELECT reply_id FROM turns"
                " WHERE tenant_id = ? AND user_id = ? AND idempotency_key = ?",
                (principal.tenant_id, principal.user_id, idempotency_key),
            ) as rows:
                found = await rows.fetchone()
            if found is None:
                return None
            return await _turn_record(db, principal, found["reply_id"], created=False)

    async def renew_turn(
        self,
        principal: Principal,
        reply_id: str,
        content: str,
        lease_until: datetime,
        *,
        attempt: str,
    ) -> bool:
        async with self._writing() as db:
            cursor = await db.execute(
                "UPDATE messages SET content = ?, lease_until = ?"
                " WHERE id = ? AND role = 'assistant' AND status = ? AND attempt = ?"
                f" AND conversation_id IN ({_OWNED})",
                (
                    content,
                    stamp(lease_until),
                    reply_id,
                    MessageStatus.STREAMING.value,
                    attempt,
                    principal.tenant_id,
                    principal.user_id,
                ),
            )
        return cursor.rowcount > 0

    async def retry_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime, *, now: datetime
    ) -> TurnRecord | None:
        async with self._writing() as db:
            # One conditional UPDATE is the claim: of racing retries only one matches.
            cursor = await db.execute(
                "UPDATE messages SET content = '', status = ?, citations = '[]', plan = NULL,"
                " explanation = NULL, feedback = NULL, lease_until = ?, attempt = ?"
                " WHERE id = ? AND role = 'assistant'"
                " AND (status IN (?, ?) OR (status = ? AND lease_until < ?))"
                f" AND conversation_id IN ({_OWNED})",
                (
                    MessageStatus.STREAMING.value,
                    stamp(lease_until),
                    uuid.uuid4().hex,
                    reply_id,
                    MessageStatus.INTERRUPTED.value,
                    MessageStatus.FAILED.value,
                    MessageStatus.STREAMING.value,
                    stamp(now),
                    principal.tenant_id,
                    principal.user_id,
                ),
            )
            if cursor.rowcount == 0:
                return None
            return await _turn_record(db, principal, reply_id, created=True)

    async def resume_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime
    ) -> TurnRecord | None:
        async with self._writing() as db:
            cursor = await db.execute(
                "UPDATE messages SET status = ?, lease_until = ?, attempt = ?"
                " WHERE id = ? AND role = 'assistant' AND status = ?"
                f" AND conversation_id IN ({_OWNED})",
                (
                    MessageStatus.STREAMING.value,
                    stamp(lease_until),
                    uuid.uuid4().hex,
                    reply_id,
                    MessageStatus.AWAITING_APPROVAL.value,
                    principal.tenant_id,
                    principal.user_id,
                ),
            )
            if cursor.rowcount == 0:
                return None
            return await _turn_record(db, principal, reply_id, created=True)

    async def interrupt_abandoned(self, now: datetime) -> int:
        async with self._writing() as db:
            cursor = await db.execute(
                "UPDATE messages SET status = ? WHERE status = ? AND lease_until < ?",
                (MessageStatus.INTERRUPTED.value, MessageStatus.STREAMING.value, stamp(now)),
            )
        return cursor.rowcount

    # --- memory ---------------------------------------------------------------------

    async def save_summary(
        self, principal: Principal, conversation_id: str, summary: str, through_message_id: str
    ) -> None:
        # updated_at stays: a summary is housekeeping, not activity that reorders the list.
        async with self._writing() as db:
            await db.execute(
                "UPDATE conversations SET summary = ?, summary_through = ?"
                " WHERE id = ? AND tenant_id = ? AND user_id = ?",
                (
                    summary,
                    through_message_id,
                    conversation_id,
                    principal.tenant_id,
                    principal.user_id,
                ),
            )

    # --- retention and data-subject rights ---------------------------------------------

    async def purge_expired(self, now: datetime) -> int:
        purged = 0
        async with self._writing() as db:
            for where, params, seconds in retention_scopes(self._retention):
                cutoff = stamp(now - timedelta(seconds=seconds))
                cursor = await db.execute(
                    "DELETE FROM messages WHERE created_at < ? AND conversation_id IN"
                    f" (SELECT id FROM conversations WHERE {where})",
                    [cutoff, *params],
                )
                purged += cursor.rowcount
                # Emptied and untouched since the cutoff: nothing of it is left to keep.
                await db.execute(
                    f"DELETE FROM conversations WHERE {where} AND updated_at < ?"
                    " AND NOT EXISTS"
                    " (SELECT 1 FROM messages WHERE conversation_id = conversations.id)",
                    [*params, cutoff],
                )
            if purged:
                # A summary of messages that are gone would keep what retention deleted.
                await db.execute(
                    "UPDATE conversations SET summary = '', summary_through = NULL"
                    " WHERE summary_through IS NOT NULL AND NOT EXISTS"
                    " (SELECT 1 FROM messages WHERE id = conversations.summary_through)"
                )
        return purged

    async def export_user(self, principal: Principal) -> list[ConversationExport]:
        owner = (principal.tenant_id, principal.user_id)
        async with self._reading() as db:
            async with db.execute(
                "SELECT * FROM conversations WHERE tenant_id = ? AND user_id = ?"
                " ORDER BY created_at, id",
                owner,
            ) as rows:
                conversations = [_conversation(r) for r in await rows.fetchall()]
            async with db.execute(
                f"SELECT * FROM messages WHERE conversation_id IN ({_OWNED}) ORDER BY seq",
                owner,
            ) as rows:
                messages = [_message(r) for r in await rows.fetchall()]
        by_conversation: dict[str, list[ConversationMessage]] = {c.id: [] for c in conversations}
        for message in messages:
            by_conversation[message.conversation_id].append(message)
        return [ConversationExport(c, tuple(by_conversation[c.id])) for c in conversations]

    async def delete_user(self, principal: Principal) -> int:
        owner = (principal.tenant_id, principal.user_id)
        async with self._writing() as db:
            # Messages and turns go with their conversation (ON DELETE CASCADE).
            cursor = await db.execute(
                "DELETE FROM conversations WHERE tenant_id = ? AND user_id = ?", owner
            )
            await db.execute("DELETE FROM turns WHERE tenant_id = ? AND user_id = ?", owner)
        return cursor.rowcount


# --- statements shared by the store's operations (run inside its lock) -----------------


async def _owned_conversation(
    db: aiosqlite.Connection, principal: Principal, conversation_id: str
) -> aiosqlite.Row | None:
    async with db.execute(
        "SELECT * FROM conversations WHERE id = ? AND tenant_id = ? AND user_id = ?",
        (conversation_id, principal.tenant_id, principal.user_id),
    ) as rows:
        return await rows.fetchone()


async def _insert_conversation(
    db: aiosqlite.Connection, conversation_id: str, principal: Principal, title: str, now: str
) -> None:
    await db.execute(
        "INSERT INTO conversations (id, tenant_id, user_id, title, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (conversation_id, principal.tenant_id, principal.user_id, title, now, now),
    )


async def _insert_message(
    db: aiosqlite.Connection,
    message_id: str,
    conversation_id: str,
    role: Literal["user", "assistant"],
    content: str,
    status: MessageStatus,
    now: str,
    *,
    lease_until: str | None = None,
    attempt: str | None = None,
) -> None:
    await db.execute(
        "INSERT INTO messages"
        " (id, conversation_id, role, content, status, created_at, lease_until, attempt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (message_id, conversation_id, role, content, status.value, now, lease_until, attempt),
    )


async def _touch(db: aiosqlite.Connection, conversation_id: str, now: str) -> None:
    await db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))


async def _turn_record(
    db: aiosqlite.Connection, principal: Principal, reply_id: str, *, created: bool
) -> TurnRecord | None:
    """The caller's turn whose reply is ``reply_id``, as stored now."""
    async with db.execute(
        "SELECT m.*, t.user_message_id, t.idempotency_key, t.request_hash"
        " FROM messages m LEFT JOIN turns t ON t.reply_id = m.id"
        f" WHERE m.id = ? AND m.role = 'assistant' AND m.conversation_id IN ({_OWNED})",
        (reply_id, principal.tenant_id, principal.user_id),
    ) as rows:
        reply = await rows.fetchone()
    if reply is None:
        return None
    if reply["user_message_id"] is not None:
        query, params = "SELECT * FROM messages WHERE id = ?", [reply["user_message_id"]]
    else:
        # A reply written before turns were recorded (a database of an earlier version)
        # has no turn row: its question is the user message just before it.
        query = (
            "SELECT * FROM messages WHERE conversation_id = ? AND role = 'user' AND seq < ?"
            " ORDER BY seq DESC LIMIT 1"
        )
        params = [reply["conversation_id"], reply["seq"]]
    async with db.execute(query, params) as rows:
        user_message = await rows.fetchone()
    conversation = await _owned_conversation(db, principal, reply["conversation_id"])
    if user_message is None or conversation is None:
        return None
    status = MessageStatus(reply["status"])
    lease = reply["lease_until"]
    return TurnRecord(
        conversation=_conversation(conversation),
        user_message=_message(user_message),
        reply=_message(reply),
        idempotency_key=reply["idempotency_key"],
        request_hash=reply["request_hash"],
        lease_until=(
            datetime.fromisoformat(lease) if lease and status is MessageStatus.STREAMING else None
        ),
        created=created,
        attempt=reply["attempt"],
    )


def _conversation(row: aiosqlite.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        title=row["title"],
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        summary=row["summary"],
        summary_through=row["summary_through"],
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
        explanation=(
            _EXPLANATION.validate_json(row["explanation"]) if row["explanation"] else None
        ),
        feedback=_RATING.validate_json(row["feedback"]) if row["feedback"] else None,
    )
