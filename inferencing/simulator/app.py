"""The simulator's HTTP surface: OpenAI and Azure OpenAI routes plus ``/_sim/`` controls."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Send

from inferencing.simulator.completions import (
    PlannedReply,
    check_chat_request,
    completion_body,
    completion_chunks,
    context_length_problem,
    offered_tools,
    plan_reply,
)
from inferencing.simulator.config import (
    ConfigUpdate,
    DeploymentStats,
    Fault,
    FaultProfile,
    RecordedRequest,
    ScriptUpdate,
    SimulatorConfig,
)
from inferencing.simulator.embeddings import embedding_inputs, embeddings_body
from inferencing.simulator.state import SimulatorState

log = logging.getLogger(__name__)


class _EventStream(StreamingResponse):
    """A streamed body that, when ``complete`` is False, ends by dropping the connection:
    the last chunk of the HTTP body is never sent, as when a server dies mid-answer."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        media_type: str,
        complete: bool,
        state: SimulatorState,
    ) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type)
        self.complete = complete
        self._state = state

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.body_iterator:
            body = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if self.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            log.info("simulator: dropping the connection mid-response (simulated stream_cut)")
            self._state.note_dropped_connection()


async def _without_api_version(
    request: Request, sim: SimulatorState, deployment: str
) -> Response | None:
    """Azure paths need ``api-version``, as Azure's do: the 400 it answers without one."""
    if "api-version" in request.query_params:
        return None
    await _read_body(request, sim, sim.config)
    sim.note_request(deployment)
    sim.note_rejected(deployment)
    return _error(400, "Missing required query parameter 'api-version'.", "invalid_request")


def create_app(
    config: SimulatorConfig | None = None, *, state: SimulatorState | None = None
) -> FastAPI:
    """The simulator as an ASGI app. Pass ``state`` to share it with the caller."""
    sim = state or SimulatorState(config or SimulatorConfig())
    app = FastAPI(title="Lamina OpenAI-compatible simulator", docs_url=None, redoc_url=None)
    app.state.simulator = sim

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat(request, sim, deployment=None)

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def azure_chat_completions(deployment: str, request: Request) -> Response:
        missing = await _without_api_version(request, sim, deployment)
        return missing or await _chat(request, sim, deployment=deployment)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await _embeddings(request, sim, deployment=None)

    @app.post("/openai/deployments/{deployment}/embeddings")
    async def azure_embeddings(deployment: str, request: Request) -> Response:
        missing = await _without_api_version(request, sim, deployment)
        return missing or await _embeddings(request, sim, deployment=deployment)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = sim.config.model
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "lamina"}],
        }

    @app.post("/_sim/script")
    async def script(update: ScriptUpdate) -> dict[str, int]:
        return {"pending_replies": sim.enqueue(update.replies, update.embedding_faults)}

    @app.post("/_sim/config")
    async def configure(update: ConfigUpdate) -> SimulatorConfig:
        return sim.configure(update)

    @app.post("/_sim/reset")
    async def reset() -> dict[str, str]:
        sim.reset()
        return {"status": "reset"}

    @app.get("/_sim/requests")
    async def received() -> list[RecordedRequest]:
        return sim.requests()

    @app.get("/_sim/stats")
    async def stats() -> dict[str, DeploymentStats]:
        return sim.stats()

    return app


# --- chat ----------------------------------------------------------------------------


async def _chat(request: Request, sim: SimulatorState, *, deployment: str | None) -> Response:
    config = sim.config
    body = await _read_body(request, sim, config)
    model = _deployment_name(body, deployment, config)
    sim.note_request(model)
    if refused := _check_credentials(request, config):
        sim.note_rejected(model)
        return refused
    problem = check_chat_request(body)
    if problem is not None:
        sim.note_rejected(model)
        return _error(400, problem, "invalid_request_error")
    profile = config.profile_for(model)
    if profile is not None and profile.context_window is not None:
        too_long = context_length_problem(body, profile.context_window)
        if too_long is not None:
            sim.note_rejected(model)
            return _error(
                400,
                too_long,
                "invalid_request_error",
                "context_length_exceeded",
                param="messages",
            )
    scripted = sim.next_reply(offered_tools(body))
    fault = scripted.fault if scripted else None
    if scripted is None and profile is not None:
        drawn = sim.draw_fault(profile)
        fault = profile.fault(drawn) if drawn is not None else None
    if fault is not None and fault.kind != "stream_cut":
        sim.note_fault(model, fault.kind)
        return await _play_fault(fault, request, sim)
    reply = plan_reply(scripted, body, model=model, config=config)
    await _pause(sim.first_token_delay(profile), sim)
    tokens_per_second = _tokens_per_second(profile, config)
    if not body.get("stream"):
        await _pause(_generation_time(reply, tokens_per_second), sim)
        if fault is not None:
            sim.note_stream_cut(model)
            payload = json.dumps(completion_body(reply)).encode()
            return _EventStream(
                _one(payload[: len(payload) // 2]),
                media_type="application/json",
                complete=False,
                state=sim,
            )
        sim.note_completed(model)
        return JSONResponse(completion_body(reply))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = completion_chunks(
        reply, include_usage=include_usage, argument_chunk_chars=config.tool_argument_chunk_chars
    )
    cut_after = fault.after_chunks if fault is not None else None
    if scripted is None and profile is not None:
        cut_after = sim.draw_stream_cut(profile, len(chunks))
    return _EventStream(
        _sse(chunks, cut_after, tokens_per_second, sim, model),
        media_type="text/event-stream",
        complete=cut_after is None,
        state=sim,
    )


async def _sse(
    chunks: list[dict[str, Any]],
    cut_after: int | None,
    tokens_per_second: float | None,
    sim: SimulatorState,
    model: str,
) -> AsyncIterator[bytes]:
    delay = 1.0 / tokens_per_second if tokens_per_second else 0.0
    for position, chunk in enumerate(chunks):
        if cut_after is not None and position >= cut_after:
            sim.note_stream_cut(model)
            return
        if position and delay:
            await _pause(delay, sim)
        if sim.closing.is_set():
            return
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    # Counted before the last event, so a client that saw [DONE] also sees the count.
    if cut_after is None:
        sim.note_completed(model)
    else:
        sim.note_stream_cut(model)
    yield b"data: [DONE]\n\n"


def _generation_time(reply: PlannedReply, tokens_per_second: float | None) -> float:
    if not tokens_per_second:
        return 0.0
    return reply.completion_tokens / tokens_per_second


def _tokens_per_second(profile: FaultProfile | None, config: SimulatorConfig) -> float | None:
    if profile is not None and profile.tokens_per_second is not None:
        return profile.tokens_per_second
    return config.tokens_per_second


# --- embeddings ----------------------------------------------------------------------


async def _embeddings(request: Request, sim: SimulatorState, *, deployment: str | None) -> Response:
    config = sim.config
    body = await _read_body(request, sim, config)
    model = _deployment_name(body, deployment, config)
    sim.note_request(model)
    if refused := _check_credentials(request, config):
        sim.note_rejected(model)
        return refused
    texts = embedding_inputs(body)
    if isinstance(texts, str):
        sim.note_rejected(model)
        return _error(400, texts, "invalid_request_error")
    profile = config.profile_for(model)
    fault = sim.next_embedding_fault()
    if fault is None and profile is not None:
        drawn = sim.draw_fault(profile)
        fault = profile.fault(drawn) if drawn is not None else None
    if fault is not None and fault.kind != "stream_cut":
        sim.note_fault(model, fault.kind)
        return await _play_fault(fault, request, sim)
    await _pause(sim.first_token_delay(profile), sim)
    payload = embeddings_body(texts, body, model=model, dims=config.embedding_dims)
    if fault is not None:
        sim.note_stream_cut(model)
        raw = json.dumps(payload).encode()
        return _EventStream(
            _one(raw[: len(raw) // 2]), media_type="application/json", complete=False, state=sim
        )
    sim.note_completed(model)
    return JSONResponse(payload)


# --- shared --------------------------------------------------------------------------


async def _read_body(request: Request, sim: SimulatorState, config: SimulatorConfig) -> Any:
    """The request's JSON body (or text), recorded unless ``record_requests`` is off."""
    raw = await request.body()
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", errors="replace")
    if not config.record_requests:
        return body
    sim.record(
        RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
    )
    return body


def _deployment_name(body: Any, deployment: str | None, config: SimulatorConfig) -> str:
    """The Azure path's deployment, else the body's ``model``, else the configured model."""
    if deployment:
        return deployment
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) and model else config.model


def _check_credentials(request: Request, config: SimulatorConfig) -> Response | None:
    if not config.accepted_credentials:
        return None
    presented = request.headers.get("api-key")
    authorization = request.headers.get("authorization", "")
    if presented is None and authorization.lower().startswith("bearer "):
        presented = authorization[len("bearer ") :]
    if presented in config.accepted_credentials:
        return None
    return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


async def _play_fault(fault: Fault, request: Request, sim: SimulatorState) -> Response:
    if fault.kind == "rate_limited":
        seconds = fault.retry_after_s
        retry_after = str(int(seconds)) if seconds == int(seconds) else str(seconds)
        return _error(
            429,
            fault.message or "Rate limit reached for requests. Please retry later.",
            "requests",
            "rate_limit_exceeded",
            headers={"retry-after": retry_after},
        )
    if fault.kind == "unavailable":
        return _error(
            503, fault.message or "The server is overloaded.", "server_error", "overloaded"
        )
    if fault.kind == "timeout":
        await _hang(request, sim, fault.hang_s)
        return _error(504, fault.message or "Gateway timeout.", "server_error", "timeout")
    return _error(
        fault.status_code, fault.message or f"Simulated error {fault.status_code}.", "api_error"
    )


async def _hang(request: Request, sim: SimulatorState, seconds: float) -> None:
    """Wait ``seconds``, or less if the client gives up or the server stops."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not sim.closing.is_set():
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)


async def _pause(seconds: float, sim: SimulatorState) -> None:
    if seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    while not sim.closing.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.05))


async def _one(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


def _error(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))
