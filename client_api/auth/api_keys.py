"""API keys for service clients: stored hashed, scoped to a tenant and roles, rotatable.

A key reads ``lam_<key_id>_<secret>``: ``key_id`` is 12 random base32 characters, public
(it is listed, logged and used to revoke), and ``secret`` is 32 random bytes, urlsafe
base64. The full text is shown once, when the key is created or rotated; stores keep
only its SHA-256. SHA-256 is enough because the secret carries 256 random bits: no
guess can find it, so the slow KDFs made for low-entropy passwords would add tens of
milliseconds to every request and no safety. The hash covers the whole text, id
included, so a stored hash is bound to its record.

Two stores pass one contract suite (``tests/client_api/test_api_keys.py``):
:class:`SqliteApiKeyStore` (``<data_dir>/api_keys.db``) for one machine and
:class:`RedisApiKeyStore` for replicas. :func:`open_api_key_store` picks one from the
settings exactly as the server and ``lamina keys`` do, so both see the same keys.

Fail closed: when the configured store cannot answer, every operation raises
:class:`KeyStoreUnavailable` (the edge answers 503) and never falls back to another
set of keys, which could hold keys revoked in the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import aiosqlite

from client_api.settings import LaminaSettings
from intelligence.contracts import Principal

if TYPE_CHECKING:
    import redis.asyncio
    from redis.asyncio.client import Pipeline
    from redis.typing import EncodableT

log = logging.getLogger(__name__)

T = TypeVar("T")

API_KEY_PREFIX = "lam_"
"""Every key starts with this, so the edge can tell a key from a JWT by its first bytes."""

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_LENGTH = 12  # 60 bits: ids only need to be unique; a collision is retried
_SECRET_BYTES = 32
_KEY_PATTERN = re.compile(
    rf"{API_KEY_PREFIX}(?P<key_id>[{_ID_ALPHABET}]{{{_ID_LENGTH}}})_[A-Za-z0-9_-]{{43}}"
)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_LABEL = 256

EXPIRING_WITHIN = timedelta(days=7)
"""A key that expires sooner than this is listed as ``expiring``."""

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- errors -----------------------------------------------------------------------------


class ApiKeyError(Exception):
    """Base of the API key errors; messages are safe to show to the operator."""


class KeyStoreUnavailable(ApiKeyError):
    """The configured key store cannot answer now. Deny, and say so: the edge maps this
    to 503, not 401, because the caller's key may well be valid."""


class UnknownApiKey(ApiKeyError):
    """No key has this id."""


class ApiKeyNotActive(ApiKeyError):
    """The key is revoked, expired, or already rotated, so it cannot be rotated."""


class DuplicateApiKeyName(ApiKeyError):
    """The tenant already has an active key of this name. Keys of one name share a
    principal (``key:<name>``), its quotas and its usage; rotate it instead."""


# --- records ----------------------------------------------------------------------------


class ApiKeyStatus(StrEnum):
    """Where a key stands at a given moment; only ``active`` and ``expiring`` keys work."""

    ACTIVE = "active"
    EXPIRING = "expiring"
    """Usable, but rotated to a successor or expiring within :data:`EXPIRING_WITHIN`."""
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is stored of a key, apart from its hash; safe to list and log."""

    key_id: str
    name: str
    tenant_id: str
    roles: frozenset[str]
    groups: frozenset[str]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_from: str | None = None
    """The key this one replaced, if it was issued by a rotation."""
    replaced_by: str | None = None
    """The key that replaced this one; set by a rotation, for its grace period."""

    def status(self, now: datetime) -> ApiKeyStatus:
        """Revoked wins over expired, which wins over expiring."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return ApiKeyStatus.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return ApiKeyStatus.EXPIRED
        if self.replaced_by is not None or (
            self.expires_at is not None and self.expires_at - now <= EXPIRING_WITHIN
        ):
            return ApiKeyStatus.EXPIRING
        return ApiKeyStatus.ACTIVE

    def usable(self, now: datetime) -> bool:
        """Whether the key authenticates at ``now``."""
        return self.status(now) in (ApiKeyStatus.ACTIVE, ApiKeyStatus.EXPIRING)


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    """A new key: its record and its full text, which exists only here (show it once)."""

    record: ApiKey
    key: str = field(repr=False)  # keep the secret out of reprs, logs and tracebacks


def principal_for(record: ApiKey) -> Principal:
    """The service client a key stands for. ``user_id`` is derived from the name, not
    the key id, so that quotas and usage follow the client across rotations."""
    return Principal(
        tenant_id=record.tenant_id,
        user_id=f"key:{record.name}",
        groups=record.groups,
        roles=record.roles,
        name=record.name,
        scopes=frozenset(),
        auth_method="api_key",
    )


# --- the port ---------------------------------------------------------------------------


class ApiKeyStore(Protocol):
    """Where keys live. Every operation raises :class:`KeyStoreUnavailable` when the
    store cannot answer; none ever falls back to another store."""

    def describe(self) -> str:
        """Which store this is (``sqlite <path>``, ``redis <host>``), without secrets."""
        ...

    async def create(
        self,
        tenant_id: str,
        name: str,
        *,
        roles: Iterable[str] = (),
        groups: Iterable[str] = (),
        expires_at: datetime | None = None,
    ) -> IssuedApiKey:
        """A new key. Raises ``ValueError`` for an invalid name, label or expiry and
        :class:`DuplicateApiKeyName` when the tenant has an active key of that name."""
        ...

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        """Keys of a tenant (of every tenant when ``None``), oldest first, whatever
        their status."""
        ...

    async def revoke(self, key_id: str) -> bool:
        """Stop the key now; ``False`` if there is no such key. Revoking a revoked key
        keeps its first revocation time."""
        ...

    async def rotate(self, key_id: str, grace: timedelta) -> IssuedApiKey:
        """A successor with the same tenant, name, roles and groups (and, if the old key
        expires, the same lifetime from now). The old key keeps working for ``grace``
        (never past its own expiry); a zero grace revokes it at once. Raises
        :class:`UnknownApiKey` or :class:`ApiKeyNotActive`."""
        ...

    async def verify(self, presented: str) -> ApiKey | None:
        """The key's record if ``presented`` is a usable key, else ``None`` (unknown id,
        wrong secret, revoked, expired, or not a key at all: this never raises for any
        text). Raises only :class:`KeyStoreUnavailable`."""
        ...

    async def aclose(self) -> None: ...


class ApiKeyAuthenticator:
    """Turns a presented API key into the principal of its service client."""

    def __init__(self, store: ApiKeyStore) -> None:
        self._store = store

    async def authenticate(self, presented: str) -> Principal | None:
        """The principal, or ``None`` for a key that does not verify. Raises
        :class:`KeyStoreUnavailable` (a 503) when the store cannot answer."""
        record = await self._store.verify(presented.strip())
        return None if record is None else principal_for(record)


# --- rules shared by the stores ---------------------------------------------------------


def looks_like_api_key(text: str) -> bool:
    """Whether a credential is meant as an API key (it may still be a wrong one)."""
    return text.startswith(API_KEY_PREFIX)


def parse_api_key(presented: str) -> str | None:
    """The key id of a well-formed key text, else ``None`` (never raises)."""
    match = _KEY_PATTERN.fullmatch(presented) if isinstance(presented, str) else None
    return match["key_id"] if match else None


def _digest(key_text: str) -> str:
    return hashlib.sha256(key_text.encode("ascii")).hexdigest()


def _new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def _key_text(key_id: str) -> str:
    return f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def _labels(kind: str, values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):  # a lone string would become a set of its characters
        values = (values,)
    labels = frozenset(v.strip() for v in values)
    for label in labels:
        if not label or len(label) > _MAX_LABEL or not label.isprintable():
            raise ValueError(
                f"each of the {kind} must be 1 to {_MAX_LABEL} printable characters; got {label!r}"
            )
    return labels


def _validated(
    tenant_id: str,
    name: str,
    roles: Iterable[str],
    groups: Iterable[str],
    expires_at: datetime | None,
    now: datetime,
) -> tuple[str, frozenset[str], frozenset[str], datetime | None]:
    tenant = tenant_id.strip()
    if not tenant or len(tenant) > _MAX_LABEL or not tenant.isprintable():
        raise ValueError(f"the tenant must be 1 to {_MAX_LABEL} printable characters")
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            "the name must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {name!r}"
        )
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must carry a time zone")
        expires_at = expires_at.astimezone(UTC)
        if expires_at <= now:
            raise ValueError("expires_at must be in the future")
    return tenant, _labels("roles", roles), _labels("groups", groups), expires_at


def _issue(
    key_id: str,
    tenant_id: str,
    name: str,
    roles: frozenset[str],
    groups: frozenset[str],
    *,
    now: datetime,
    expires_at: datetime | None,
    rotated_from: str | None = None,
) -> tuple[IssuedApiKey, str]:
    """A new record, its text and the digest to store."""
    text = _key_text(key_id)
    record = ApiKey(
        key_id=key_id,
        name=name,
        tenant_id=tenant_id,
        roles=roles,
        groups=groups,
        created_at=now,
        expires_at=expires_at,
        rotated_from=rotated_from,
    )
    return IssuedApiKey(record, text), _digest(text)


def _check_name_free(existing: Iterable[ApiKey], name: str, now: datetime) -> None:
    for other in existing:
        if other.name == name and other.usable(now):
            raise DuplicateApiKeyName(
                f"tenant {other.tenant_id!r} already has an active key named {name!r} "
                f"({other.key_id}); rotate it, or revoke it first"
            )


def _retire(old: ApiKey, successor: str, now: datetime, grace: timedelta) -> ApiKey:
    """The old key of a rotation: usable until ``now + grace`` (never longer than it
    already was), or revoked now when there is no grace."""
    if not old.usable(now) or old.replaced_by is not None:
        why = (
            f"was already rotated to {old.replaced_by}"
            if old.replaced_by is not None and old.usable(now)
            else f"is {old.status(now)}"
        )
        raise ApiKeyNotActive(f"key {old.key_id} {why}; only an active key can be rotated")
    if grace <= timedelta(0):
        return replace(old, replaced_by=successor, revoked_at=now)
    until = now + grace
    if old.expires_at is not None:
        until = min(until, old.expires_at)
    return replace(old, replaced_by=successor, expires_at=until)


def _successor_expiry(old: ApiKey, now: datetime) -> datetime | None:
    # A key issued for 90 days is rotated into another 90-day key: the policy carries over.
    return None if old.expires_at is None else now + (old.expires_at - old.created_at)


def _check_grace(grace: timedelta) -> None:
    if grace < timedelta(0):
        raise ValueError("the grace period cannot be negative")


def _verified(
    record: ApiKey | None, stored_digest: str, presented: str, now: datetime
) -> ApiKey | None:
    # Digest the text before looking at the record, so an unknown id costs the same.
    matches = hmac.compare_digest(_digest(presented), stored_digest)
    if record is None or not matches:
        return None
    if not record.usable(now):
        log.info("API key %s refused: %s", record.key_id, record.status(now))
        return None
    return record


_NO_DIGEST = _digest(API_KEY_PREFIX)  # compared against when there is no record


# --- serialisation (both stores keep the same fields as text) ---------------------------


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _time(value: datetime | None) -> str | None:
    return None if value is None else _stamp(value)


def _parse_time(value: str | None) -> datetime | None:
    return None if not value else datetime.fromisoformat(value)


def _fields(record: ApiKey, digest: str) -> dict[str, str]:
    """The record as text fields, ``None`` left out."""
    values: dict[str, str | None] = {
        "tenant_id": record.tenant_id,
        "name": record.name,
        "roles": json.dumps(sorted(record.roles)),
        "groups": json.dumps(sorted(record.groups)),
        "created_at": _time(record.created_at),
        "expires_at": _time(record.expires_at),
        "revoked_at": _time(record.revoked_at),
        "rotated_from": record.rotated_from,
        "replaced_by": record.replaced_by,
        "secret_sha256": digest,
    }
    return {k: v for k, v in values.items() if v is not None}


def _record(key_id: str, fields: Mapping[str, str | None]) -> tuple[ApiKey, str]:
    """A record and its digest from stored fields; a damaged record fails closed."""
    try:
        created_at = _parse_time(fields["created_at"])
        digest = fields["secret_sha256"]
        if created_at is None or not digest:
            raise ValueError("created_at and secret_sha256 are required")
        record = ApiKey(
            key_id=key_id,
            name=str(fields["name"]),
            tenant_id=str(fields["tenant_id"]),
            roles=frozenset(json.loads(fields["roles"] or "[]")),
            groups=frozenset(json.loads(fields["groups"] or "[]")),
            created_at=created_at,
            expires_at=_parse_time(fields.get("expires_at")),
            revoked_at=_parse_time(fields.get("revoked_at")),
            rotated_from=fields.get("rotated_from") or None,
            replaced_by=fields.get("replaced_by") or None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyStoreUnavailable(f"the stored record of key {key_id} is damaged: {exc}") from exc
    return record, digest


def _ordered(records: Iterable[ApiKey]) -> list[ApiKey]:
    return sorted(records, key=lambda r: (r.created_at, r.key_id))


# --- SQLite -----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    groups_ TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT,
    rotated_from TEXT,
    replaced_by TEXT,
    secret_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id, name);
"""
# ``groups`` is an SQL keyword (window frames), hence ``groups_``.
_COLUMNS = (
    "key_id, tenant_id, name, roles, groups_, created_at, expires_at, revoked_at, "
    "rotated_from, replaced_by, secret_sha256"
)


class SqliteApiKeyStore:
    """The embedded store: a SQLite file that the server and ``lamina keys`` share.

    Writes run in ``BEGIN IMMEDIATE`` transactions, so a CLI and a server on the same
    file cannot both rotate a key, or both create a name, at once.
    """

    def __init__(self, path: Path, *, clock: Clock = utc_now, busy_timeout_s: float = 5.0) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None
        # One connection: its transactions must not interleave between coroutines.
        self._write_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"sqlite {self._path}"

    async def open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level=None): transactions are explicit, BEGIN IMMEDIATE.
            self._db = await aiosqlite.connect(
                self._path, timeout=self._busy_timeout_s, isolation_level=None
            )
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            await self.aclose()
            raise KeyStoreUnavailable(f"cannot open the API key store {self._path}: {exc}") from exc

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def create(
        self,
        tenant_id: str,
        name: str,
        *,
        roles: Iterable[str] = (),
        groups: Iterable[str] = (),
        expires_at: datetime | None = None,
    ) -> IssuedApiKey:
        now = self._clock()
        tenant, role_set, group_set, expiry = _validated(
            tenant_id, name, roles, groups, expires_at, now
        )
        async with self._transaction() as db:
            _check_name_free(await self._select(db, "tenant_id = ?", (tenant,)), name, now)
            key_id = await self._free_id(db)
            issued, digest = _issue(
                key_id, tenant, name, role_set, group_set, now=now, expires_at=expiry
            )
            await self._insert(db, issued.record, digest)
        return issued

    async def get(self, key_id: str) -> ApiKey | None:
        found = await self._load(key_id)
        return None if found is None else found[0]

    async def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        db = self._connection()
        async with _sqlite_errors(self._path):
            if tenant_id is None:
                return _ordered(await self._select(db, "1", ()))
            return _ordered(await self._select(db, "tenant_id = ?", (tenant_id,)))

    async def revoke(self, key_id: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                (_stamp(self._clock()), key_id),
            )
            return cursor.rowcount > 0

    async def rotate(self, key_id: str, grace: timedelta) -> IssuedApiKey:
        _check_grace(grace)
        now = self._clock()
        async with self._transaction() as db:
            found = await self._load(key_id)
            if found is None:
                raise UnknownApiKey(f"there is no API key {key_id!r}")
            old = found[0]
            new_id = await self._free_id(db)
            retired = _retire(old, new_id, now, grace)
            issued, digest = _issue(
                new_id,
                old.tenant_id,
                old.name,
                old.roles,
                old.groups,
                now=now,
                expires_at=_successor_expiry(old, now),
                rotated_from=old.key_id,
            )
            await self._insert(db, issued.record, digest)
            await db.execute(
                "UPDATE api_keys SET replaced_by = ?, expires_at = ?, revoked_at = ? "
                "WHERE key_id = ?",
                (
                    retired.replaced_by,
                    _time(retired.expires_at),
                    _time(retired.revoked_at),
                    key_id,
                ),
            )
        return issued

    async def verify(self, presented: str) -> ApiKey | None:
        key_id = parse_api_key(presented)
        if key_id is None:
            return None
        found = await self._load(key_id)
        record, digest = found if found is not None else (None, _NO_DIGEST)
        return _verified(record, digest, presented, self._clock())

    # -- inside ---------------------------------------------------------------------

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteApiKeyStore.open() was not called")
        return self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any error): the write lock is
        taken before reading, so the checks made inside still hold at the commit."""
        db = self._connection()
        async with self._write_lock, _sqlite_errors(self._path):
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # the first error is the one to see
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _load(self, key_id: str) -> tuple[ApiKey, str] | None:
        db = self._connection()
        async with _sqlite_errors(self._path):
            cursor = await db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else _row_record(row)

    async def _select(
        self, db: aiosqlite.Connection, where: str, parameters: tuple[str, ...]
    ) -> list[ApiKey]:
        cursor = await db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE {where}", parameters)
        return [_row_record(row)[0] for row in await cursor.fetchall()]

    async def _free_id(self, db: aiosqlite.Connection) -> str:
        while True:
            key_id = _new_key_id()
            cursor = await db.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,))
            if await cursor.fetchone() is None:
                return key_id

    async def _insert(self, db: aiosqlite.Connection, record: ApiKey, digest: str) -> None:
        fields = _fields(record, digest)
        await db.execute(
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.key_id,
                fields["tenant_id"],
                fields["name"],
                fields["roles"],
                fields["groups"],
                fields["created_at"],
                fields.get("expires_at"),
                fields.get("revoked_at"),
                fields.get("rotated_from"),
                fields.get("replaced_by"),
                digest,
            ),
        )


def _row_record(row: Sequence[object]) -> tuple[ApiKey, str]:
    key_id, *values = (None if v is None else str(v) for v in row)
    names = (
        "tenant_id",
        "name",
        "roles",
        "groups",
        "created_at",
        "expires_at",
        "revoked_at",
        "rotated_from",
        "replaced_by",
        "secret_sha256",
    )
    return _record(str(key_id), dict(zip(names, values, strict=True)))


@asynccontextmanager
async def _sqlite_errors(path: Path) -> AsyncIterator[None]:
    """Turns SQLite failures (a locked or unreadable file) into :class:`KeyStoreUnavailable`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise KeyStoreUnavailable(f"the API key store {path} failed: {exc}") from exc


# --- Redis ------------------------------------------------------------------------------

_WATCH_ATTEMPTS = 8


class RedisApiKeyStore:
    """Keys in Redis, shared by every replica: a hash ``{prefix}key:<key_id>`` per key,
    a set ``{prefix}tenant:<tenant_id>`` of each tenant's key ids and ``{prefix}all``
    of every id. Writes are optimistic transactions (WATCH … MULTI … EXEC), retried when
    another writer got there first. The client belongs to the caller, who closes it.

    Keys are data that must survive: the Redis must persist (AOF or RDB) and must not
    evict them (``maxmemory-policy`` ``noeviction`` or a ``volatile-*`` policy).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "lamina:apikeys:",
        clock: Clock = utc_now,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._all = prefix + "all"
        self._clock = clock

    def describe(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"redis {where}/{kwargs.get('db', 0)}"

    async def aclose(self) -> None:
        return None

    async def create(
        self,
        tenant_id: str,
        name: str,
        *,
        roles: Iterable[str] = (),
        groups: Iterable[str] = (),
        expires_at: datetime | None = None,
    ) -> IssuedApiKey:
        now = self._clock()
        tenant, role_set, group_set, expiry = _validated(
            tenant_id, name, roles, groups, expires_at, now
        )
        tenant_set = self._tenant_set(tenant)

        async def create(pipe: Pipeline) -> IssuedApiKey:
            # The tenant's set is watched: a concurrent create or rotation in the tenant
            # adds to it, and then this transaction runs again and sees that key.
            members = await pipe.smembers(tenant_set)
            _check_name_free(await self._records(_texts(members)), name, now)
            key_id = await self._free_id(pipe)
            issued, digest = _issue(
                key_id, tenant, name, role_set, group_set, now=now, expires_at=expiry
            )
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            self._queue_insert(pipe, issued.record, digest)
            await pipe.execute()
            return issued

        return await self._transaction((tenant_set,), create)

    async def get(self, key_id: str) -> ApiKey | None:
        found = await self._load(key_id)
        return None if found is None else found[0]

    async def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        source = self._all if tenant_id is None else self._tenant_set(tenant_id)
        async with self._errors():
            members = await self._client.smembers(source)
        return _ordered(await self._records(_texts(members)))

    async def revoke(self, key_id: str) -> bool:
        name = self._key(key_id)

        async def revoke(pipe: Pipeline) -> bool:
            if not await pipe.exists(name):
                return False
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            pipe.hsetnx(name, "revoked_at", _stamp(self._clock()))
            await pipe.execute()
            return True

        return await self._transaction((name,), revoke)

    async def rotate(self, key_id: str, grace: timedelta) -> IssuedApiKey:
        _check_grace(grace)
        name = self._key(key_id)

        async def rotate(pipe: Pipeline) -> IssuedApiKey:
            now = self._clock()
            raw = await pipe.hgetall(name)
            if not raw:
                raise UnknownApiKey(f"there is no API key {key_id!r}")
            old, old_digest = _record(key_id, _decoded(raw))
            new_id = await self._free_id(pipe)
            retired = _retire(old, new_id, now, grace)
            issued, digest = _issue(
                new_id,
                old.tenant_id,
                old.name,
                old.roles,
                old.groups,
                now=now,
                expires_at=_successor_expiry(old, now),
                rotated_from=old.key_id,
            )
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            self._queue_insert(pipe, issued.record, digest)
            pipe.hset(name, mapping=_hash(_fields(retired, old_digest)))
            await pipe.execute()
            return issued

        return await self._transaction((name,), rotate)

    async def verify(self, presented: str) -> ApiKey | None:
        key_id = parse_api_key(presented)
        if key_id is None:
            return None
        found = await self._load(key_id)
        record, digest = found if found is not None else (None, _NO_DIGEST)
        return _verified(record, digest, presented, self._clock())

    # -- inside ---------------------------------------------------------------------

    def _key(self, key_id: str) -> str:
        return f"{self._prefix}key:{key_id}"

    def _tenant_set(self, tenant_id: str) -> str:
        return f"{self._prefix}tenant:{tenant_id}"

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Turns an unreachable Redis into :class:`KeyStoreUnavailable`."""
        from inferencing.gateway.redis_state import UNREACHABLE

        try:
            yield
        except UNREACHABLE as exc:
            raise KeyStoreUnavailable(
                f"the API key store ({self.describe()}) is unreachable: {exc}"
            ) from exc

    async def _load(self, key_id: str) -> tuple[ApiKey, str] | None:
        async with self._errors():
            raw = await self._client.hgetall(self._key(key_id))
        return _record(key_id, _decoded(raw)) if raw else None

    async def _records(self, key_ids: Sequence[str]) -> list[ApiKey]:
        if not key_ids:
            return []
        async with self._errors(), self._client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(self._key(key_id))
            raws: list[dict[bytes | str, bytes | str]] = await pipe.execute()
        return [
            _record(key_id, _decoded(raw))[0]
            for key_id, raw in zip(key_ids, raws, strict=True)
            if raw
        ]

    async def _free_id(self, pipe: Pipeline) -> str:
        while True:
            key_id = _new_key_id()
            # Watched too: a key created under this id before EXEC makes EXEC fail.
            await pipe.watch(self._key(key_id))
            if not await pipe.exists(self._key(key_id)):
                return key_id

    def _queue_insert(self, pipe: Pipeline, record: ApiKey, digest: str) -> None:
        pipe.hset(self._key(record.key_id), mapping=_hash(_fields(record, digest)))
        pipe.sadd(self._tenant_set(record.tenant_id), record.key_id)
        pipe.sadd(self._all, record.key_id)

    async def _transaction(
        self, watched: Sequence[str], body: Callable[[Pipeline], Awaitable[T]]
    ) -> T:
        from redis.exceptions import WatchError  # redis is loaded: the client exists

        for _ in range(_WATCH_ATTEMPTS):
            async with self._errors():
                try:
                    async with self._client.pipeline(transaction=True) as pipe:
                        await pipe.watch(*watched)
                        return await body(pipe)
                except WatchError:
                    continue  # another writer changed a watched key: read again
        raise KeyStoreUnavailable(
            f"the API key store ({self.describe()}) kept changing under this write; try again"
        )


def _hash(fields: Mapping[str, str]) -> dict[EncodableT, EncodableT]:
    return {k: v for k, v in fields.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Iterable[bytes | str]) -> list[str]:
    return [_text(v) for v in values]


def _decoded(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str | None]:
    return {_text(k): _text(v) for k, v in raw.items()}


# --- opening the configured store -------------------------------------------------------


async def open_api_key_store(
    settings: LaminaSettings,
    stack: AsyncExitStack,
    *,
    clock: Clock = utc_now,
    shared_redis: redis.asyncio.Redis | None = None,
) -> ApiKeyStore:
    """The store the server and ``lamina keys`` share: Redis when ``LAMINA_REDIS__URL``
    is set, else SQLite under ``LAMINA_DATA_DIR``. Closed with ``stack``.

    With Redis configured there is no fallback: while Redis is down, keys are refused
    with :class:`KeyStoreUnavailable`. A local copy could accept keys revoked meanwhile.
    Opening does not contact Redis, so a server still starts (and serves JWT callers)
    while Redis is down.
    """
    if shared_redis is not None:  # the server's shared client
        return RedisApiKeyStore(shared_redis, clock=clock)
    if settings.redis.url:
        from inferencing.gateway.redis_state import redis_client

        client = redis_client(
            settings.redis.url,
            connect_timeout_s=settings.redis.connect_timeout_s,
            command_timeout_s=settings.redis.command_timeout_s,
        )
        stack.push_async_callback(client.aclose)
        return RedisApiKeyStore(client, clock=clock)
    store = SqliteApiKeyStore(settings.api_keys_path(), clock=clock)
    await store.open()
    stack.push_async_callback(store.aclose)
    return store


# --- durations for the CLI --------------------------------------------------------------

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"(\d{1,9})([smhdw])")


def parse_duration(text: str) -> timedelta:
    """``90d``, ``24h``, ``30m``, ``45s``, ``2w``, or ``0``. Raises ``ValueError``
    saying what is accepted."""
    value = text.strip()
    if value == "0":
        return timedelta(0)
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(
            f"expected a duration such as 90d, 24h, 30m, 45s or 2w (or 0); got {text!r}"
        )
    try:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        raise ValueError(f"the duration {text!r} is too long") from None
