"""Fixtures of the approval tests: both stores on real backends, a settable clock and
an audit sink that keeps what it is given."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio

from tests.support.redis_server import RedisServer, private_redis
from tools.approvals.redis_store import RedisApprovalStore
from tools.approvals.sqlite_store import SqliteApprovalStore
from tools.approvals.store import ApprovalStore
from tools.contracts import ToolAuditRecord


class FakeClock:
    """A clock that moves only when told to; starts at the real time (whole seconds)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class RecordingAuditSink:
    """Keeps every record; ``fail`` makes it raise instead, like a broken audit store."""

    records: list[ToolAuditRecord] = field(default_factory=list)
    fail: bool = False

    async def record(self, entry: ToolAuditRecord) -> None:
        if self.fail:
            raise ConnectionError("audit store down")
        self.records.append(entry)

    def events(self, event: str) -> list[ToolAuditRecord]:
        return [record for record in self.records if record.event == event]


@dataclass
class StoreBackend:
    """One set of stored approvals; :meth:`open` gives another store object on it, as
    another replica (Redis) or another process (a SQLite file) would have."""

    name: str
    _open: Callable[[], Awaitable[ApprovalStore]]

    async def open(self) -> ApprovalStore:
        return await self._open()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def audit() -> RecordingAuditSink:
    return RecordingAuditSink()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for a test module."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[StoreBackend]:
    path = tmp_path / "approvals.db"
    opened: list[SqliteApprovalStore] = []

    async def open_store() -> ApprovalStore:
        store = SqliteApprovalStore(path)
        await store.open()
        opened.append(store)
        return store

    yield StoreBackend("sqlite", open_store)
    for store in opened:
        await store.close()


@pytest.fixture
async def redis_backend(redis_server: RedisServer) -> AsyncIterator[StoreBackend]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:approvals:"
    clients: list[redis.asyncio.Redis] = []

    async def open_store() -> ApprovalStore:
        client = redis.asyncio.Redis.from_url(
            redis_server.url, socket_connect_timeout=2.0, socket_timeout=2.0
        )
        clients.append(client)
        return RedisApprovalStore(client, prefix)

    yield StoreBackend("redis", open_store)
    for client in clients:
        await client.aclose()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> StoreBackend:
    found: StoreBackend = request.getfixturevalue(f"{request.param}_backend")
    return found


@pytest.fixture
async def store(backend: StoreBackend) -> ApprovalStore:
    return await backend.open()
