"""What the gateway benchmark measures: OpenAI-compatible endpoints, started on loopback.

The stub upstream (the direct baseline), the bare reference passthrough, and
``lamina serve`` with JWT auth against a loopback OpenID provider and one deployment
pointing at the stub. Each start is a context on an ``ExitStack`` so every process
stops on the way out, whatever happens.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from bench.load import LoadSpec
from bench.processes import REPO, Child, free_port, running
from bench.stub_upstream import MODEL as UPSTREAM_MODEL
from bench.stub_upstream import REPLY_PIECES
from tests.support.identity import AUDIENCE, running_identity_provider

DEPLOYMENT = "bench"
UPSTREAM_KEY = "sk-bench"
EXPECTED_REPLY = "".join(REPLY_PIECES)
BENCH_LIMITS = {
    "USER_REQUESTS_PER_MINUTE": 100_000_000,
    "TENANT_REQUESTS_PER_MINUTE": 100_000_000,
    "USER_TOKENS_PER_MINUTE": 10_000_000_000,
    "TENANT_TOKENS_PER_MINUTE": 10_000_000_000,
}
"""Lamina's limits in the benchmark: enabled, and never reached."""


class BenchFailed(Exception):
    """The benchmark cannot produce meaningful figures; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """An OpenAI-compatible endpoint to measure, and what a client sends it."""

    name: str
    description: str
    base_url: str  # ending in /v1
    model: str
    token: str
    child: Child | None = None

    def request_body(self, *, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Say hello."},
            ],
            "max_tokens": 16,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return json.dumps(body, separators=(",", ":")).encode()

    def load(self, *, concurrency: int, duration_s: int, stream: bool) -> LoadSpec:
        return LoadSpec(
            url=f"{self.base_url}/chat/completions",
            body=self.request_body(stream=stream),
            headers={"Authorization": f"Bearer {self.token}"},
            concurrency=concurrency,
            duration_s=duration_s,
        )

    def verify(self, *, stream: bool) -> None:
        """One request with the real ``openai`` client: the answer must be the stub's."""
        client = openai.OpenAI(
            base_url=self.base_url, api_key=self.token, max_retries=0, timeout=30
        )
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "user", "content": "Say hello."}
        ]
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                completion = client.chat.completions.create(model=self.model, messages=messages)
                if completion.usage is None:
                    raise BenchFailed(f"{self.name}: the completion carries no usage")
                text = completion.choices[0].message.content or ""
        except openai.APIError as exc:
            raise BenchFailed(f"{self.name} refused the check request: {exc}") from exc
        finally:
            client.close()
        if text != EXPECTED_REPLY:
            raise BenchFailed(f"{self.name} answered {text!r}, expected {EXPECTED_REPLY!r}")

    def ensure_running(self) -> None:
        if self.child is not None:
            self.child.ensure_running()


def _bench_module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", *args]


def start_stub(stack: ExitStack, workdir: Path) -> Target:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = stack.enter_context(
        running(
            "stub_upstream",
            _bench_module("stub_upstream", "--port", str(port)),
            ready_url=f"{base}/readyz",
            cwd=REPO,
            log_dir=workdir,
        )
    )
    return Target(
        "direct",
        "stub upstream, called directly",
        f"{base}/v1",
        UPSTREAM_MODEL,
        UPSTREAM_KEY,
        child,
    )


def start_reference(stack: ExitStack, workdir: Path, upstream: Target) -> Target:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = _bench_module("reference_proxy", "--port", str(port), "--upstream", upstream.base_url)
    child = stack.enter_context(
        running("reference_proxy", command, ready_url=f"{base}/readyz", cwd=REPO, log_dir=workdir)
    )
    description = "bench.reference_proxy: bare aiohttp server + aiohttp client, no auth"
    return Target("reference", description, f"{base}/v1", DEPLOYMENT, "unused", child)


def lamina_env(
    data_dir: Path, upstream: Target, openid_config_url: str, issuer: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    deployments = [
        {
            "name": DEPLOYMENT,
            "provider": "openai",
            "base_url": upstream.base_url,
            "model": UPSTREAM_MODEL,
            "api_key": UPSTREAM_KEY,
        }
    ]
    env |= {
        "LAMINA_DATA_DIR": str(data_dir),
        "LAMINA_LOG_LEVEL": "WARNING",
        "LAMINA_AUTH__MODE": "jwt",
        "LAMINA_AUTH__OPENID_CONFIG_URL": openid_config_url,
        "LAMINA_AUTH__AUDIENCE": AUDIENCE,
        "LAMINA_AUTH__ISSUER": issuer,
        "LAMINA_INFERENCING__DEPLOYMENTS": json.dumps(deployments),
        # Rate limiting on, per user and per tenant, requests and tokens per minute (the
        # in-process sliding windows), far above what the benchmark sends: the limiter runs
        # on every request and never refuses.
        **{f"LAMINA_LIMITS__{name}": str(limit) for name, limit in BENCH_LIMITS.items()},
        # Lamina runs from its data dir (so no developer's .env is read); find the repo.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return env


def start_lamina(stack: ExitStack, workdir: Path, upstream: Target, token_ttl_s: int) -> Target:
    """``lamina serve`` with JWT auth against a loopback OpenID provider, one token minted."""
    identity = stack.enter_context(running_identity_provider())
    token = identity.token("bench-user", groups=("employees",), expires_in=token_ttl_s)
    data_dir = workdir / "lamina-data"
    data_dir.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        *("-m", "client_api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
    ]
    env = lamina_env(data_dir, upstream, identity.config_url, identity.issuer)
    child = stack.enter_context(
        running(
            "lamina", command, ready_url=f"{base}/readyz", cwd=data_dir, log_dir=workdir, env=env
        )
    )
    description = (
        "lamina serve: one uvicorn worker, JWT (RS256) auth, rate limits on (requests and "
        "tokens per minute, per user and tenant), deployment 'bench'"
    )
    return Target("lamina", description, f"{base}/v1", DEPLOYMENT, token, child)
