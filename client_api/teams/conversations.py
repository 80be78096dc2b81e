"""Which Lamina conversation a Teams conversation continues.

A Lamina conversation belongs to one (tenant, user); a Teams group chat or channel has
many users. So the mapping is per (tenant, Teams conversation, user): in a group chat
each member gets a Lamina conversation of their own, with only their own questions in
its history.

The answers posted are remembered too (Teams message id → Lamina conversation and reply),
so that feedback given on a Teams message lands on the reply it rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from intelligence.contracts import Principal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams_conversations (
    tenant_id TEXT NOT NULL,
    teams_conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    first_activity_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, teams_conversation_id, user_id)
);
CREATE TABLE IF NOT EXISTS teams_replies (
    tenant_id TEXT NOT NULL,
    teams_conversation_id TEXT NOT NULL,
    teams_message_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, teams_conversation_id, teams_message_id)
)
"""


@dataclass(frozen=True, slots=True)
class ConversationLink:
    """The Lamina conversation of one user in one Teams conversation."""

    conversation_id: str
    first_activity_id: str
    """The activity whose turn created the conversation: delivered again, it must be
    asked as it was the first time (without a conversation id), or its idempotency key
    would no longer match its request."""


@dataclass(frozen=True, slots=True)
class PostedReply:
    """The Lamina reply that a Teams message of the bot carries."""

    conversation_id: str
    message_id: str


class TeamsConversationMap:
    """The mapping in SQLite (``teams.db`` in the data directory). It names users and
    their conversations, so it is one of the stores ``/v1/me/data`` goes through."""

    name = "teams"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def find(
        self, tenant_id: str, teams_conversation_id: str, user_id: str
    ) -> ConversationLink | None:
        async with self._conn.execute(
            "SELECT conversation_id, first_activity_id FROM teams_conversations "
            "WHERE tenant_id = ? AND teams_conversation_id = ? AND user_id = ?",
            (tenant_id, teams_conversation_id, user_id),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else ConversationLink(row[0], row[1])

    async def link(
        self,
        tenant_id: str,
        teams_conversation_id: str,
        user_id: str,
        link: ConversationLink,
    ) -> ConversationLink:
        """Record ``link`` unless one exists already; returns the one that holds."""
        await self._conn.execute(
            "INSERT OR IGNORE INTO teams_conversations VALUES (?, ?, ?, ?, ?)",
            (
                tenant_id,
                teams_conversation_id,
                user_id,
                link.conversation_id,
                link.first_activity_id,
            ),
        )
        await self._conn.commit()
        held = await self.find(tenant_id, teams_conversation_id, user_id)
        assert held is not None
        return held

    async def unlink(self, tenant_id: str, teams_conversation_id: str, user_id: str) -> None:
        """Forget the user's Lamina conversation for this Teams conversation (it is gone)."""
        await self._conn.execute(
            "DELETE FROM teams_conversations"
            " WHERE tenant_id = ? AND teams_conversation_id = ? AND user_id = ?",
            (tenant_id, teams_conversation_id, user_id),
        )
        await self._conn.commit()

    async def remember_reply(
        self,
        tenant_id: str,
        teams_conversation_id: str,
        teams_message_ids: Iterable[str],
        reply: PostedReply,
    ) -> None:
        """Record which Lamina reply the Teams messages ``teams_message_ids`` carry."""
        await self._conn.executemany(
            "INSERT OR REPLACE INTO teams_replies VALUES (?, ?, ?, ?, ?)",
            [
                (tenant_id, teams_conversation_id, m, reply.conversation_id, reply.message_id)
                for m in teams_message_ids
            ],
        )
        await self._conn.commit()

    async def reply_of(
        self, tenant_id: str, teams_conversation_id: str, teams_message_id: str
    ) -> PostedReply | None:
        """The Lamina reply a Teams message of ours carries; ``None`` for any other."""
        async with self._conn.execute(
            "SELECT conversation_id, message_id FROM teams_replies "
            "WHERE tenant_id = ? AND teams_conversation_id = ? AND teams_message_id = ?",
            (tenant_id, teams_conversation_id, teams_message_id),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else PostedReply(row[0], row[1])

    async def export_user(self, principal: Principal) -> Any:
        async with self._conn.execute(
            "SELECT teams_conversation_id, conversation_id FROM teams_conversations"
            " WHERE tenant_id = ? AND user_id = ? ORDER BY teams_conversation_id",
            (principal.tenant_id, principal.user_id),
        ) as cursor:
            rows = await cursor.fetchall()
        return [{"teams_conversation_id": t, "conversation_id": c} for t, c in rows]

    async def erase_user(self, principal: Principal) -> int:
        # The answers posted into the user's conversations first: they are found through
        # the user's links, which go next.
        mine = "SELECT conversation_id FROM teams_conversations WHERE tenant_id = ? AND user_id = ?"
        owner = (principal.tenant_id, principal.user_id)
        replies = await self._conn.execute(
            f"DELETE FROM teams_replies WHERE tenant_id = ? AND conversation_id IN ({mine})",
            (principal.tenant_id, *owner),
        )
        links = await self._conn.execute(
            "DELETE FROM teams_conversations WHERE tenant_id = ? AND user_id = ?", owner
        )
        await self._conn.commit()
        return int(links.rowcount) + int(replies.rowcount)

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("TeamsConversationMap is not open")
        return self._db
