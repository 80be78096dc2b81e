"""A person's data-subject rights: export everything stored about them, or erase it.

:class:`PersonalData` goes through every :class:`~intelligence.contracts.PersonalDataHolder`
the composition root lists, and writes one audit record per request
(``privacy.export`` or ``privacy.erase``, with counts, never the content). The audit
log itself is the one store an erasure leaves alone: it is the append-only record of
who asked what, and of the erasure too.

The holders of this layer's own stores and of the tools layer's approval gate live
here; holders of lower layers' concrete stores (usage metering) live with the
composition root, which alone may see them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic_core import PydanticSerializationError, to_jsonable_python

from intelligence.answer_cache import AnswerCache
from intelligence.contracts import (
    AuditLog,
    AuditRecord,
    ConversationStore,
    IntelligenceError,
    PersonalDataHolder,
    Principal,
)
from tools.contracts import ApprovalGate, ApprovalRequest

log = logging.getLogger(__name__)


def json_ready(value: object) -> Any:
    """``value`` as JSON can carry it (dataclasses and mappings as objects, sequences and
    sets as arrays, datetimes as ISO 8601 text, enums as their values); ``TypeError``
    for anything else."""
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError as exc:
        raise TypeError(str(exc)) from exc


@dataclass
class PersonalDataIncomplete(IntelligenceError):
    """Some stores could not export or erase the caller's data now; the others did.

    Nothing is reported done that was not: ``failed`` names the stores to try again
    (asking again is safe), ``erased`` counts what the other stores did erase."""

    action: Literal["export", "erase"] = "erase"
    failed: tuple[str, ...] = ()
    erased: Mapping[str, int] = field(default_factory=dict)
    code: str = "personal_data_incomplete"


class PersonalData:
    """Export and erasure across every store that keeps data about people.

    Erasure goes through every holder even when one fails, then raises
    :class:`PersonalDataIncomplete` naming those that failed; export raises it too
    (a partial export would pass for a complete one). Both are audited either way.
    """

    def __init__(self, holders: Sequence[PersonalDataHolder], audit: AuditLog) -> None:
        names = [holder.name for holder in holders]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"personal data holders need distinct names: {duplicated}")
        self._holders = tuple(holders)
        self._audit = audit

    @property
    def holders(self) -> tuple[str, ...]:
        """The names of the stores, in the order they are gone through."""
        return tuple(holder.name for holder in self._holders)

    async def export(self, principal: Principal, correlation_id: str | None) -> dict[str, Any]:
        """Everything stored about the caller: one key per holder."""
        exported: dict[str, Any] = {}
        failed: list[str] = []
        for holder in self._holders:
            try:
                exported[holder.name] = json_ready(await holder.export_user(principal))
            except Exception as exc:
                _log_failure("export", holder.name, exc)
                failed.append(holder.name)
        counts = {name: _count(value) for name, value in exported.items()}
        await self._record("privacy.export", principal, correlation_id, counts, failed)
        if failed:
            raise PersonalDataIncomplete(
                _message("exported", failed), action="export", failed=tuple(failed)
            )
        return exported

    async def erase(self, principal: Principal, correlation_id: str | None) -> dict[str, int]:
        """Delete everything stored about the caller; how many items went per holder."""
        erased: dict[str, int] = {}
        failed: list[str] = []
        for holder in self._holders:
            try:
                erased[holder.name] = await holder.erase_user(principal)
            except Exception as exc:
                _log_failure("erase", holder.name, exc)
                failed.append(holder.name)
        await self._record("privacy.erase", principal, correlation_id, erased, failed)
        if failed:
            raise PersonalDataIncomplete(
                _message("erased", failed), action="erase", failed=tuple(failed), erased=erased
            )
        return erased

    async def _record(
        self,
        event: str,
        principal: Principal,
        correlation_id: str | None,
        counts: Mapping[str, int],
        failed: Sequence[str],
    ) -> None:
        await self._audit.append(
            AuditRecord(
                event=event,
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                correlation_id=correlation_id,
                data={"counts": dict(counts), "failed": list(failed)},
                at=datetime.now(UTC),
            )
        )


def _log_failure(action: str, holder: str, exc: Exception) -> None:
    # Type and message only: a store's error may quote the data it was handling.
    log.warning("personal data: %s failed in %s (%s: %s)", action, holder, type(exc).__name__, exc)


def _message(done: str, failed: Sequence[str]) -> str:
    return (
        f"Your data could not be {done} from: {', '.join(failed)}. "
        "The other stores were done; ask again to finish."
    )


def _count(value: object) -> int:
    return len(value) if isinstance(value, list | dict) else int(value is not None)


# --- holders of this layer's stores and of the approval gate ---------------------------


class ConversationData:
    """The caller's conversations, with every message and idempotency key."""

    name = "conversations"

    def __init__(self, store: ConversationStore) -> None:
        self._store = store

    async def export_user(self, principal: Principal) -> Any:
        return json_ready(await self._store.export_user(principal))

    async def erase_user(self, principal: Principal) -> int:
        return await self._store.delete_user(principal)


class AnswerCacheData:
    """Cached answers stored from the caller's turns (their plan names the question).

    Exported without the question's embedding: numbers derived from the question, which
    the plan's steps already show."""

    name = "answer_cache"

    def __init__(self, cache: AnswerCache) -> None:
        self._cache = cache

    async def export_user(self, principal: Principal) -> Any:
        return json_ready(
            [
                {
                    "id": entry.id,
                    "created_at": datetime.fromtimestamp(entry.answer.created_at, UTC),
                    "answer": entry.answer.answer,
                    "citations": entry.answer.citations,
                    "plan": entry.answer.plan,
                }
                for entry in await self._cache.entries_of(principal)
            ]
        )

    async def erase_user(self, principal: Principal) -> int:
        return await self._cache.forget_user(principal)


class ApprovalData:
    """Approvals the caller requested (any status) or decided."""

    name = "approvals"

    def __init__(self, gate: ApprovalGate) -> None:
        self._gate = gate

    async def export_user(self, principal: Principal) -> Any:
        return [
            _approval_export(approval, principal)
            for approval in await self._gate.approvals_of(principal)
        ]

    async def erase_user(self, principal: Principal) -> int:
        return await self._gate.forget_user(principal)


def _approval_export(approval: ApprovalRequest, principal: Principal) -> Any:
    """An approval as its requester or its decider may see it. The paused turn (``resume``)
    is internal state, and holds what the requester's access found: never exported. To a
    decider of someone else's approval, only their own part of it: what they decided."""
    if approval.requested_by == principal.user_id and approval.tenant_id == principal.tenant_id:
        return json_ready(dataclasses.replace(approval, resume={}))
    return json_ready(
        {
            "id": approval.id,
            "tool": approval.tool,
            "status": approval.status,
            "decided_by": approval.decided_by,
            "decided_at": approval.decided_at,
            "reason": approval.reason,
        }
    )
