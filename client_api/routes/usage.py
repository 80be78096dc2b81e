"""Chargeback for administrators: ``GET /v1/usage``, the same table as ``lamina usage``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from client_api.auth.dependencies import UsageAdmin
from client_api.problems import AUTHENTICATED_PROBLEMS, Problem, problem_responses
from client_api.routes.deps import ServicesDep
from client_api.schemas import UsageReport, UsageReportRow
from inferencing.gateway.metering import GroupBy, parse_since

router = APIRouter(tags=["usage"], responses=problem_responses(*AUTHENTICATED_PROBLEMS))


@router.get(
    "/v1/usage",
    response_model=UsageReport,
    summary="Token usage and cost of the caller's tenant, grouped (administrators only)",
    responses=problem_responses(described={403: "The caller lacks the usage.read permission"}),
)
async def usage(
    principal: UsageAdmin,
    services: ServicesDep,
    by: Annotated[GroupBy, Query(description="tenant, user, model or deployment")] = "user",
    since: Annotated[str, Query(description="7d, 24h, 30m, or an ISO date")] = "30d",
) -> UsageReport:
    try:
        start = parse_since(since)
    except ValueError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    except OverflowError:
        detail = f"since {since!r} reaches past the calendar: give a shorter span"
        raise Problem(422, "Invalid request", detail) from None
    meter = services.gateway.meter
    if meter is not None:
        await meter.flush()
    rows = await services.state.ledger.summarize(by, start, tenant_id=principal.tenant_id)
    return UsageReport(
        tenant_id=principal.tenant_id,
        by=by,
        since=start,
        rows=[
            UsageReportRow(
                key=r.key,
                calls=r.calls,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                cost=r.cost,
            )
            for r in rows
        ],
    )
