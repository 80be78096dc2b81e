"""Request caps: each cap refuses an input over it and lets one at it through."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request

from client_api.edge.caps import BodySizeLimit, CapExceeded, CapsSettings, RequestCaps
from inferencing.contracts import ChatMessage, Role
from inferencing.tokens import default_counter
from tests.support.processes import app_in_thread

CAPS = CapsSettings(max_prompt_tokens=50, max_history_turns=2, max_output_tokens=100)


@pytest.fixture(scope="module")
def caps() -> RequestCaps:
    return RequestCaps(CAPS, default_counter())


def _conversation(user_turns: int) -> list[ChatMessage]:
    messages = [ChatMessage(Role.SYSTEM, "Be brief.")]
    for n in range(user_turns):
        messages.append(ChatMessage(Role.USER, f"Question {n}?"))
        messages.append(ChatMessage(Role.ASSISTANT, f"Answer {n}."))
    return messages[:-1]  # ends with the current user turn


async def test_a_prompt_over_the_token_cap_is_too_large(caps: RequestCaps) -> None:
    with pytest.raises(CapExceeded) as refused:
        await caps.check_message("word " * 200)
    assert refused.value.status == 413
    assert refused.value.cap == "max_prompt_tokens"
    assert "LAMINA_CAPS__MAX_PROMPT_TOKENS" in refused.value.message


async def test_a_prompt_within_the_token_cap_passes(caps: RequestCaps) -> None:
    await caps.check_message("How many days of leave do I get?")


async def test_a_long_prompt_is_counted_and_refused_off_the_event_loop(caps: RequestCaps) -> None:
    with pytest.raises(CapExceeded, match="tokens"):
        await caps.check_message("x " * 60_000)


async def test_a_completion_within_the_caps_returns_the_prompt_tokens(caps: RequestCaps) -> None:
    """The count the gateway is handed instead of counting again: the counter's own."""
    messages = _conversation(2)
    tokens = await caps.check_completion(messages, (), max_tokens=None)
    assert tokens == default_counter().count_messages(messages, ())


async def test_asking_for_more_output_than_the_cap_is_unprocessable(caps: RequestCaps) -> None:
    with pytest.raises(CapExceeded) as refused:
        await caps.check_completion(_conversation(1), (), max_tokens=101)
    assert (refused.value.status, refused.value.cap) == (422, "max_output_tokens")
    await caps.check_completion(_conversation(1), (), max_tokens=100)
    await caps.check_completion(_conversation(1), (), max_tokens=None)


async def test_a_history_over_the_cap_is_unprocessable(caps: RequestCaps) -> None:
    with pytest.raises(CapExceeded) as refused:
        await caps.check_completion(_conversation(4), (), max_tokens=None)
    assert (refused.value.status, refused.value.cap) == (422, "max_history_turns")
    assert "3 earlier user turns" in refused.value.message
    await caps.check_completion(_conversation(3), (), max_tokens=None)


async def test_a_completion_prompt_over_the_cap_is_too_large(caps: RequestCaps) -> None:
    messages = [ChatMessage(Role.USER, "tell me " * 100)]
    with pytest.raises(CapExceeded) as refused:
        await caps.check_completion(messages, (), max_tokens=None)
    assert (refused.value.status, refused.value.cap) == (413, "max_prompt_tokens")


# --- the body-size middleware over real HTTP ------------------------------------------


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=2048)
    with app_in_thread(app) as base:
        yield base


def test_a_body_over_the_cap_is_refused_with_413(echo_server: str) -> None:
    response = httpx.post(f"{echo_server}/echo", content=b"x" * 2049)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "LAMINA_CAPS__MAX_BODY_BYTES" in response.json()["detail"]


def test_a_body_at_the_cap_is_passed_on_whole(echo_server: str) -> None:
    response = httpx.post(f"{echo_server}/echo", content=b"x" * 2048)
    assert response.json() == {"received": 2048}


def _chunked_post(base: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """A chunked upload (no Content-Length), written by hand to control the framing."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        head = f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        conn.sendall((head + "Connection: close\r\n\r\n").encode())
        for chunk in chunks:
            conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
        raw = b""
        while data := conn.recv(65536):
            raw += data
    status = int(raw.split(b" ", 2)[1])
    return status, raw.split(b"\r\n\r\n", 1)[1]


def test_a_chunked_body_over_the_cap_is_refused(echo_server: str) -> None:
    status, _ = _chunked_post(echo_server, [b"x" * 1500, b"y" * 1500])
    assert status == 413


def test_a_chunked_body_under_the_cap_arrives_whole(echo_server: str) -> None:
    status, body = _chunked_post(echo_server, [b"x" * 1000, b"y" * 1000])
    assert status == 200
    assert b'"received":2000' in body


def test_the_chat_api_may_not_exceed_the_caps_it_enforces() -> None:
    from client_api.settings import LaminaSettings, SettingsError, require_serving_settings

    settings = LaminaSettings(
        auth={"mode": "dev"},
        caps={"max_output_tokens": 500, "max_history_turns": 4},
        inferencing={"max_output_tokens": 800},
        intelligence={"history_turns": 6},
    )
    with pytest.raises(SettingsError) as refused:
        require_serving_settings(settings)
    assert "LAMINA_INFERENCING__MAX_OUTPUT_TOKENS: at most LAMINA_CAPS__MAX_OUTPUT_TOKENS" in str(
        refused.value
    )
    assert "LAMINA_INTELLIGENCE__HISTORY_TURNS" in str(refused.value)
    require_serving_settings(LaminaSettings(auth={"mode": "dev"}))
