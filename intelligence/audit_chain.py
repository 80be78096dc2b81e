"""The hash chain of the audit log, shared by its adapters.

Each tenant has one chain. Entry ``seq`` (1, 2, 3 … without gaps) stores
``hash = sha256(prev_hash + canonical(record, seq))``, where ``prev_hash`` is the hash of
entry ``seq - 1`` (:data:`GENESIS` for the first). Changing anything of an entry (its
event, user, time, data, position) changes its hash; removing, reordering or reinserting
entries breaks a link. :class:`ChainCheck` recomputes a chain and names the first entry
that does not check out.

What is hashed is exactly what an adapter stores and reads back: :func:`stored_record`
turns a record into that form (``at`` in UTC with microseconds, ``data`` as plain JSON
values), so that a backend's round trip cannot break a chain that nobody touched. Every
value has a stored form: one JSON cannot hold (a NaN a model wrote into tool arguments, a
``Decimal``) is kept as text rather than refused, because an action that happened must be
recorded whatever its data looked like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from intelligence.contracts import AuditEntry, AuditRecord, ChainVerification
from intelligence.stores.stamps import stamp

GENESIS = "0" * 64
"""The ``prev_hash`` of a tenant's first entry."""


def stored_record(record: AuditRecord) -> AuditRecord:
    """``record`` as the log keeps it: ``at`` in UTC, ``data`` as JSON values (tuples and
    sets become lists, whole floats integers, datetimes text, NaN and the infinities
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, any other type its ``str()``). Raises
    ``ValueError`` for a naive ``at``."""
    if record.at.tzinfo is None:
        raise ValueError("an audit record's time must be timezone-aware")
    return dataclasses.replace(record, at=record.at.astimezone(UTC), data=_plain(dict(record.data)))


def canonical(record: AuditRecord, seq: int) -> str:
    """The text that is hashed: the record and its position as JSON with sorted keys, no
    whitespace and ASCII only, so that every adapter (and any auditor's script) derives
    the same bytes from the same entry."""
    return json.dumps(
        {
            "seq": seq,
            "tenant_id": record.tenant_id,
            "user_id": record.user_id,
            "event": record.event,
            "correlation_id": record.correlation_id,
            "at": stamp(record.at),
            "data": _plain(dict(record.data)),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def entry_hash(prev_hash: str, record: AuditRecord, seq: int) -> str:
    """SHA-256 (hex) of ``prev_hash`` followed by the record's :func:`canonical` text."""
    return hashlib.sha256((prev_hash + canonical(record, seq)).encode()).hexdigest()


def link(record: AuditRecord, seq: int, prev_hash: str) -> AuditEntry:
    """The entry that stores ``record`` at ``seq`` after an entry whose hash is
    ``prev_hash``."""
    kept = stored_record(record)
    return AuditEntry(kept, seq, prev_hash, entry_hash(prev_hash, kept, seq))


def event_bounds(event: str) -> tuple[str, str] | None:
    """For an event prefix (``tool.``), the range ``[low, high)`` its events sort in;
    ``None`` for an exact name. Every event starting with ``tool.`` sorts at or after
    ``tool.`` and before ``tool/`` (``/`` follows ``.``), so a backend filters a prefix
    with two comparisons on an indexed field, whatever its query language offers."""
    if not event.endswith("."):
        return None
    return event, event[:-1] + "/"


class ChainCheck:
    """Recomputes one tenant's chain, entry by entry in ``seq`` order, so that an adapter
    can feed it page by page; :meth:`add` is False from the first bad entry on."""

    def __init__(self, tenant_id: str) -> None:
        self._tenant_id = tenant_id
        self._checked = 0
        self._prev_hash = GENESIS
        self._bad: tuple[int, str] | None = None

    def add(self, entry: AuditEntry) -> bool:
        """Check the next entry; False once the chain is broken (stop reading)."""
        if self._bad is not None:
            return False
        self._checked += 1
        expected = self._checked
        problem: str | None = None
        if entry.seq != expected:
            problem = (
                f"entry {expected} is missing (the next stored entry is {entry.seq})"
                if entry.seq > expected
                else f"entry {entry.seq} is stored again, or out of order, after entry "
                f"{expected - 1}"
            )
        elif entry.record.tenant_id != self._tenant_id:
            problem = f"entry {expected} names tenant {entry.record.tenant_id!r}"
        elif entry.prev_hash != self._prev_hash:
            problem = f"entry {expected} does not link to entry {expected - 1}" + (
                "" if expected > 1 else " (the first entry links to the genesis hash)"
            )
        elif entry.hash != _recomputed(entry):
            problem = f"entry {expected} was modified: its hash does not match its content"
        if problem is not None:
            self._bad = (expected, problem)
            return False
        self._prev_hash = entry.hash
        return True

    def add_unreadable(self, seq: int) -> None:
        """The next stored entry, at ``seq``, holds what no append writes (its time or
        data does not parse): the store was edited."""
        if self._bad is None:
            self._checked += 1
            self._bad = (seq, f"entry {seq} was modified: its content cannot be read")

    def result(self) -> ChainVerification:
        if self._bad is None:
            return ChainVerification(self._tenant_id, self._checked, intact=True)
        seq, problem = self._bad
        return ChainVerification(
            self._tenant_id, self._checked, intact=False, first_bad_seq=seq, problem=problem
        )


def verify_entries(tenant_id: str, entries: Iterable[AuditEntry]) -> ChainVerification:
    """Check a tenant's whole chain, given its entries in ``seq`` order."""
    check = ChainCheck(tenant_id)
    for entry in entries:
        if not check.add(entry):
            break
    return check.result()


def _recomputed(entry: AuditEntry) -> str | None:
    try:
        return entry_hash(entry.prev_hash, entry.record, entry.seq)
    except ValueError:
        return None  # a naive time, which no append stores: the entry was edited


def _plain(value: Any) -> Any:
    """``value`` as JSON values, deterministically: the same value always gives the same
    form, so a chain recomputes from what was stored."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            # Not JSON: kept as the text that json.dumps would otherwise write bare.
            return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        # A document store may hand 2.0 back as 2: hash both alike.
        return int(value) if value.is_integer() else value
    if isinstance(value, datetime):
        return stamp(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)
