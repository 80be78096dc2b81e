"""The FastAPI app factory."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from fastapi import FastAPI

from client_api.auth.api_keys import ApiKeyAuthenticator
from client_api.auth.dependencies import Authenticator
from client_api.auth.groups import (
    AzureCredentialGraphToken,
    GraphGroupResolver,
    GraphTokenProvider,
    GroupResolver,
)
from client_api.auth.jwt import JwtValidator
from client_api.composition import build_services
from client_api.edge.admission import RateLimitHeaders
from client_api.edge.caps import BodySizeLimit
from client_api.mcp_server import mount_mcp_server
from client_api.problems import CORRELATION_HEADER, install_problem_handlers
from client_api.routes import (
    approvals,
    audit,
    chat,
    chat_protocol,
    chunks,
    conversations,
    health,
    jobs,
    me,
    openai_compat,
    usage,
)
from client_api.settings import LaminaSettings, load_settings, require_serving_settings
from client_api.telemetry import configure_telemetry
from client_api.web import mount_web

YOUNG_GC_THRESHOLD = 10_000
"""The garbage collector's first threshold once the app has started (CPython's is 700)."""


def create_app(
    settings: LaminaSettings | None = None, *, graph_token: GraphTokenProvider | None = None
) -> FastAPI:
    """Build the app; invalid settings fail here, before the server listens.

    ``graph_token``: where Microsoft Graph tokens come from (for group memberships);
    default ``DefaultAzureCredential``."""
    settings = settings or load_settings()
    require_serving_settings(settings)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    telemetry = configure_telemetry(settings.telemetry)
    docs = settings.api.publish_docs or settings.auth.mode == "dev"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=10.0) as http:
            services = await build_services(settings)
            groups = _group_resolver(settings, http, graph_token)
            validator = _validator(settings, http, groups)
            app.state.authenticator = Authenticator(
                settings.auth, validator, api_keys=ApiKeyAuthenticator(services.api_keys)
            )
            app.state.services = services
            # What start-up loaded (the token encoding's 200k-entry tables, the SDKs) lives
            # as long as the process: keep it out of the collector's full passes, whose
            # pauses would otherwise show in every percentile.
            gc.collect()
            gc.freeze()
            # The young generation is collected when allocations outnumber frees by the
            # threshold; under concurrency, objects of requests in flight survive each
            # collection and are promoted, then collected again in older generations (at
            # 700, about a tenth of a passthrough's CPU). 10,000 cuts that tenfold, for
            # at most a few megabytes of young garbage waiting.
            gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
            try:
                await services.job_runner.start()
                async with AsyncExitStack() as running:
                    if mcp is not None:
                        await running.enter_async_context(mcp.running(services))
                    if settings.teams.enabled:
                        # Imported here: the Agents SDK is an optional extra, slow to import.
                        from client_api.teams.adapter import running_bot

                        app.state.teams_bot = await running.enter_async_context(
                            running_bot(settings, services, http, groups=groups)
                        )
                    yield
            finally:
                app.state.teams_bot = None
                if validator is not None:
                    await validator.aclose()
                await services.aclose()
                await asyncio.to_thread(telemetry.flush)

    app = FastAPI(
        title="Lamina",
        version="0.1.0",
        summary="Enterprise assistant backend: grounded, security-trimmed answers with citations.",
        lifespan=lifespan,
        # Only health is open without credentials, unless the operator publishes the docs.
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        # Requests are traced and measured by client_api.telemetry alone (trace ids as
        # correlation ids, scrubbed URLs): FastAPI's own telemetry stays off, where it
        # would otherwise wrap every request (and trace it twice when no exporter is set).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    # Outermost first: refuse oversized bodies before anything reads them, and put the
    # rate-limit headers on every response, errors included.
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.caps.max_body_bytes,
        # Uploads have a cap of their own, with room for the multipart framing around it.
        path_limits={
            jobs.INGEST_PATH: (
                settings.jobs.max_upload_bytes + 1024 * 1024,
                "LAMINA_JOBS__MAX_UPLOAD_BYTES",
            )
        },
    )
    # The trace id, when tracing is on: the instrumentation's server span encloses
    # every middleware, so it is current here.
    telemetry.add_correlation_ids(app, CORRELATION_HEADER)
    telemetry.instrument(app)
    install_problem_handlers(app)
    app.include_router(health.router)
    # First among the API routes: Starlette tries routes in order, and the passthrough is
    # the hottest path (matching it sixth cost some 30 µs a request). No paths overlap.
    app.include_router(openai_compat.router)
    app.include_router(chat.router)
    app.include_router(conversations.router)
    app.include_router(me.router)
    app.include_router(approvals.router)
    app.include_router(chat_protocol.router)
    app.include_router(usage.router)
    app.include_router(jobs.router)
    app.include_router(audit.router)
    app.include_router(chunks.router)
    mount_web(app, settings)
    mcp = mount_mcp_server(app) if settings.api.mcp_server else None
    app.state.teams_bot = None
    if settings.teams.enabled:
        from client_api.teams.adapter import mount_teams

        mount_teams(app, settings, lambda: app.state.teams_bot)
    return app


def _group_resolver(
    settings: LaminaSettings, http: httpx.AsyncClient, graph_token: GraphTokenProvider | None
) -> GroupResolver | None:
    """Group memberships from Microsoft Graph: for tokens whose groups overflowed, and
    for Teams users (a Teams activity carries no groups). Only with real sign-in."""
    if settings.auth.mode != "jwt":
        return None
    return GraphGroupResolver.from_settings(
        settings.auth, http, graph_token or AzureCredentialGraphToken()
    )


def _validator(
    settings: LaminaSettings, http: httpx.AsyncClient, groups: GroupResolver | None
) -> JwtValidator | None:
    if settings.auth.mode != "jwt":
        return None
    return JwtValidator(settings.auth, http, groups=groups)
