"""A thousand server-sent-event streams held open at once against a slow model.

The simulator paces its tokens (``--tokens-per-second``, 1 by default) and always answers
with the same ``--answer-words`` words (30), so every stream lasts about
``answer_words / tokens_per_second`` seconds (30 s). The benchmark opens ``--streams``
streams at once from one client process (this one: httpx on asyncio, one connection per
stream), holds them until they end, and reports:

- **memory**: the Lamina process's RSS before the load (baseline, after a warm-up
  stream) and its peak during the hold (psutil, every 100 ms), and after the streams
  ended;
- **streams**: opened (200 with ``text/event-stream``), completed (a ``done`` event, or
  ``[DONE]`` on the OpenAI path), errors (any other status, an ``error`` event, a
  transport error), and how long opening all of them took (until every stream had its
  response headers, and until every stream had its first answer token);
- **stalls**: a stream *stalled* when, after its first answer token, more than
  ``--stall-tokens / tokens_per_second`` passed without an answer token, or it did not
  end within its deadline (twice its expected length plus 60 s, counted from its
  response headers; opening may take up to 300 s). Lamina's streaming PII
  redactor holds back the last unfinished word, so on an idle machine deltas arrive two
  tokens at a time (a 2 s gap at 1 token/s); the default of 6 tokens is three of those;
- **event loop**: while the streams are held, a thread in this process asks ``/healthz``
  every 250 ms on its own connection; its latency is how long Lamina's event loop took to
  get to a new request (it includes some of this process's own scheduling).

Paths (``--path``):

- ``chat`` (default): ``POST /v1/chat/stream``, the grounded assistant: the user message
  is stored, the sample corpus searched (security-trimmed), the answer streamed from the
  model as ``delta`` events, citations, ``done``. The planner is ``deterministic``, so
  the only model call is the streamed answer.
- ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` naming the deployment:
  the gateway's passthrough, chunk by chunk.

Auth stays on: dev identity headers (``LAMINA_AUTH__MODE=dev``), the streams spread over
``streams / 10`` users (10 each), and a per-user limit of 60 requests per minute
(``LAMINA_LIMITS__USER_REQUESTS_PER_MINUTE=60``) that 10 streams per user stay under.
Lamina's limits are all off by default (``LimitsSettings``); one user with 1,000 streams
would need that limit raised or lifted.

    .venv/bin/python -m bench.sse_concurrency [--streams 1000] [--tokens-per-second 1]
        [--answer-words 30] [--stall-tokens 6] [--path chat|openai] [--runs 1]

Writes bench/results/sse_concurrency.json (sse_concurrency-openai.json for that path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.cpu import CpuSnapshot, CpuUsage
from bench.eventloop import run as run_loop
from bench.processes import REPO
from bench.rss import RssSampler
from bench.simulated import (
    Served,
    deployment,
    ingest_sample_corpus,
    lamina_env,
    start_lamina,
    start_simulator,
)

DEPLOYMENT = "slow"
STREAMS_PER_USER = 10
OPEN_TIMEOUT_S = 300.0
QUESTIONS = [
    ("How many days of annual leave do I get?", "employees,hr"),
    ("What is the budget of Project Falcon?", "employees,finance"),
    ("Who is on the Kestrel rotation?", "employees,engineering"),
]


@dataclass
class Stream:
    """What one client stream saw, in monotonic seconds."""

    index: int
    started: float = 0.0
    opened: float | None = None  # response headers
    status: int | None = None
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    completed: bool = False
    error: str | None = None
    max_gap_s: float = 0.0
    gaps_over_threshold: int = 0
    _last_token: float | None = field(default=None, repr=False)

    def token(self, now: float, threshold_s: float) -> None:
        self.tokens += 1
        if self._last_token is None:
            self.first_token = now
        else:
            gap = now - self._last_token
            self.max_gap_s = max(self.max_gap_s, gap)
            if gap > threshold_s:
                self.gaps_over_threshold += 1
        self._last_token = now


@dataclass(frozen=True, slots=True)
class Setup:
    lamina: Served
    path: str
    tokens_per_second: float
    answer_words: int
    stall_tokens: float

    @property
    def expected_s(self) -> float:
        return self.answer_words / self.tokens_per_second

    @property
    def stall_gap_s(self) -> float:
        return self.stall_tokens / self.tokens_per_second

    @property
    def deadline_s(self) -> float:
        return 2 * self.expected_s + 60.0


def _request(setup: Setup, index: int) -> tuple[str, dict[str, str], dict[str, Any]]:
    question, groups = QUESTIONS[index % len(QUESTIONS)]
    headers = {
        "X-Lamina-User": f"bench-user-{index // STREAMS_PER_USER}",
        "X-Lamina-Groups": groups,
        "Accept": "text/event-stream",
    }
    if setup.path == "chat":
        return "/v1/chat/stream", headers, {"message": question}
    body = {
        "model": DEPLOYMENT,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
    }
    return "/v1/chat/completions", headers, body


def _tokens_in(setup: Setup, event: str, data: str) -> tuple[int, bool, str | None]:
    """(answer tokens carried, whether the stream is complete, an error) of one SSE event."""
    if setup.path == "chat":
        if event == "delta":
            return 1, False, None
        if event == "done":
            return 0, True, None
        if event == "error":
            return 0, False, f"error event: {data[:200]}"
        return 0, False, None
    if data == "[DONE]":
        return 0, True, None
    payload = json.loads(data)
    if "error" in payload:
        return 0, False, f"error chunk: {data[:200]}"
    choices = payload.get("choices") or []
    carried = sum(1 for c in choices if (c.get("delta") or {}).get("content"))
    return carried, False, None


async def _one_stream(client: httpx.AsyncClient, setup: Setup, stream: Stream) -> None:
    path, headers, body = _request(setup, stream.index)
    stream.started = time.monotonic()
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S) as deadline:
            async with client.stream("POST", path, json=body, headers=headers) as response:
                stream.opened = time.monotonic()
                stream.status = response.status_code
                # From here on the stream has its own deadline, however long opening took.
                deadline.reschedule(asyncio.get_running_loop().time() + setup.deadline_s)
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    stream.error = f"HTTP {response.status_code}: {text[:200]}"
                    return
                event = "message"
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        carried, done, error = _tokens_in(setup, event, line[5:].strip())
                        now = time.monotonic()
                        for _ in range(carried):
                            stream.token(now, setup.stall_gap_s)
                        if error:
                            stream.error = error
                        if done:
                            stream.completed = True
                            return
                    elif not line:
                        event = "message"
    except TimeoutError:
        if stream.opened is None:
            stream.error = f"not opened within {OPEN_TIMEOUT_S:.0f}s"
        else:
            stream.error = f"not complete within its deadline of {setup.deadline_s:.0f}s"
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        stream.ended = time.monotonic()
        if not stream.completed and stream.error is None:
            stream.error = "stream ended without completing"


class HealthProbe:
    """Asks ``/healthz`` every ``interval_s`` on a thread with its own connection."""

    def __init__(self, url: str, interval_s: float = 0.25) -> None:
        self._url = f"{url}/healthz"
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._thread = threading.Thread(target=self._probe, name="healthz-probe", daemon=True)

    def _probe(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self._url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self.failures += 1
                self._stop.wait(self._interval_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


async def _hold(setup: Setup, streams: int) -> tuple[list[Stream], float]:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    timeout = httpx.Timeout(OPEN_TIMEOUT_S, read=setup.deadline_s)
    async with httpx.AsyncClient(
        base_url=setup.lamina.url, limits=limits, timeout=timeout
    ) as client:
        held = [Stream(i) for i in range(streams)]
        started = time.monotonic()
        await asyncio.gather(*(_one_stream(client, setup, s) for s in held))
    return held, started


def _warm_up(setup: Setup, simulator: Served) -> None:
    """A few fast streams end to end, so that imports, caches and connections are in place
    (the simulator's pace is raised for them, then set back)."""
    pace = "/_sim/config"
    httpx.post(f"{simulator.url}{pace}", json={"tokens_per_second": 1000}).raise_for_status()
    try:
        held, _ = run_loop(_hold(setup, 3))
    finally:
        body = {"tokens_per_second": setup.tokens_per_second}
        httpx.post(f"{simulator.url}{pace}", json=body).raise_for_status()
    if failed := [s.error for s in held if not s.completed]:
        log = setup.lamina.child.log_tail(60)
        raise SystemExit(f"the warm-up streams failed: {failed}\nlamina's log:\n{log}")


def _measure(setup: Setup, streams: int, number: int) -> dict[str, Any]:
    pids = {"lamina": setup.lamina.pid, "bench": os.getpid()}
    sampler = RssSampler(setup.lamina.pid).start()
    try:
        time.sleep(1.0)
        baseline = sampler.peak_mib(since=time.monotonic() - 1.0)
        cpu_before, wall_started = CpuSnapshot.take(pids), time.monotonic()
        with HealthProbe(setup.lamina.url) as probe:
            held, started = run_loop(_hold(setup, streams))
        usage = CpuUsage.between(
            cpu_before, CpuSnapshot.take(pids), time.monotonic() - wall_started
        )
        finished = time.monotonic()
        time.sleep(2.0)
        after = sampler.now_mib()
    finally:
        sampler.stop()
    opened = [s for s in held if s.status == 200]
    first_tokens = [s.first_token for s in held if s.first_token is not None]
    stalled = [s for s in held if s.gaps_over_threshold or (s.error and "deadline" in s.error)]
    errors: dict[str, int] = {}
    for s in held:
        if s.error:
            key = s.error.split(":", 1)[0]
            errors[key] = errors.get(key, 0) + 1
    durations = [s.ended - s.started for s in held if s.completed and s.ended]
    gaps = [s.max_gap_s for s in held if s.tokens > 1]
    return {
        "run": number,
        "rss_baseline_mib": baseline,
        "rss_peak_mib": sampler.peak_mib(since=started, until=finished),
        "rss_after_mib": round(after, 1),
        "rss_peak_over_baseline_kib_per_stream": round(
            ((sampler.peak_mib(since=started, until=finished) or 0) - (baseline or 0))
            * 1024
            / streams,
            1,
        ),
        "streams": streams,
        "opened": len(opened),
        "completed": sum(1 for s in held if s.completed),
        "errors": errors,
        "error_examples": sorted({s.error for s in held if s.error})[:5],
        "stalled": len(stalled),
        "all_open_s": round(max((s.opened or started) for s in held) - started, 2),
        "all_first_token_s": round(max(first_tokens) - started, 2) if first_tokens else None,
        "stream_duration_s": {
            "p50": _percentile(durations, 0.5),
            "max": round(max(durations), 1) if durations else None,
        },
        "max_token_gap_s": {"p50": _percentile(gaps, 0.5), "max": _percentile(gaps, 1.0)},
        "answer_tokens_per_stream": statistics.median(s.tokens for s in held),
        "healthz_ms_during_hold": {
            "probes": len(probe.latencies_ms),
            "failures": probe.failures,
            "p50": _percentile(probe.latencies_ms, 0.5),
            "p99": _percentile(probe.latencies_ms, 0.99),
            "max": _percentile(probe.latencies_ms, 1.0),
        },
        "cpu_s": usage.as_json(),
    }


def _raise_open_files_limit() -> int:
    """As many file descriptors as the hard limit allows; children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Many concurrent SSE streams held open")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens-per-second", type=float, default=1.0)
    parser.add_argument("--answer-words", type=int, default=30, help="words of every answer")
    parser.add_argument(
        "--stall-tokens", type=float, default=6.0, help="a gap this many tokens long is a stall"
    )
    parser.add_argument("--path", choices=("chat", "openai"), default="chat")
    parser.add_argument("--runs", type=int, default=1, help="holds, one after another")
    args = parser.parse_args()
    open_files = _raise_open_files_limit()
    if open_files < 2 * args.streams + 100:  # a client and a server socket per stream
        raise SystemExit(f"open-files limit {open_files} is too low for {args.streams} streams")
    load_before = [round(x, 2) for x in os.getloadavg()]
    answer = " ".join(f"word{n}" for n in range(args.answer_words))

    workdir = Path(tempfile.mkdtemp(prefix="lamina-sse-"))
    try:
        with ExitStack() as stack:
            simulator = start_simulator(
                stack,
                workdir,
                "simulator",
                *("--tokens-per-second", str(args.tokens_per_second)),
                *("--default-reply", answer),
            )
            data = workdir / "data"
            data.mkdir()
            env = lamina_env(
                data,
                [deployment(DEPLOYMENT, simulator)],
                LAMINA_INTELLIGENCE__PLANNER="deterministic",
                LAMINA_LIMITS__USER_REQUESTS_PER_MINUTE="60",
            )
            ingest_sample_corpus(env)
            lamina = start_lamina(stack, workdir, env)
            setup = Setup(
                lamina, args.path, args.tokens_per_second, args.answer_words, args.stall_tokens
            )
            _warm_up(setup, simulator)
            runs = []
            for number in range(1, args.runs + 1):
                runs.append(_measure(setup, args.streams, number))
                lamina.child.ensure_running()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": f"{args.streams} concurrent SSE streams held open, "
        + (
            "POST /v1/chat/stream (grounded chat, deterministic planner)"
            if args.path == "chat"
            else "POST /v1/chat/completions stream=true (gateway passthrough)"
        ),
        "path": args.path,
        "tokens_per_second": args.tokens_per_second,
        "answer_words": args.answer_words,
        "expected_stream_s": args.answer_words / args.tokens_per_second,
        "stall_definition": f"a gap over {setup.stall_gap_s:g}s between answer "
        f"tokens, or not complete within {setup.deadline_s:.0f}s",
        "users": -(-args.streams // STREAMS_PER_USER),
        "open_files_limit": open_files,
        "runs": runs,
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "sse_concurrency" if args.path == "chat" else "sse_concurrency-openai"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        if key != "runs":
            print(f"{key:>22}: {value}")
    for run in runs:
        print(f"--- run {run['run']}")
        for key, value in run.items():
            if key != "run":
                print(f"{key:>38}: {value}")
    if any(run["completed"] < args.streams or run["stalled"] for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
