"""Memory regression: a ``lamina serve`` process answers 2,000 requests, 50 at a time,
and its resident set grows by less than 50 MB.

A leak that costs a few kilobytes a request (a list of finished turns kept for ever, a
cache without a bound, a span or a stream never closed) is invisible in a unit test and
fatal to a replica that runs for weeks; this test makes it show. The server is the real
command line (model mode, the real ``openai`` client against the OpenAI-compatible
simulator at zero latency), started through :mod:`tests.support.collectable_serve` so
that the test can make it collect its garbage before each reading. A warm-up batch runs
first, so that what is allocated once (lazy imports, connection pools, caches filling to
their bound, the first compiled regexes) is in the baseline, not in the growth.

The load mixes every way to ask: ``POST /v1/chat`` and ``/v1/chat/stream`` (grounded
turns: retrieval, then the model), and ``POST /v1/chat/completions`` for the logical
model ``lamina-rag`` and as a gateway passthrough, each streamed and not; half of the
requests stream. Every request must succeed, or the figure would measure errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from inferencing.simulator import SimulatorServer
from tests.e2e.conftest import write_corpus
from tests.support.collectable_serve import REPORT_VARIABLE
from tests.support.processes import free_port, ingest_corpus, lamina_process
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

REQUESTS = 2_000
WARM_UP = 400
CONCURRENCY = 50
GROWTH_LIMIT_MB = 50.0
USERS = 8

Check = Callable[[bytes], str | None]
"""Why a response body (status 200) is not a success, or ``None``."""


@dataclass(frozen=True)
class Kind:
    """One way to ask: a route, the body of request ``i``, and what success looks like."""

    name: str
    path: str
    body: Callable[[int], dict[str, object]]
    check: Check


def _question(i: int) -> str:
    # Distinct questions: nothing is served twice from a cache the test would then measure.
    return f"When does the cafeteria on floor three open? (request {i})"


def _json_answer(raw: bytes) -> str | None:
    answer = json.loads(raw).get("answer")
    return None if isinstance(answer, str) and answer else f"no answer in {raw[:200]!r}"


def _sse_done(raw: bytes) -> str | None:
    events = [line for line in raw.decode().splitlines() if line.startswith("event:")]
    return None if events and events[-1] == "event: done" else f"stream ended {events[-1:]}"


def _completion(raw: bytes) -> str | None:
    choices = json.loads(raw).get("choices") or [{}]
    content = choices[0].get("message", {}).get("content")
    return None if content else f"no content in {raw[:200]!r}"


def _chunks_done(raw: bytes) -> str | None:
    data = [line for line in raw.decode().splitlines() if line.startswith("data:")]
    return None if len(data) > 1 and data[-1] == "data: [DONE]" else f"stream ended {data[-1:]}"


def _turn(i: int) -> dict[str, object]:
    return {"message": _question(i)}


def _completion_of(model: str, *, stream: bool) -> Callable[[int], dict[str, object]]:
    def body(i: int) -> dict[str, object]:
        messages = [{"role": "user", "content": _question(i)}]
        return {"model": model, "stream": stream, "messages": messages}

    return body


COMPLETIONS = "/v1/chat/completions"
KINDS = (
    Kind("chat", "/v1/chat", _turn, _json_answer),
    Kind("chat stream", "/v1/chat/stream", _turn, _sse_done),
    Kind("lamina-rag", COMPLETIONS, _completion_of("lamina-rag", stream=False), _completion),
    Kind("lamina-rag stream", COMPLETIONS, _completion_of("lamina-rag", stream=True), _chunks_done),
    Kind("passthrough", COMPLETIONS, _completion_of("auto", stream=False), _completion),
    Kind("passthrough stream", COMPLETIONS, _completion_of("auto", stream=True), _chunks_done),
)
"""Half of them stream; request ``i`` is of kind ``i`` modulo their number."""


def _headers(i: int) -> dict[str, str]:
    return {
        "X-Lamina-User": f"user{i % USERS}",
        "X-Lamina-Groups": "alpha",
        "X-Lamina-Roles": "Lamina.User",
    }


async def _send(client: httpx.AsyncClient, i: int) -> str | None:
    """Request ``i`` of the load (its kind is ``i`` modulo the kinds); why it failed, if it did."""
    kind = KINDS[i % len(KINDS)]
    try:
        async with client.stream("POST", kind.path, json=kind.body(i), headers=_headers(i)) as r:
            raw = await r.aread()
            if r.status_code != 200:
                return f"{kind.name}: {r.status_code} {raw[:300]!r}"
            problem = kind.check(raw)
    except httpx.HTTPError as exc:
        return f"{kind.name}: {type(exc).__name__}: {exc}"
    return f"{kind.name}: {problem}" if problem else None


async def _load(base: str, first: int, count: int) -> list[str]:
    """Send requests ``first`` .. ``first + count - 1``, ``CONCURRENCY`` at a time; the failures."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one(i: int) -> str | None:
            async with gate:
                return await _send(client, i)

        outcomes = await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return [outcome for outcome in outcomes if outcome is not None]


def load(base: str, first: int, count: int) -> list[str]:
    return asyncio.run(_load(base, first, count))


class Collector:
    """Makes the server process collect its garbage and reads its RSS afterwards."""

    def __init__(self, pid: int, report: Path) -> None:
        self._process = psutil.Process(pid)
        self._report = report

    def _collections(self) -> int:
        return len(self._report.read_text().splitlines()) if self._report.exists() else 0

    def rss_after_gc(self) -> int:
        done = self._collections()
        os.kill(self._process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while self._collections() == done:
            assert time.monotonic() < deadline, "the server never reported its collection"
            time.sleep(0.05)
        return int(self._process.memory_info().rss)


@dataclass
class Server:
    base: str
    collector: Collector


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("memory")
    corpus, data, report = root / "corpus", root / "data", root / "collections.log"
    write_corpus(corpus)
    with SimulatorServer() as simulator:
        env = simulator_env(
            simulator,
            data,
            LAMINA_LOG_LEVEL="WARNING",
            # Retrieve, then answer: a grounded turn, one model call, no planning call.
            LAMINA_INTELLIGENCE__PLANNER="deterministic",
            **{REPORT_VARIABLE: str(report)},
        )
        ingest_corpus(corpus, env)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process(
            "serve",
            "--port",
            str(port),
            env=env,
            ready_url=f"{base}/readyz",
            module="tests.support.collectable_serve",
        ) as process:
            yield Server(base, Collector(process.pid, report))


def test_two_thousand_requests_grow_the_server_by_less_than_50_mb(server: Server) -> None:
    failed = load(server.base, 0, WARM_UP)
    assert not failed, f"{len(failed)} of {WARM_UP} warm-up requests failed: {failed[:5]}"
    baseline = server.collector.rss_after_gc()

    failed = load(server.base, WARM_UP, REQUESTS)
    assert not failed, f"{len(failed)} of {REQUESTS} requests failed: {failed[:5]}"
    after = server.collector.rss_after_gc()

    growth_mb = (after - baseline) / 2**20
    figures = (
        f"RSS {baseline / 2**20:.1f} MB after the warm-up, {after / 2**20:.1f} MB after "
        f"{REQUESTS} requests at concurrency {CONCURRENCY}: {growth_mb:+.1f} MB"
    )
    print(figures)
    assert growth_mb < GROWTH_LIMIT_MB, figures
