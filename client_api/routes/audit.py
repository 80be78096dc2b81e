"""The audit log for auditors: ``GET /v1/audit`` and ``GET /v1/audit/verify``.

Both need the ``audit.read`` permission (the ``Lamina.Auditor`` role; administrators do
not hold it), and both act on the caller's own tenant: the tenant is never a parameter.
``lamina audit`` offers the same to operators, across tenants.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from client_api.auth.dependencies import require
from client_api.auth.permissions import Permission
from client_api.problems import AUTHENTICATED_PROBLEMS, Problem, problem_responses
from client_api.routes.deps import ServicesDep
from inferencing.gateway.metering import parse_since
from intelligence.contracts import AuditEntry, AuditQuery, ChainVerification, Principal

router = APIRouter(
    prefix="/v1/audit", tags=["audit"], responses=problem_responses(*AUTHENTICATED_PROBLEMS)
)
_NOT_AUDITOR = problem_responses(described={403: "The caller lacks the audit.read permission"})

AuditReader = Annotated[Principal, Depends(require(Permission.AUDIT_READ))]
"""A caller who may read and verify the tenant's audit log (an auditor)."""

MAX_PAGE = 1000


class AuditEntryView(BaseModel):
    seq: int = Field(description="Position in the tenant's chain, from 1, without gaps")
    hash: str = Field(description="SHA-256 of prev_hash and the entry's canonical JSON")
    prev_hash: str = Field(description="hash of the previous entry (64 zeros for the first)")
    event: str
    user_id: str
    correlation_id: str | None
    at: datetime
    data: dict[str, Any]

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditEntryView:
        record = entry.record
        return cls(
            seq=entry.seq,
            hash=entry.hash,
            prev_hash=entry.prev_hash,
            event=record.event,
            user_id=record.user_id,
            correlation_id=record.correlation_id,
            at=record.at,
            data=dict(record.data),
        )


class AuditPageView(BaseModel):
    tenant_id: str
    entries: list[AuditEntryView]
    next_after_seq: int | None = Field(
        default=None, description="Pass as after_seq for the next page; null on the last"
    )


class ChainVerificationView(BaseModel):
    tenant_id: str
    entries: int = Field(description="How many entries were checked")
    intact: bool
    first_bad_seq: int | None = Field(
        default=None, description="The first entry whose hash, link or position is wrong"
    )
    problem: str | None = None

    @classmethod
    def of(cls, result: ChainVerification) -> ChainVerificationView:
        return cls(
            tenant_id=result.tenant_id,
            entries=result.entries,
            intact=result.intact,
            first_bad_seq=result.first_bad_seq,
            problem=result.problem,
        )


def audit_query(
    tenant_id: str,
    *,
    event: str | None = None,
    user_id: str | None = None,
    correlation_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    after_seq: int = 0,
    limit: int = 100,
) -> AuditQuery:
    """The query, with ``since`` and ``until`` read as a span ago (``7d``, ``24h``) or an
    ISO date or date-time (UTC without a zone). Raises ``ValueError`` saying what is wrong
    (``lamina audit list`` shares it, so both accept the same)."""
    start = _instant("since", since)
    end = _instant("until", until)
    if start is not None and end is not None and start >= end:
        raise ValueError("since must be before until")
    if event is not None and not event.strip("."):
        raise ValueError("event must be an event name such as chat.turn, or a prefix like tool.")
    if after_seq < 0:
        raise ValueError("after_seq must be 0 or more")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    return AuditQuery(
        tenant_id=tenant_id,
        event=event,
        user_id=user_id,
        correlation_id=correlation_id,
        since=start,
        until=end,
        after_seq=after_seq,
        limit=limit,
    )


def _instant(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        # In UTC here, as the stores compare it: a time at the edge of the calendar
        # (0001-01-01T00:00+01:00) overflows now, not in the store's query.
        return parse_since(value).astimezone(UTC)
    except ValueError:
        raise ValueError(
            f"{name} must be a span ago such as 7d, 24h or 30m, or an ISO date; got {value!r}"
        ) from None
    except OverflowError:
        raise ValueError(
            f"{name} {value!r} is outside the calendar (years 1 to 9999 UTC): give a shorter "
            "span or a date within it"
        ) from None


@router.get(
    "",
    response_model=AuditPageView,
    summary="The tenant's audit log, in chain order (auditors only)",
    responses=_NOT_AUDITOR,
)
async def list_entries(
    principal: AuditReader,
    services: ServicesDep,
    event: Annotated[
        str | None,
        Query(max_length=200, description="An event name, or a prefix ending in '.' (tool.)"),
    ] = None,
    user_id: Annotated[str | None, Query(max_length=256)] = None,
    correlation_id: Annotated[str | None, Query(max_length=256)] = None,
    since: Annotated[
        str | None, Query(max_length=64, description="7d, 24h, 30m ago, or an ISO date-time")
    ] = None,
    until: Annotated[
        str | None,
        Query(max_length=64, description="Before this (exclusive): a span ago or ISO date-time"),
    ] = None,
    after_seq: Annotated[int, Query(ge=0, description="Entries after this seq (paging)")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> AuditPageView:
    try:
        query = audit_query(
            principal.tenant_id,
            event=event,
            user_id=user_id,
            correlation_id=correlation_id,
            since=since,
            until=until,
            after_seq=after_seq,
            limit=limit,
        )
    except ValueError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    page = await services.audit.query(query)
    return AuditPageView(
        tenant_id=principal.tenant_id,
        entries=[AuditEntryView.of(entry) for entry in page.entries],
        next_after_seq=page.next_after_seq,
    )


@router.get(
    "/verify",
    response_model=ChainVerificationView,
    summary="Recompute the tenant's hash chain (auditors only)",
    description="200 whether or not the chain is intact: `intact` says, and `first_bad_seq` "
    "names the first entry that was modified, removed or moved.",
    responses=_NOT_AUDITOR,
)
async def verify_chain(principal: AuditReader, services: ServicesDep) -> ChainVerificationView:
    return ChainVerificationView.of(await services.audit.verify(principal.tenant_id))
