"""Liveness and readiness: the only routes open without authentication."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from client_api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The service can answer: stores open, index readable",
    responses={503: {"model": Health}},
)
async def readyz(request: Request) -> JSONResponse:
    services = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse(Health(status="starting").model_dump(), status_code=503)
    checks: dict[str, str] = services.describe()
    for deployment, state in (await services.gateway.breaker_states()).items():
        checks[f"breaker.{deployment}"] = state.value
    try:
        checks["index_chunks"] = str(await services.index.count_chunks())
    except Exception as exc:  # readiness reports, it must not raise
        checks["index"] = f"error: {type(exc).__name__}"
        return JSONResponse(Health(status="unready", checks=checks).model_dump(), status_code=503)
    return JSONResponse(Health(status="ready", checks=checks).model_dump())
