"""A zero-latency OpenAI-compatible upstream for gateway benchmarks.

``POST /v1/chat/completions`` answers a fixed, valid ``chat.completion`` (with
``usage``); with ``"stream": true`` it answers a few ``chat.completion.chunk`` SSE
events and ``data: [DONE]`` (plus a usage chunk when ``stream_options.include_usage``).
``GET /v1/models``, ``/healthz`` and ``/readyz`` answer too; anything else is a 404.

Each reply is canned bytes written by a raw ``asyncio.Protocol`` HTTP/1.1 server with
keep-alive, so the direct baseline of a benchmark costs as little as an upstream can.
The request body is only looked into when it mentions ``"stream"``.

    .venv/bin/python -m bench.stub_upstream --port 8200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, cast

from bench.eventloop import serve_until_interrupted

MODEL = "gpt-4o-mini"
REPLY_PIECES = ("Hello", " from", " the", " stub", ".")
USAGE = {"prompt_tokens": 9, "completion_tokens": len(REPLY_PIECES), "total_tokens": 14}
_MAX_HEAD = 64 * 1024


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _response(
    status: str, body: bytes, content_type: bytes = b"application/json", *, close: bool = False
) -> bytes:
    head = [
        b"HTTP/1.1 " + status.encode(),
        b"Content-Type: " + content_type,
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _chunked_sse(events: list[bytes]) -> bytes:
    """An SSE response in chunked transfer encoding, one HTTP chunk per event, as OpenAI does."""
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream; charset=utf-8\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    return head + b"".join(chunks) + b"0\r\n\r\n"


class CannedReplies:
    """Every reply the stub can give, rendered to bytes once at start-up."""

    def __init__(self, created: int | None = None) -> None:
        created = int(time.time()) if created is None else created
        completion = {
            "id": "chatcmpl-bench-stub",
            "object": "chat.completion",
            "created": created,
            "model": MODEL,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(REPLY_PIECES),
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
        self.completion = _response("200 OK", _json(completion))
        events = self._stream_events(created)
        self.stream = _chunked_sse([*events[:-1], b"data: [DONE]\n\n"])
        self.stream_with_usage = _chunked_sse([*events, b"data: [DONE]\n\n"])
        models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "stub"}]}
        self.models = _response("200 OK", _json(models))
        self.ready = _response("200 OK", b'{"status":"ready"}')
        self.not_found = _response("404 Not Found", self._error("Not found.", "not_found"))
        self.bad_request = _response(
            "400 Bad Request", self._error("Malformed request.", "invalid_request"), close=True
        )

    @staticmethod
    def _error(message: str, code: str) -> bytes:
        return _json({"error": {"message": message, "type": code, "param": None, "code": code}})

    @staticmethod
    def _stream_events(created: int) -> list[bytes]:
        """Role chunk, one chunk per piece, finish chunk, then the usage chunk (last)."""

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {
                "id": "chatcmpl-bench-stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
            return b"data: " + _json(body) + b"\n\n"

        def delta(content: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            return event([choice])

        events = [delta({"role": "assistant", "content": ""})]
        events += [delta({"content": piece}) for piece in REPLY_PIECES]
        events.append(delta({}, "stop"))
        events.append(event([], usage=USAGE))
        return events

    def for_request(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST" and path == b"/v1/chat/completions":
            if b'"stream"' not in body:
                return self.completion
            return self._for_stream_request(body)
        if method == b"GET":
            if path in (b"/readyz", b"/healthz"):
                return self.ready
            if path == b"/v1/models":
                return self.models
        return self.not_found

    def _for_stream_request(self, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except ValueError:
            return self.bad_request
        if not isinstance(payload, dict) or payload.get("stream") is not True:
            return self.completion
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return self.stream_with_usage if include_usage else self.stream


class _Incomplete(Exception):
    """More bytes are needed before the request can be answered."""


class _Malformed(Exception):
    """The bytes are not an HTTP/1.1 request this server understands."""


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int]:
    """A chunked body beginning at ``start``: (body, index just past it)."""
    body = bytearray()
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            raise _Incomplete
        try:
            size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
        except ValueError:
            raise _Malformed from None
        position = line_end + 2
        if size == 0:
            # Trailer fields, if any, end with an empty line.
            trailers_end = buffer.find(b"\r\n", position)
            while trailers_end > position:
                position = trailers_end + 2
                trailers_end = buffer.find(b"\r\n", position)
            if trailers_end < 0:
                raise _Incomplete
            return bytes(body), trailers_end + 2
        if len(buffer) < position + size + 2:
            raise _Incomplete
        body += buffer[position : position + size]
        position += size + 2


class StubProtocol(asyncio.Protocol):
    """One keep-alive connection: parse each request, answer it with canned bytes."""

    def __init__(self, replies: CannedReplies) -> None:
        self._replies = replies
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # Pipelined requests are answered in order.
        while self._buffer and self._transport is not None:
            try:
                reply, close = self._next_reply()
            except _Incomplete:
                return
            except _Malformed:
                reply, close = self._replies.bad_request, True
            self._transport.write(reply)
            if close:
                self._transport.close()
                self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def _next_reply(self) -> tuple[bytes, bool]:
        buffer = self._buffer
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buffer) > _MAX_HEAD:
                raise _Malformed
            raise _Incomplete
        lines = bytes(buffer[:head_end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _Malformed
        method, target, version = parts
        length = 0
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _Malformed from None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                connection = value.strip().lower()
        body_start = head_end + 4
        if chunked:
            body, end = _dechunk(buffer, body_start)
        else:
            end = body_start + length
            if len(buffer) < end:
                raise _Incomplete
            body = bytes(buffer[body_start:end])
        del buffer[:end]
        keep_alive = connection != b"close" and (
            version == b"HTTP/1.1" or connection == b"keep-alive"
        )
        path = target.split(b"?", 1)[0]
        return self._replies.for_request(method, path, body), not keep_alive


async def serve(host: str, port: int) -> None:
    replies = CannedReplies()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(replies), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"stub upstream on http://{host}:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Zero-latency OpenAI-compatible upstream stub")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    serve_until_interrupted(serve(args.host, args.port))


if __name__ == "__main__":
    main()
