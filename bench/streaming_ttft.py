"""Time to first token that Lamina adds over the model's own: streaming through Lamina's
paths against streaming from the model directly.

What runs, each as its own process:

- ``python -m inferencing.simulator --latency L`` (default 0.05 s before the first token
  of every completion, streamed or not), answering with a fixed text citing ``[1]``;
- the loopback OpenID provider of ``tests/support/identity.py`` (in this process), one
  RS256 token for a caller in ``employees`` and ``hr``;
- ``lamina serve`` (one uvicorn worker): JWT auth, every rate limit and token quota on,
  the deployment ``bench`` on the simulator, the bundled sample corpus ingested with
  ``--embeddings`` (default hashing; ``local`` is the product's default model), telemetry
  off.

Four ways to the same streamed answer, measured turn by turn in a random order so that
drift in the machine's load hits all alike (httpx, one connection each, in this process):

- ``direct``: the simulator's ``/v1/chat/completions`` with ``"stream": true``;
- ``passthrough``: Lamina's ``/v1/chat/completions``, ``model: bench`` (the gateway:
  auth, limits, caps, routing, one model call);
- ``grounded``: Lamina's ``/v1/chat/stream`` (SSE): auth, limits, the planning call,
  security-trimmed retrieval, then the streamed answer call;
- ``lamina-rag``: Lamina's ``/v1/chat/completions``, ``model: lamina-rag`` (the same
  grounded turn in OpenAI chunks).

TTFT is the time from sending the request to reading the first chunk carrying answer
text (``delta.content``, or the first ``delta`` event). ``added`` is a path's TTFT less
the direct one. A grounded turn waits for the model twice before its first token (the
planning call, then the answer call), so its ``added beyond model waits`` subtracts the
direct TTFT once per model call made before the first token (counted at the simulator).
Every answer must be the model's text (and, grounded, cite a source); else the run fails.

    .venv/bin/python -m bench.streaming_ttft [--latency 0.05] [--requests 100] [--runs 3] \\
        [--warmup 10] [--embeddings hashing|local]

Writes bench/results/streaming_ttft.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.knowledge_support import machine, write_result
from bench.simulated import (
    SIM_KEY,
    SIM_MODEL,
    Served,
    deployment,
    ingest_sample_corpus,
    lamina_env,
    start_lamina,
    start_simulator,
)
from bench.turn_support import (
    LIMITS_ON,
    jwt_settings,
    machine_line,
    median_over_runs,
    model_calls,
    summarise,
    with_machine,
)
from tests.support.identity import running_identity_provider

REPLY = "Employees get 27 days of annual leave [1]."
QUESTION = "How many days of annual leave do I get?"
PATHS = ("direct", "passthrough", "grounded", "lamina-rag")


@dataclass(frozen=True, slots=True)
class Streamed:
    ttft_ms: float
    total_ms: float
    text: str
    cited: bool


@dataclass
class Route:
    """One way to the streamed answer: how to ask, and what came back per turn."""

    name: str
    ask: Callable[[httpx.Client], Streamed]
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    model_calls_before_first_token: int = 1


def _stream(
    client: httpx.Client,
    url: str,
    body: dict[str, object],
    token: str,
    first: Callable[[str, str], str | None],
) -> Streamed:
    """POST ``body`` and read the stream to its end; ``first(event, data)`` gives a line's
    answer text, if it has any."""
    started = time.perf_counter()
    ttft: float | None = None
    pieces: list[str] = []
    cited = False
    event = ""
    headers = {"Authorization": f"Bearer {token}"}
    with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"{url}: {response.status_code} {response.text[:300]}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if event == "citations" and json.loads(data).get("citations"):
                cited = True
            text = first(event, data)
            if text:
                if ttft is None:
                    ttft = time.perf_counter() - started
                pieces.append(text)
    total = time.perf_counter() - started
    if ttft is None:
        raise SystemExit(f"{url}: the stream carried no answer text")
    return Streamed(ttft * 1000, total * 1000, "".join(pieces), cited)


def _openai_text(_event: str, data: str) -> str | None:
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    choices = chunk.get("choices") or []
    return str(choices[0]["delta"].get("content") or "") if choices else None


def _sse_delta(event: str, data: str) -> str | None:
    return str(json.loads(data)["text"]) if event == "delta" else None


def _openai_body(model: str) -> dict[str, object]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}


def _paths(simulator: Served, lamina: Served, token: str) -> list[Route]:
    direct_url = f"{simulator.url}/v1/chat/completions"
    openai_url = f"{lamina.url}/v1/chat/completions"
    return [
        Route(
            "direct",
            lambda c: _stream(c, direct_url, _openai_body(SIM_MODEL), SIM_KEY, _openai_text),
        ),
        Route(
            "passthrough",
            lambda c: _stream(c, openai_url, _openai_body("bench"), token, _openai_text),
        ),
        Route(
            "grounded",
            lambda c: _stream(
                c, f"{lamina.url}/v1/chat/stream", {"message": QUESTION}, token, _sse_delta
            ),
        ),
        Route(
            "lamina-rag",
            lambda c: _stream(c, openai_url, _openai_body("lamina-rag"), token, _openai_text),
        ),
    ]


def _check(path: Route, streamed: Streamed) -> None:
    # lamina-rag appends its sources to the answer text; the others stream the model's.
    if not streamed.text.startswith(REPLY):
        raise SystemExit(f"{path.name}: answered {streamed.text!r}, not the model's {REPLY!r}")
    if path.name == "grounded" and not streamed.cited:
        raise SystemExit("grounded: the stream cited no source")


def _run(
    number: int,
    template: Path,
    workdir: Path,
    simulator: Served,
    settings: dict[str, str],
    token: str,
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, dict[str, object]]:
    data = workdir / f"run{number}"
    shutil.copytree(template, data)
    env = lamina_env(data, [deployment("bench", simulator)], **settings)
    with ExitStack() as stack, httpx.Client(timeout=60) as client:
        lamina = start_lamina(stack, workdir, env)
        paths = _paths(simulator, lamina, token)
        for path in paths:  # connections, first-use imports; and model calls per answer
            before = model_calls(simulator)
            _check(path, path.ask(client))
            path.model_calls_before_first_token = model_calls(simulator) - before
            for _ in range(args.warmup - 1):
                path.ask(client)
        for _ in range(args.requests):
            for path in rng.sample(paths, len(paths)):
                streamed = path.ask(client)
                _check(path, streamed)
                path.ttft_ms.append(streamed.ttft_ms)
                path.total_ms.append(streamed.total_ms)
        lamina.child.ensure_running()
    shutil.rmtree(data, ignore_errors=True)
    direct = summarise(paths[0].ttft_ms)
    figures: dict[str, dict[str, object]] = {}
    for path in paths:
        ttft = summarise(path.ttft_ms)
        row: dict[str, object] = {
            "ttft_p50_ms": ttft["p50_ms"],
            "ttft_p99_ms": ttft["p99_ms"],
            "total_p50_ms": summarise(path.total_ms)["p50_ms"],
            "added_ttft_p50_ms": round(ttft["p50_ms"] - direct["p50_ms"], 2),
            "added_ttft_p99_ms": round(ttft["p99_ms"] - direct["p99_ms"], 2),
            "model_calls_before_first_token": path.model_calls_before_first_token,
            "added_beyond_model_waits_p50_ms": round(
                ttft["p50_ms"] - path.model_calls_before_first_token * direct["p50_ms"], 2
            ),
        }
        figures[path.name] = with_machine(row)
        print(f"  run {number}, {path.name:>11}: {_row(figures[path.name])}")
    return figures


def _row(figures: dict[str, object]) -> str:
    return (
        f"TTFT p50 {figures['ttft_p50_ms']} ms, p99 {figures['ttft_p99_ms']} ms; added p50 "
        f"{figures['added_ttft_p50_ms']} ms, p99 {figures['added_ttft_p99_ms']} ms; "
        f"{figures['model_calls_before_first_token']} model call(s) before it, added beyond "
        f"model waits p50 {figures['added_beyond_model_waits_p50_ms']} ms {machine_line(figures)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Time to first token added by Lamina")
    parser.add_argument("--latency", type=float, default=0.05, help="simulator's TTFT, seconds")
    parser.add_argument("--requests", type=int, default=100, help="turns per path per run")
    parser.add_argument("--runs", type=int, default=3, help="fresh servers, medians over runs")
    parser.add_argument("--warmup", type=int, default=10, help="turns per path before timing")
    parser.add_argument("--embeddings", choices=("hashing", "local"), default="hashing")
    args = parser.parse_args()
    rng = random.Random(7)
    workdir = Path(tempfile.mkdtemp(prefix="lamina-ttft-"))
    try:
        with ExitStack() as stack:
            simulator = start_simulator(
                stack,
                workdir,
                "simulator",
                *("--latency", str(args.latency), "--default-reply", REPLY),
            )
            identity = stack.enter_context(running_identity_provider())
            token = identity.token("adele", groups=("employees", "hr"), expires_in=6 * 3600)
            settings = (
                jwt_settings(identity)
                | LIMITS_ON
                | {"LAMINA_KNOWLEDGE__EMBEDDINGS": args.embeddings}
            )
            template = workdir / "template"
            template.mkdir()
            ingest_sample_corpus(lamina_env(template, [deployment("bench", simulator)], **settings))
            runs = [
                _run(n, template, workdir, simulator, settings, token, args, rng)
                for n in range(args.runs)
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    by_path = {name: median_over_runs([run[name] for run in runs]) for name in PATHS}
    result = {
        "benchmark": "streamed time to first token: the simulator directly, against Lamina's "
        "OpenAI passthrough, grounded SSE chat and lamina-rag (JWT auth, limits on)",
        "simulator_latency_s": args.latency,
        "embeddings": args.embeddings,
        "turns_per_path_per_run": args.requests,
        "median_over_runs": by_path,
        "per_run": runs,
        **machine(),
    }
    path = write_result("streaming_ttft", result)
    for name, figures in by_path.items():
        print(f"median of {args.runs} run(s), {name:>11}: {_row(figures)}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
