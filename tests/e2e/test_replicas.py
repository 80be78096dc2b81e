"""Three Lamina replicas sharing one real Redis: limits hold across them, and an
outage of Redis degrades them without failing or hanging a request.

Each replica is a real ``lamina serve`` process; the model is the OpenAI-compatible
simulator on loopback; the caller is plain HTTP, spread round-robin over the replicas.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from inferencing.simulator import SimulatorServer
from tests.support.processes import free_port, lamina_env, lamina_process
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow

REPLICAS = 3
RPM = 60
TPM = 3_000
MAX_TOKENS = 40
# A limit every caller has, so every request goes through the shared store; tenant
# overrides keep the two experiments apart on one set of replicas.
GENEROUS_RPM = 100_000
LIMITS = {
    "rpm": {"user_requests_per_minute": RPM},
    "tpm": {"user_tokens_per_minute": TPM},
}


@dataclass
class Cluster:
    urls: list[str]
    redis: RedisServer
    simulator: SimulatorServer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        redis.start()
        simulator = stack.enter_context(SimulatorServer())
        deployments = [
            {
                "name": "sim",
                "base_url": simulator.openai_base_url,
                "api_key": "sk-sim",
                "model": "gpt-4o-mini",
            }
        ]
        urls = []
        for n in range(REPLICAS):
            port = free_port()
            data: Path = tmp_path_factory.mktemp(f"replica{n}")
            env = lamina_env(
                LAMINA_AUTH__MODE="dev",
                LAMINA_DATA_DIR=str(data),
                LAMINA_LOG_LEVEL="WARNING",
                LAMINA_API__PORT=str(port),
                LAMINA_REDIS__URL=redis.url,
                LAMINA_REDIS__RETRY_AFTER_S="1",
                LAMINA_INFERENCING__DEPLOYMENTS=json.dumps(deployments),
                LAMINA_LIMITS__USER_REQUESTS_PER_MINUTE=str(GENEROUS_RPM),
                LAMINA_LIMITS__TENANTS=json.dumps(LIMITS),
            )
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(lamina_process("serve", env=env, ready_url=f"{url}/readyz"))
            urls.append(url)
        yield Cluster(urls, redis, simulator)


def _body(question: str) -> dict[str, object]:
    return {
        "model": "sim",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": question}],
    }


async def _fire(
    urls: list[str],
    tenant: str,
    user: str,
    count: int,
    *,
    concurrency: int = 60,
    timeout_s: float = 30,
) -> list[httpx.Response]:
    """``count`` completions spread round-robin over the replicas, ``concurrency`` at a time."""
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"X-Lamina-User": user, "X-Lamina-Tenant": tenant}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:

        async def one(n: int) -> httpx.Response:
            async with gate:
                url = urls[n % len(urls)]
                return await client.post(f"{url}/v1/chat/completions", json=_body(f"Q{n}?"))

        return await asyncio.gather(*(one(n) for n in range(count)))


def test_requests_per_minute_hold_across_replicas(cluster: Cluster) -> None:
    responses = asyncio.run(_fire(cluster.urls, "rpm", f"rpm-{time.time_ns()}", 600))
    statuses = [r.status_code for r in responses]
    admitted = statuses.count(200)
    assert statuses.count(429) == len(statuses) - admitted, set(statuses)
    assert RPM - REPLICAS <= admitted <= RPM + REPLICAS
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-RateLimit-Limit-Requests"] == str(RPM)
    assert refused.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    served = next(r for r in responses if r.status_code == 200)
    assert served.headers["X-RateLimit-Limit-Requests"] == str(RPM)


def test_tokens_per_minute_hold_across_replicas(cluster: Cluster) -> None:
    responses = asyncio.run(_fire(cluster.urls, "tpm", f"tpm-{time.time_ns()}", 600))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == len(responses)
    assert admitted
    assert refused
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    # One request's reservation: its prompt plus max_tokens (the prompts are tiny).
    reservation = max(r.json()["usage"]["prompt_tokens"] for r in admitted) + MAX_TOKENS
    assert used <= TPM + reservation
    # Reconciling gave back what short answers did not use, so more fitted than
    # the reservations alone would have allowed.
    assert len(admitted) > TPM // reservation
    assert refused[0].headers["X-RateLimit-Limit-Tokens"] == str(TPM)


def test_redis_stopped_mid_run_degrades_without_failing_or_hanging(cluster: Cluster) -> None:
    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        before = await _fire(cluster.urls, "free", "u-before", 30, concurrency=10)
        cluster.redis.stop()
        # Redis calls time out after 0.5 s; a request stuck on a dead Redis would
        # blow this client timeout and fail the test with ReadTimeout.
        during = await _fire(cluster.urls, "free", "u-during", 60, concurrency=10, timeout_s=5)
        return before, during

    try:
        before, during = asyncio.run(run())
        assert {r.status_code for r in before} == {200}
        # Served from each replica's own state: nothing failed.
        assert {r.status_code for r in during} == {200}
        for url in cluster.urls:
            checks = httpx.get(f"{url}/readyz", timeout=5).json()["checks"]
            assert checks["rate_limits"].startswith("in-process"), checks
            assert "unreachable" in checks["rate_limits"]
    finally:
        cluster.redis.start()
    # Back to shared state once Redis answers again (each replica retries after 1 s).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        asyncio.run(_fire(cluster.urls, "free", "u-after", 6, concurrency=3))
        states = [httpx.get(f"{u}/readyz", timeout=5).json()["checks"] for u in cluster.urls]
        if all(s["rate_limits"] == "redis" for s in states):
            return
        time.sleep(0.5)
    pytest.fail(f"replicas did not return to Redis: {states}")
