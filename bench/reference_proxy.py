"""The barest useful OpenAI passthrough, to calibrate gateway benchmarks against.

``POST /v1/chat/completions``: read the body, map ``model`` (a deployment name) to the
upstream model, forward it with the upstream key over a pooled keep-alive aiohttp
client, and relay the answer (SSE relayed chunk by chunk). No authentication, no
logging, no checks: what any gateway adds beyond this is the cost of what it does.
aiohttp serves and calls, on uvloop when installed.

    .venv/bin/python -m bench.reference_proxy --port 8300 --upstream http://127.0.0.1:8200/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench.eventloop import serve_until_interrupted

_SESSION = web.AppKey("session", aiohttp.ClientSession)


class Passthrough:
    def __init__(self, upstream: str, model: str, api_key: str) -> None:
        self._url = upstream.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "Invalid JSON."}}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": {"message": "Expected an object."}}, status=400)
        payload["model"] = self._model
        session = request.app[_SESSION]
        body = json.dumps(payload, separators=(",", ":")).encode()
        async with session.post(self._url, data=body, headers=self._headers) as upstream:
            content_type = upstream.headers.get("Content-Type", "application/json")
            if not content_type.startswith("text/event-stream"):
                return web.Response(
                    body=await upstream.read(),
                    status=upstream.status,
                    headers={"Content-Type": content_type},
                )
            relay = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": content_type, "Cache-Control": "no-cache"},
            )
            await relay.prepare(request)
            async for chunk in upstream.content.iter_any():
                await relay.write(chunk)
            await relay.write_eof()
            return relay


async def _ready(_: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def build_app(upstream: str, model: str, api_key: str) -> web.Application:
    app = web.Application()
    passthrough = Passthrough(upstream, model, api_key)

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[_SESSION] = session
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_post("/v1/chat/completions", passthrough.chat_completions)
    app.router.add_get("/readyz", _ready)
    return app


async def serve(host: str, port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        print(f"reference proxy on http://{host}:{port}/v1", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare aiohttp OpenAI passthrough (calibration)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8200/v1")
    parser.add_argument("--model", default="gpt-4o-mini", help="Model sent upstream")
    parser.add_argument("--api-key", default="sk-bench", help="Key sent upstream")
    args = parser.parse_args()
    app = build_app(args.upstream, args.model, args.api_key)
    serve_until_interrupted(serve(args.host, args.port, app))


if __name__ == "__main__":
    main()
