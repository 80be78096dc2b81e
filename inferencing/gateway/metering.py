"""Usage metering: one record per model call, kept in a ledger, summed for chargeback.

The gateway hands records to a :class:`UsageMeter`, which buffers them in memory
and writes them to its :class:`UsageLedger` in batches from a background task:
metering never adds a database round trip to a request. Ledgers: in memory
(tests), SQLite (the embedded default, so that ``lamina usage`` in another
process sees what the server recorded) and Redis (shared by replicas, in
:mod:`inferencing.gateway.redis_state`).

When a person's data is erased, their usage is re-attributed to :data:`ERASED_USER`
(:meth:`UsageLedger.forget_user`): the tenant's, models' and deployments' totals stay
right for chargeback, and nothing left links the usage to the person.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

import aiosqlite

log = logging.getLogger(__name__)

GroupBy = Literal["tenant", "user", "model", "deployment"]
GROUPINGS: tuple[GroupBy, ...] = ("tenant", "user", "model", "deployment")

ERASED_USER = "(erased)"
"""The user of usage whose person's data was erased (no identity provider issues it)."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one model call used. ``estimated`` when the provider did not report usage
    (a stream that broke early) and Lamina counted the tokens itself."""

    at: datetime
    tenant_id: str
    user_id: str
    deployment: str
    model: str
    model_version: str | None
    prompt_version: str | None
    input_tokens: int
    output_tokens: int
    cost: float
    outcome: str
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of a chargeback table."""

    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class UsageDetail:
    """What a person's model calls used, as a ledger keeps it: one call (ledgers that keep
    every record) or the totals of an hour (Redis)."""

    at: datetime
    """When the call was made, or the start of the hour."""
    deployment: str
    model: str
    model_version: str | None
    calls: int
    input_tokens: int
    output_tokens: int
    cost: float
    prompt_version: str | None = None
    outcome: str | None = None
    estimated: bool | None = None
    """``None`` where the ledger keeps totals only."""


class UsageLedger(Protocol):
    async def append(self, records: Sequence[UsageRecord]) -> None: ...

    async def summarize(
        self, by: GroupBy, since: datetime, *, tenant_id: str | None = None
    ) -> list[UsageRow]:
        """Totals per ``by`` since ``since`` (of ``tenant_id`` only, if given), the
        costliest first."""
        ...

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Re-attribute the person's usage to :data:`ERASED_USER`, keeping every total but
        theirs as it was; returns how many model calls were re-attributed."""
        ...

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        """The person's usage as the ledger keeps it, oldest first."""
        ...

    async def aclose(self) -> None: ...


def detail_of(record: UsageRecord) -> UsageDetail:
    return UsageDetail(
        at=record.at,
        deployment=record.deployment,
        model=record.model,
        model_version=record.model_version,
        calls=1,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        cost=record.cost,
        prompt_version=record.prompt_version,
        outcome=record.outcome,
        estimated=record.estimated,
    )


def reattribute(records: list[UsageRecord], tenant_id: str, user_id: str) -> int:
    """Re-attribute the person's ``records`` to :data:`ERASED_USER` in place; returns how many."""
    if user_id == ERASED_USER:
        return 0
    count = 0
    for i, record in enumerate(records):
        if record.tenant_id == tenant_id and record.user_id == user_id:
            records[i] = replace(record, user_id=ERASED_USER)
            count += 1
    return count


def group_key(record: UsageRecord, by: GroupBy) -> str:
    match by:
        case "tenant":
            return record.tenant_id
        case "user":
            return f"{record.tenant_id}/{record.user_id}"
        case "model":
            return (
                f"{record.model}@{record.model_version}" if record.model_version else record.model
            )
        case "deployment":
            return record.deployment


def totals(records: Sequence[UsageRecord], by: GroupBy) -> list[UsageRow]:
    rows: dict[str, list[float]] = {}
    for record in records:
        row = rows.setdefault(group_key(record, by), [0, 0, 0, 0.0])
        row[0] += 1
        row[1] += record.input_tokens
        row[2] += record.output_tokens
        row[3] += record.cost
    return sort_rows(
        UsageRow(key, int(r[0]), int(r[1]), int(r[2]), round(r[3], 6)) for key, r in rows.items()
    )


def sort_rows(rows: Iterable[UsageRow]) -> list[UsageRow]:
    return sorted(rows, key=lambda r: (-r.cost, -r.input_tokens - r.output_tokens, r.key))


class InMemoryUsageLedger:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    async def append(self, records: Sequence[UsageRecord]) -> None:
        self.records.extend(records)

    async def summarize(
        self, by: GroupBy, since: datetime, *, tenant_id: str | None = None
    ) -> list[UsageRow]:
        return totals(
            [
                r
                for r in self.records
                if r.at >= since and (tenant_id is None or r.tenant_id == tenant_id)
            ],
            by,
        )

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        return reattribute(self.records, tenant_id, user_id)

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        mine = [r for r in self.records if r.tenant_id == tenant_id and r.user_id == user_id]
        return [detail_of(r) for r in sorted(mine, key=lambda r: r.at)]

    async def aclose(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    at TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT,
    prompt_version TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    outcome TEXT NOT NULL,
    estimated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE INDEX IF NOT EXISTS usage_tenant_at ON usage (tenant_id, at);
"""

_GROUP_SQL: dict[GroupBy, str] = {
    "tenant": "tenant_id",
    "user": "tenant_id || '/' || user_id",
    "model": "model || COALESCE('@' || model_version, '')",
    "deployment": "deployment",
}


class SqliteUsageLedger:
    """The embedded ledger: a SQLite file beside the other embedded stores."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def append(self, records: Sequence[UsageRecord]) -> None:
        db = self._connection()
        await db.executemany(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.at.astimezone(UTC).isoformat(),
                    r.tenant_id,
                    r.user_id,
                    r.deployment,
                    r.model,
                    r.model_version,
                    r.prompt_version,
                    r.input_tokens,
                    r.output_tokens,
                    r.cost,
                    r.outcome,
                    int(r.estimated),
                )
                for r in records
            ],
        )
        await db.commit()

    async def summarize(
        self, by: GroupBy, since: datetime, *, tenant_id: str | None = None
    ) -> list[UsageRow]:
        db = self._connection()
        where = "at >= ?" + (" AND tenant_id = ?" if tenant_id is not None else "")
        params: list[str] = [since.astimezone(UTC).isoformat()]
        if tenant_id is not None:
            params.append(tenant_id)
        key = _GROUP_SQL[by]
        async with db.execute(
            f"SELECT {key}, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost) "
            f"FROM usage WHERE {where} GROUP BY 1",
            params,
        ) as cursor:
            rows = await cursor.fetchall()
        return sort_rows(
            UsageRow(str(k), int(n), int(i), int(o), round(float(c), 6)) for k, n, i, o, c in rows
        )

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        if user_id == ERASED_USER:
            return 0
        db = self._connection()
        cursor = await db.execute(
            "UPDATE usage SET user_id = ? WHERE tenant_id = ? AND user_id = ?",
            (ERASED_USER, tenant_id, user_id),
        )
        await db.commit()
        return cursor.rowcount

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        db = self._connection()
        async with db.execute(
            "SELECT at, deployment, model, model_version, prompt_version, input_tokens, "
            "output_tokens, cost, outcome, estimated FROM usage "
            "WHERE tenant_id = ? AND user_id = ? ORDER BY at",
            (tenant_id, user_id),
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            UsageDetail(
                at=datetime.fromisoformat(at),
                deployment=deployment,
                model=model,
                model_version=version,
                calls=1,
                input_tokens=int(i),
                output_tokens=int(o),
                cost=float(cost),
                prompt_version=prompt_version,
                outcome=outcome,
                estimated=bool(estimated),
            )
            for at, deployment, model, version, prompt_version, i, o, cost, outcome, estimated in (
                rows
            )
        ]

    async def aclose(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteUsageLedger.open() was not called")
        return self._db


class UsageMeter:
    """Buffers usage records and writes them to the ledger in the background.

    ``record`` never blocks and never raises. A failing ledger keeps the records
    buffered (up to ``max_buffered``, then the oldest are dropped and counted) and
    they are written once it recovers; ``aclose`` writes what is left.

    Erase and export a person's usage through the meter (:meth:`forget_user`,
    :meth:`user_detail`), not the ledger alone: records still buffered are theirs too.
    """

    def __init__(
        self, ledger: UsageLedger, *, flush_every_s: float = 1.0, max_buffered: int = 100_000
    ) -> None:
        self.ledger = ledger
        self._flush_every_s = flush_every_s
        self._max_buffered = max_buffered
        self._buffer: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        """Held while a batch is written: an erasure waits for a batch in flight, else
        the batch could land after it."""
        self.dropped = 0

    def record(self, record: UsageRecord) -> None:
        self._buffer.append(record)
        if len(self._buffer) > self._max_buffered:
            del self._buffer[0]
            self.dropped += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        """Write everything buffered now."""
        async with self._writing:
            if not self._buffer:
                return
            batch, self._buffer = self._buffer, []
            try:
                await self.ledger.append(batch)
            except Exception as exc:
                log.warning("usage ledger unavailable, %d record(s) kept: %s", len(batch), exc)
                self._buffer[:0] = batch
                raise

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Re-attribute the person's usage, buffered and written, to :data:`ERASED_USER`;
        returns how many model calls were re-attributed. A failing ledger raises (the
        buffered records are re-attributed all the same)."""
        async with self._writing:
            buffered = reattribute(self._buffer, tenant_id, user_id)
            return buffered + await self.ledger.forget_user(tenant_id, user_id)

    async def user_detail(self, tenant_id: str, user_id: str) -> list[UsageDetail]:
        """The person's usage, the buffered records written first."""
        await self.flush()
        return await self.ledger.user_detail(tenant_id, user_id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every_s)
            try:
                await self.flush()
            except Exception:  # logged in flush; try again next round
                continue

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.error("usage records lost at shutdown: %d", len(self._buffer))
        await self.ledger.aclose()


def cost_of(
    input_tokens: int, output_tokens: int, input_per_1k: float, output_per_1k: float
) -> float:
    return round(input_tokens / 1000 * input_per_1k + output_tokens / 1000 * output_per_1k, 8)


_SPAN = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``7d``, ``24h``, ``30m``, ``2w`` ago, or an ISO date or date-time (UTC if naive).
    Raises ``ValueError`` saying what is accepted."""
    text = value.strip()
    now = now or datetime.now(UTC)
    if len(text) > 1 and text[-1] in _SPAN and text[:-1].isdigit():
        return now - timedelta(**{_SPAN[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"since must be a span such as 7d, 24h or 30m, or an ISO date; got {value!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
