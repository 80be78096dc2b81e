"""Approvals in Redis, shared by every replica: the production
:class:`~tools.approvals.store.ApprovalStore`.

Keys, under a configurable prefix:

- ``<prefix>approval:<id>`` — a hash, one field per :class:`ApprovalRequest` field,
  each holding JSON text (so ``null`` marks an absent value), plus ``expires_ms`` (the
  expiry in epoch milliseconds, for comparisons inside Redis);
- ``<prefix>pending:<tenant_id>`` — a sorted set of the tenant's pending approval ids,
  scored by expiry;
- ``<prefix>user:<digest of tenant and user>`` — a sorted set of the ids of the
  approvals a person requested or decided, scored by when Redis forgets each, so that
  erasing their data (:meth:`RedisApprovalStore.forget_user`) never scans the keyspace.

Every change is one Lua script, so a status check and the change it guards happen
atomically: of N replicas racing to claim an approval, exactly one gets it. The
scripts never decode a record's JSON (Lua's cjson would turn ``[]`` into ``{}`` and
round large numbers); they compare and set whole field values.

Redis forgets an approval ``retention`` after its expiry (the key's TTL is set when
it is created), and a tenant's or person's index goes with its last approval, so Redis
does not grow forever. The store needs a Redis that keeps its data (AOF or RDB persistence,
``maxmemory-policy`` ``noeviction`` or a ``volatile-*`` policy); on Redis Cluster the
keys of a transition may sit on different slots, so use a single primary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from tools.approvals.store import (
    DEFAULT_RETENTION,
    ERASED_USER,
    NO_CHANGES,
    ApprovalChanges,
    ApprovalStoreUnavailable,
    DuplicateApprovalId,
    decode_approval,
    dump_json,
    encode_approval,
    epoch_ms,
    retained_ms,
)
from tools.contracts import ApprovalRequest, ApprovalStatus, JsonValue

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)

_UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

# A person's index (requester's or decider's): add the approval scored by when Redis
# forgets it, drop the members forgotten a day before this one was created (a margin for
# clocks), and keep the index as long as its longest-lived approval.
_INDEX_ADD = """
local function index_add(index, id, forget_ms, prune_before_ms, keep_ms)
  redis.call('ZADD', index, forget_ms, id)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. prune_before_ms)
  if redis.call('PTTL', index) < keep_ms then redis.call('PEXPIRE', index, keep_ms) end
end
"""

_CREATE = (
    _INDEX_ADD
    + """
local record, index, requester, decider = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl_ms, expires_ms, id, pending = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local forget_ms, prune_before_ms = ARGV[5], ARGV[6]
if redis.call('EXISTS', record) == 1 then return 0 end
redis.call('HSET', record, unpack(ARGV, 7))
redis.call('PEXPIRE', record, ttl_ms)
if pending == '1' then
  redis.call('ZADD', index, expires_ms, id)
  if redis.call('PTTL', index) < ttl_ms then redis.call('PEXPIRE', index, ttl_ms) end
end
index_add(requester, id, forget_ms, prune_before_ms, ttl_ms)
if decider then index_add(decider, id, forget_ms, prune_before_ms, ttl_ms) end
return 1
"""
)

_TRANSITION = (
    _INDEX_ADD
    + """
local record, index, decider = KEYS[1], KEYS[2], KEYS[3]
local id, new_status, to_pending, unexpired_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retention_ms = tonumber(ARGV[5])
local expected_count = tonumber(ARGV[6])
local status = redis.call('HGET', record, 'status')
if not status then return false end
local allowed = false
for i = 7, 6 + expected_count do
  if ARGV[i] == status then allowed = true end
end
if not allowed then return false end
local expires_ms = redis.call('HGET', record, 'expires_ms')
if unexpired_ms ~= '' and tonumber(expires_ms) <= tonumber(unexpired_ms) then
  return false
end
redis.call('HSET', record, 'status', new_status, unpack(ARGV, 7 + expected_count))
if to_pending == '1' then
  redis.call('ZADD', index, expires_ms, id)
else
  redis.call('ZREM', index, id)
end
if decider then
  local keep_ms = redis.call('PTTL', record)
  if keep_ms > 0 then index_add(decider, id, tonumber(expires_ms) + retention_ms, 0, keep_ms) end
end
return redis.call('HGETALL', record)
"""
)

_SET_OUTCOME = """
local record = KEYS[1]
if redis.call('HGET', record, 'status') ~= ARGV[1] then return false end
if redis.call('HGET', record, 'outcome') ~= 'null' then return false end
redis.call('HSET', record, 'outcome', ARGV[2])
return redis.call('HGETALL', record)
"""

# Erase one approval of a person: deleted if they requested it, their name replaced if
# they decided it; either way it leaves their index.
_FORGET = """
local record, index, person = KEYS[1], KEYS[2], KEYS[3]
local tenant, user, erased, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local fields = redis.call('HMGET', record, 'tenant_id', 'requested_by', 'decided_by')
local changed = 0
if fields[1] == tenant then
  if fields[2] == user then
    redis.call('DEL', record)
    redis.call('ZREM', index, id)
    changed = 1
  elseif fields[3] == user then
    redis.call('HSET', record, 'decided_by', erased)
    changed = 1
  end
end
redis.call('ZREM', person, id)
return changed
"""

_NULL = "null"
_PRUNE_MARGIN = timedelta(days=1)
"""A person's index drops an approval's id this long after Redis should have forgotten
the approval by the clock of the replica that writes: a margin for skewed clocks."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _json_field(status: ApprovalStatus) -> str:
    return dump_json(ApprovalStatus(status).value)


def _decode_hash(fields: Mapping[bytes | str, bytes | str]) -> ApprovalRequest | None:
    if not fields:
        return None
    texts = {_text(key): _text(value) for key, value in fields.items()}
    texts.pop("expires_ms", None)
    return decode_approval({name: json.loads(value) for name, value in texts.items()})


def _decode_flat(reply: Sequence[bytes | str] | None) -> ApprovalRequest | None:
    """A script's ``HGETALL`` reply (``[field, value, field, value, …]``)."""
    if not reply:
        return None
    return _decode_hash(dict(zip(reply[::2], reply[1::2], strict=True)))


class RedisApprovalStore:
    """Approvals in Redis (see the module docstring for the keys).

    The client belongs to the caller, who builds it (with connect and command
    timeouts) and closes it; the store needs no opening. An unreachable Redis raises
    :class:`~tools.approvals.store.ApprovalStoreUnavailable`.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str = "lamina:approvals:",
        *,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix of approvals must not be empty")
        self._client = client
        self._prefix = prefix
        self._retention = retention
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._set_outcome = client.register_script(_SET_OUTCOME)
        self._forget = client.register_script(_FORGET)

    def _record_key(self, approval_id: str) -> str:
        return f"{self._prefix}approval:{approval_id}"

    def _pending_key(self, tenant_id: str) -> str:
        return f"{self._prefix}pending:{tenant_id}"

    def _person_key(self, tenant_id: str, user_id: str) -> str:
        # A digest: user ids may hold any character, and key names are seen by operators.
        digest = hashlib.sha256(json.dumps([tenant_id, user_id]).encode()).hexdigest()[:32]
        return f"{self._prefix}user:{digest}"

    def _forget_ms(self, approval: ApprovalRequest) -> int:
        return epoch_ms(approval.expires_at + self._retention)

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNREACHABLE as exc:
            log.warning("approval store: Redis failed (%s: %s)", type(exc).__name__, exc)
            raise ApprovalStoreUnavailable() from exc

    async def create(self, approval: ApprovalRequest) -> None:
        encoded = encode_approval(approval)
        pairs: list[str | int] = []
        for name, value in encoded.items():
            pairs += [name, dump_json(value)]
        pairs += ["expires_ms", epoch_ms(approval.expires_at)]
        keys = [
            self._record_key(approval.id),
            self._pending_key(approval.tenant_id),
            self._person_key(approval.tenant_id, approval.requested_by),
        ]
        if approval.decided_by is not None:
            keys.append(self._person_key(approval.tenant_id, approval.decided_by))
        async with self._errors():
            created = await self._create(
                keys=keys,
                args=[
                    retained_ms(approval, self._retention),
                    epoch_ms(approval.expires_at),
                    approval.id,
                    "1" if approval.status is ApprovalStatus.PENDING else "0",
                    self._forget_ms(approval),
                    epoch_ms(approval.created_at - _PRUNE_MARGIN),
                    *pairs,
                ],
            )
        if not created:
            raise DuplicateApprovalId(f"approval {approval.id!r} already exists")

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        async with self._errors():
            fields = await self._client.hgetall(self._record_key(approval_id))
        return _decode_hash(fields)

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
        record = self._record_key(approval_id)
        async with self._errors():
            # The tenant never changes, so reading it before the script is safe; the
            # script needs it to name the tenant's pending index.
            tenant = await self._client.hget(record, "tenant_id")
            if tenant is None:
                return None
            tenant_id = json.loads(_text(tenant))
            statuses = sorted({_json_field(status) for status in expected})
            pairs: list[str] = []
            for name, value in changes.encoded().items():
                pairs += [name, dump_json(value)]
            keys = [record, self._pending_key(tenant_id)]
            if changes.decided_by is not None:
                keys.append(self._person_key(tenant_id, changes.decided_by))
            reply = await self._transition(
                keys=keys,
                args=[
                    approval_id,
                    _json_field(new),
                    "1" if new is ApprovalStatus.PENDING else "0",
                    "" if unexpired_at is None else epoch_ms(unexpired_at),
                    int(self._retention.total_seconds() * 1000),
                    len(statuses),
                    *statuses,
                    *pairs,
                ],
            )
        return _decode_flat(reply)

    async def set_outcome(
        self, approval_id: str, outcome: Mapping[str, JsonValue]
    ) -> ApprovalRequest | None:
        async with self._errors():
            reply = await self._set_outcome(
                keys=[self._record_key(approval_id)],
                args=[_json_field(ApprovalStatus.EXECUTED), dump_json(dict(outcome))],
            )
        return _decode_flat(reply)

    async def list_pending(
        self, tenant_id: str, *, requested_by: str | None = None
    ) -> list[ApprovalRequest]:
        index = self._pending_key(tenant_id)
        async with self._errors():
            # Without scores, ZRANGE replies with plain members.
            members = await self._client.zrange(index, 0, -1)
            ids = [_text(member) for member in members if isinstance(member, bytes | str)]
            if not ids:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for approval_id in ids:
                    pipe.hgetall(self._record_key(approval_id))
                records = await pipe.execute()
            # Records Redis forgot after their retention leave their id behind.
            forgotten = [
                approval_id for approval_id, fields in zip(ids, records, strict=True) if not fields
            ]
            if forgotten:
                await self._client.zrem(index, *forgotten)
        found = [_decode_hash(fields) for fields in records]
        pending = [
            approval
            for approval in found
            if approval is not None
            and approval.status is ApprovalStatus.PENDING
            and (requested_by is None or approval.requested_by == requested_by)
        ]
        return sorted(pending, key=lambda approval: (approval.created_at, approval.id))

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        person = self._person_key(tenant_id, user_id)
        async with self._errors():
            members = await self._client.zrange(person, 0, -1)
            ids = [_text(member) for member in members if isinstance(member, bytes | str)]
            changed = 0
            for approval_id in ids:
                changed += int(
                    await self._forget(
                        keys=[self._record_key(approval_id), self._pending_key(tenant_id), person],
                        args=[
                            dump_json(tenant_id),
                            dump_json(user_id),
                            dump_json(ERASED_USER),
                            approval_id,
                        ],
                    )
                )
        return changed

    async def of_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        async with self._errors():
            members = await self._client.zrange(self._person_key(tenant_id, user_id), 0, -1)
            ids = [_text(member) for member in members if isinstance(member, bytes | str)]
            if not ids:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for approval_id in ids:
                    pipe.hgetall(self._record_key(approval_id))
                records = await pipe.execute()
        found = [_decode_hash(fields) for fields in records]
        mine = [
            approval
            for approval in found
            if approval is not None
            and approval.tenant_id == tenant_id
            and user_id in (approval.requested_by, approval.decided_by)
        ]
        return sorted(mine, key=lambda approval: (approval.created_at, approval.id))
