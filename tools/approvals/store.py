"""Where approvals are kept: the :class:`ApprovalStore` port and what its adapters share.

A store knows nothing of tools, callers or clocks. It keeps
:class:`~tools.contracts.ApprovalRequest` records and changes them only through
atomic compare-and-set operations, so that N replicas (or two processes on one
SQLite file) racing on one approval cannot both decide it, and cannot both run it.

Two adapters pass one contract suite (``tests/tools/approvals/store_contract.py``):
:class:`~tools.approvals.sqlite_store.SqliteApprovalStore` (one machine) and
:class:`~tools.approvals.redis_store.RedisApprovalStore` (replicas).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

from tools.contracts import ApprovalRequest, ApprovalStatus, JsonValue, ToolError

DEFAULT_RETENTION = timedelta(days=7)
"""How long a store keeps an approval after it expired (for retries, audits and the
requester's view); then it may forget it."""

ERASED_USER = "(erased)"
"""Who decided an approval, once that person's data was erased: the approval is the
requester's record and stays, without naming the decider (the audit log keeps who)."""

MAPPING_FIELDS = frozenset({"arguments", "requested_arguments", "resume", "outcome"})
TIME_FIELDS = frozenset({"created_at", "expires_at", "decided_at"})
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ApprovalRequest))


class ApprovalStoreUnavailable(ToolError):
    """The approval store cannot answer now; nothing was changed, so the caller may retry."""

    def __init__(self) -> None:
        super().__init__("approvals", "approvals cannot be reached right now; try again shortly")


class DuplicateApprovalId(ValueError):
    """An approval with this id already exists; ids are never reused."""


@dataclass(frozen=True, slots=True)
class ApprovalChanges:
    """The fields a transition sets besides the status; ``None`` leaves a field as it is."""

    arguments: Mapping[str, JsonValue] | None = None
    requested_arguments: Mapping[str, JsonValue] | None = None
    summary: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None

    def encoded(self) -> dict[str, JsonValue]:
        """The fields to set, JSON-ready as in :func:`encode_approval`. Every field here
        is a field of :class:`ApprovalRequest`, so adapters may use the names as columns."""
        return {
            change.name: _encode_value(change.name, getattr(self, change.name))
            for change in fields(self)
            if getattr(self, change.name) is not None
        }


NO_CHANGES = ApprovalChanges()


class ApprovalStore(Protocol):
    """Persisted approvals with atomic status transitions.

    Every operation either happens whole or not at all; an unreachable backend raises
    :class:`ApprovalStoreUnavailable`.
    """

    async def create(self, approval: ApprovalRequest) -> None:
        """Persist a new approval (normally pending). Raises :class:`DuplicateApprovalId`
        if its id is taken."""
        ...

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        """The approval, or ``None`` if there is none (or it was forgotten after retention)."""
        ...

    async def transition(
        self,
        approval_id: str,
        expected: Collection[ApprovalStatus],
        new: ApprovalStatus,
        changes: ApprovalChanges = NO_CHANGES,
        *,
        unexpired_at: datetime | None = None,
    ) -> ApprovalRequest | None:
        """Atomically move the approval from one of the ``expected`` statuses to ``new``,
        applying ``changes``; with ``unexpired_at``, only if it expires after that moment.

        Returns the approval as changed, or ``None`` (and changes nothing) if there is no
        such approval or it is not in an expected status (or already expired): of two
        racing transitions from one status, exactly one gets the approval back.
        """
        ...

    async def set_outcome(
        self, approval_id: str, outcome: Mapping[str, JsonValue]
    ) -> ApprovalRequest | None:
        """Record the result of the one run of an ``EXECUTED`` approval, once. ``None`` if
        the approval is not executed or already has an outcome."""
        ...

    async def list_pending(
        self, tenant_id: str, *, requested_by: str | None = None
    ) -> list[ApprovalRequest]:
        """The tenant's pending approvals (only ``requested_by``'s, if given), oldest
        first, including those past their expiry that no one has marked expired yet."""
        ...

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Erase a person's data: delete every approval they requested, whatever its
        status (it holds the call's arguments and the paused turn), and name
        :data:`ERASED_USER` instead of them as the decider of others' approvals.
        Returns how many approvals were deleted or changed."""
        ...

    async def of_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        """Every approval the person requested or decided, oldest first."""
        ...


# --- encoding shared by the adapters --------------------------------------------------


def _encode_value(name: str, value: Any) -> JsonValue:
    if value is None:
        return None
    if name in TIME_FIELDS:
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"approval field {name!r} must be a timezone-aware datetime")
        return value.isoformat()
    if name in MAPPING_FIELDS:
        return _plain(value)
    if name == "status":
        return ApprovalStatus(value).value
    return str(value)


def _plain(value: Any) -> JsonValue:
    """Mappings as dicts and sequences as lists, so ``json.dumps`` takes them."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def encode_approval(approval: ApprovalRequest) -> dict[str, JsonValue]:
    """Every field of ``approval`` as a JSON-ready value: datetimes as ISO 8601 text,
    mappings as dicts, the status as its value, absent values as ``None``."""
    return {name: _encode_value(name, getattr(approval, name)) for name in FIELD_NAMES}


def decode_approval(encoded: Mapping[str, JsonValue]) -> ApprovalRequest:
    """The inverse of :func:`encode_approval`."""
    values: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = encoded.get(name)
        if value is not None and name in TIME_FIELDS:
            value = datetime.fromisoformat(str(value))
        elif name == "status":
            value = ApprovalStatus(str(value))
        values[name] = value
    if values["resume"] is None:
        values["resume"] = {}
    return ApprovalRequest(**values)


def dump_json(value: JsonValue) -> str:
    """Compact JSON text; refuses values JSON cannot carry (NaN, objects)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def epoch_ms(moment: datetime) -> int:
    """``moment`` as whole milliseconds since the epoch, for comparisons inside a backend."""
    return int(moment.timestamp() * 1000)


def retained_ms(approval: ApprovalRequest, retention: timedelta) -> int:
    """How long from now a backend should keep ``approval``: its pending lifetime plus
    ``retention``. Relative to the approval's own creation time, so a skewed clock
    between a replica and the backend cannot make a record vanish early."""
    lifetime = approval.expires_at - approval.created_at
    return max(1, int((lifetime + retention).total_seconds() * 1000))
