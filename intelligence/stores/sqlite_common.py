"""What the layer's SQLite adapters share: one connection that their operations take one
at a time, write transactions, and a caller's rows a page at a time."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import aiosqlite

from intelligence.contracts import Principal, RetentionPolicy


class SerialisedSqliteStore:
    """Base of a store that keeps one aiosqlite connection (``_db``, set by its ``open``).

    Every operation holds one lock: the store shares a single connection, and a write
    of one coroutine must not be read (or committed) half-way by another. Writes run as
    ``BEGIN IMMEDIATE`` transactions, so processes sharing the file serialise too."""

    _kind = "store"
    """What the store is called in the error raised while it is not open."""

    def __init__(self) -> None:
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"{self._kind} is not open")
        return self._db

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self._connection

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._connection
            try:
                # BEGIN inside the try: a caller cancelled while it awaits BEGIN (a turn's
                # heartbeat, stopped) leaves it running on the connection's thread, and
                # the rollback, queued behind it, must close it (a no-op when none began).
                # Else the shared connection stays in a transaction and every later write
                # fails with "cannot start a transaction within a transaction".
                await db.execute("BEGIN IMMEDIATE")
                yield db
                # COMMIT inside the try as well: SQLite may refuse it and keep the
                # transaction open (a deferred constraint, SQLITE_BUSY outside WAL).
                await db.commit()
            except BaseException:
                await db.rollback()
                raise

    async def _newest_first(
        self,
        table: str,
        sort_column: str,
        principal: Principal,
        *,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[aiosqlite.Row], str | None]:
        """One page of the caller's rows of ``table``, the latest ``sort_column`` (then
        ``id``) first, and the cursor of the next page (``None`` on the last). Raises
        ``ValueError`` for a cursor this method did not make. ``table`` and
        ``sort_column`` are the adapter's own names, never input."""
        after = _decode_cursor(cursor)
        query = f"SELECT * FROM {table} WHERE tenant_id = ? AND user_id = ?"
        params: list[object] = [principal.tenant_id, principal.user_id]
        if after is not None:
            query += f" AND ({sort_column}, id) < (?, ?)"
            params += list(after)
        query += f" ORDER BY {sort_column} DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        async with self._reading() as db, db.execute(query, params) as rows:
            found = list(await rows.fetchall())
        items = found[:limit]
        # The cursor carries the stored text of the sort key, so the next page's
        # comparison sees exactly what the database holds.
        next_cursor = (
            _encode_cursor(items[-1][sort_column], items[-1]["id"]) if len(found) > limit else None
        )
        return items, next_cursor


def _encode_cursor(sort_key: str, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{sort_key}|{row_id}".encode()).decode()


def _decode_cursor(cursor: str | None) -> tuple[str, str] | None:
    if not cursor:
        return None
    try:
        sort_key, row_id = base64.urlsafe_b64decode(cursor).decode().split("|", 1)
        datetime.fromisoformat(sort_key)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    return sort_key, row_id


def retention_scopes(policy: RetentionPolicy) -> list[tuple[str, list[object], float]]:
    """The policy as SQL: a ``WHERE`` condition on ``tenant_id``, its parameters, and the
    retention period in seconds, one per period that deletes anything."""
    scopes: list[tuple[str, list[object], float]] = [
        ("tenant_id = ?", [tenant], seconds)
        for tenant, seconds in policy.tenants.items()
        if seconds is not None
    ]
    if policy.default_s is not None:
        listed = list(policy.tenants)
        others = f"tenant_id NOT IN ({', '.join('?' * len(listed))})" if listed else "1"
        scopes.append((others, list(listed), policy.default_s))
    return scopes
