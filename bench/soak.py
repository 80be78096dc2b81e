"""A mixed workload held for a while against a model that fails 10 % of its calls.

What runs, each as its own process on loopback:

- simulator **main** (``--error-rate 0.1 --seed 7``, faults drawn from rate_limited,
  unavailable and status 500 alike, 40 tokens per second, 0.05 s to the first token):
  deployment ``main``, tier ``cheap``, which answers the plain questions;
- simulator **agent** (``--error-rate 0.1 --seed 8``, same faults): deployment ``agent``,
  tier ``strong``, which the router puts first for turns that offer tools. The
  benchmark scripts its tool call for each approval (``/_sim/script``, ``when_tool``:
  only a request offering the ticket tool takes it, so a plain question that the
  gateway fails over to this simulator when ``main`` faults does not); scripted replies
  play no random fault, the agent's other calls do;
- ``lamina serve``: dev identity headers, the sample corpus ingested, planner
  ``escalate`` (rules plan plain questions without a model call; a request to act goes to
  the action agent), the gateway's retries and failover as configured by default, a
  per-user limit of 600 requests per minute (the ingest loop's polling
  counts against it).

Operations, each a closed loop of its own (one request at a time, a short pause between):

- **chat** (2 loops): ``POST /v1/chat`` with a sample-corpus question;
- **stream** (2 loops): ``POST /v1/chat/stream``, read to its last event;
- **ingest** (1 loop): ``POST /v1/jobs/ingest`` with one small generated Markdown file
  (a content owner), then ``GET /v1/jobs/{id}`` until the job has finished;
- **approval** (1 loop): "Please open a service-desk ticket …" as an employee (the model
  calls ``servicedesk-create_ticket``, a high-risk tool), then
  ``POST /v1/approvals/{id}`` with ``approve``; the tool runs and the turn resumes.

Each operation ends in one of three outcomes:

- **ok**: a 2xx with a complete answer (chat: an answer from a model; stream: a ``done``
  event after the deltas; ingest: the job succeeded and indexed a chunk; approval: the
  turn paused for approval, and approving ran the tool (``executed``, outcome ok) and
  returned an answer);
- **handled**: a fault Lamina could not hide (its retries and failover used up), told
  clearly: an ``application/problem+json`` response (4xx/5xx) or an SSE ``error`` event,
  each with a correlation id; a job that failed with an error code;
- **bad**: anything else: a 5xx without a problem body, a transport error, a timeout
  (60 s), a malformed or incomplete answer.

Success rate = ok / all. Latency is over ok operations (p50/p99), whole flow for ingest
(submit to finished) and approval (ask, approve, answer). Lamina's RSS is sampled every
second. Writes bench/results/soak.json and bench/results/soak.png (memory over time,
latency and success rate per operation per 10 s window).

    .venv/bin/python -m bench.soak [--duration 600] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.cpu import CpuSnapshot, CpuUsage
from bench.eventloop import run as run_loop
from bench.processes import REPO
from bench.rss import MIB, RssSampler
from bench.simulated import (
    Served,
    deployment,
    ingest_sample_corpus,
    lamina_env,
    start_lamina,
    start_simulator,
)

OPERATIONS = ("chat", "stream", "ingest", "approval")
LOOPS = {"chat": 2, "stream": 2, "ingest": 1, "approval": 1}
PAUSE_S = 0.2
TIMEOUT_S = 60.0
WINDOW_S = 10.0
# Questions whose search finds passages for their asker, so that rules answer them
# (a search that finds nothing would hand the turn to an agent).
QUESTIONS = [
    ("How many days of annual leave do I get?", "adele", "employees,hr"),
    ("Who is on the Kestrel rotation?", "alex", "employees,engineering"),
    ("What is the budget of Project Falcon?", "lynne", "employees,finance"),
]
EMPLOYEE = {"X-Lamina-User": "erin", "X-Lamina-Roles": "Lamina.User,employee"}
CONTENT_OWNER = {"X-Lamina-User": "owen", "X-Lamina-Roles": "Lamina.ContentOwner"}
TICKET = {"title": "Broken laptop screen", "description": "The screen is cracked."}
TOOL = "servicedesk-create_ticket"
FAULTS = "rate_limited=1,unavailable=1,status=1"
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Outcome:
    operation: str
    started: float  # seconds since the load began
    latency_ms: float
    result: str  # ok, handled, bad
    detail: str = ""


class Failed(Exception):
    """An operation ended without a complete answer; ``result`` is handled or bad."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result, self.detail = result, detail


def _refusal(response: httpx.Response, what: str) -> Failed:
    """A non-2xx answer: handled when it is a problem with a correlation id, else bad."""
    kind = response.headers.get("content-type", "")
    if kind.startswith(PROBLEM_JSON) and response.headers.get("x-correlation-id"):
        try:
            title = response.json().get("title", "")
        except ValueError:
            title = ""
        return Failed("handled", f"{what} {response.status_code} {title}".strip())
    return Failed("bad", f"{what} {response.status_code} {kind} {response.text[:120]!r}")


class Workload:
    def __init__(self, client: httpx.AsyncClient, agent: Served, seed: int) -> None:
        self.client = client
        self.agent = agent
        self.rng = random.Random(seed)
        self.counter = itertools.count()

    def _question(self) -> tuple[str, dict[str, str]]:
        question, user, groups = self.rng.choice(QUESTIONS)
        return question, {"X-Lamina-User": user, "X-Lamina-Groups": groups}

    async def chat(self) -> None:
        question, headers = self._question()
        response = await self.client.post("/v1/chat", json={"message": question}, headers=headers)
        if response.status_code != 200:
            raise _refusal(response, "chat")
        body = response.json()
        if not body.get("answer") or not body.get("route"):
            raise Failed("bad", f"chat: no model answer: {response.text[:160]!r}")

    async def stream(self) -> None:
        question, headers = self._question()
        async with self.client.stream(
            "POST", "/v1/chat/stream", json={"message": question}, headers=headers
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise _refusal(response, "stream")
            event, deltas, done = "", 0, False
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "delta":
                        deltas += 1
                    elif event == "done":
                        done = True
                    elif event == "error":
                        payload = json.loads(line[5:])
                        result = "handled" if payload.get("correlation_id") else "bad"
                        raise Failed(result, f"stream error event {payload.get('code')}")
        if not done:
            raise Failed("bad", f"stream ended without done ({deltas} deltas)")
        if not deltas:
            raise Failed("bad", "stream: done without any answer text")

    async def ingest(self) -> None:
        n = next(self.counter)
        text = f"# Soak note {n}\n\nThe soak benchmark wrote note {n} about the cafeteria menu.\n"
        files = {"files": (f"soak/note-{n}.md", text.encode(), "text/markdown")}
        response = await self.client.post("/v1/jobs/ingest", files=files, headers=CONTENT_OWNER)
        if response.status_code != 202:
            raise _refusal(response, "ingest")
        location = response.headers["location"]
        while True:
            await asyncio.sleep(0.25)
            polled = await self.client.get(location, headers=CONTENT_OWNER)
            if polled.status_code != 200:
                raise _refusal(polled, "ingest poll")
            job = polled.json()
            if job["status"] == "succeeded":
                if (job.get("result") or {}).get("chunks_indexed", 0) < 1:
                    raise Failed("bad", f"ingest: nothing indexed: {job.get('result')}")
                return
            if job["status"] in ("failed", "cancelled"):
                error = job.get("error") or {}
                result = "handled" if error.get("code") else "bad"
                raise Failed(result, f"ingest job {job['status']}: {error.get('code')}")

    async def approval(self) -> None:
        # Kept for a request offering the tool: a plain question that the gateway fails
        # over to the agent simulator (main faulted) passes it by instead of taking it.
        call = {"name": TOOL, "arguments": TICKET}
        script = {"replies": [{"tool_calls": [call], "when_tool": TOOL}]}
        await self.client.post(f"{self.agent.url}/_sim/script", json=script)
        message = "Please open a service-desk ticket: my laptop screen is cracked."
        response = await self.client.post("/v1/chat", json={"message": message}, headers=EMPLOYEE)
        if response.status_code != 200:
            await self.client.post(f"{self.agent.url}/_sim/reset")
            raise _refusal(response, "approval ask")
        asked = response.json().get("approval")
        if not asked:
            # The scripted call was not taken by this turn: drop it so it cannot linger.
            await self.client.post(f"{self.agent.url}/_sim/reset")
            raise Failed("bad", f"approval: the turn did not pause: {response.text[:160]!r}")
        decided = await self.client.post(
            f"/v1/approvals/{asked['approval_id']}", json={"decision": "approve"}, headers=EMPLOYEE
        )
        if decided.status_code != 200:
            raise _refusal(decided, "approve")
        outcome = decided.json()
        approval, answer = outcome["approval"], outcome.get("answer") or {}
        if approval["status"] != "executed" or not answer.get("answer"):
            raise Failed("bad", f"approve: {approval['status']}, answer {answer.get('answer')!r}")


async def _loop(
    name: str, run: Callable[[], Awaitable[None]], began: float, until: float, into: list[Outcome]
) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await run()
            result, detail = "ok", ""
        except Failed as failed:
            result, detail = failed.result, failed.detail
        except TimeoutError:
            result, detail = "bad", f"no answer within {TIMEOUT_S:.0f}s"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            result, detail = "bad", f"{type(exc).__name__}: {exc}"[:160]
        latency_ms = (time.monotonic() - started) * 1000
        into.append(Outcome(name, started - began, latency_ms, result, detail))
        await asyncio.sleep(PAUSE_S)


async def _soak(lamina: Served, agent: Served, duration_s: float, seed: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=lamina.url, timeout=TIMEOUT_S) as client:
        workload = Workload(client, agent, seed)
        began = time.monotonic()
        until = began + duration_s
        await asyncio.gather(
            *(
                _loop(name, getattr(workload, name), began, until, outcomes)
                for name in OPERATIONS
                for _ in range(LOOPS[name])
            )
        )
    return outcomes


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = {
        result: sum(1 for o in outcomes if o.result == result)
        for result in ("ok", "handled", "bad")
    }
    ok = [o.latency_ms for o in outcomes if o.result == "ok"]
    details: dict[str, int] = {}
    for o in outcomes:
        if o.detail:
            details[o.detail] = details.get(o.detail, 0) + 1
    return {
        "operations": len(outcomes),
        **counts,
        "success_rate": round(counts["ok"] / len(outcomes), 4) if outcomes else None,
        "p50_ms": _percentile(ok, 0.5),
        "p99_ms": _percentile(ok, 0.99),
        "failures": dict(sorted(details.items(), key=lambda item: -item[1])[:8]),
    }


def _windows(outcomes: list[Outcome], duration_s: float) -> list[dict[str, Any]]:
    windows = []
    for start in range(0, int(duration_s + WINDOW_S), int(WINDOW_S)):
        inside = [o for o in outcomes if start <= o.started < start + WINDOW_S]
        if not inside:
            continue
        window: dict[str, Any] = {"t_s": start}
        for name in OPERATIONS:
            mine = [o for o in inside if o.operation == name]
            ok = [o.latency_ms for o in mine if o.result == "ok"]
            window[name] = {
                "n": len(mine),
                "success_rate": round(len(ok) / len(mine), 3) if mine else None,
                "p50_ms": round(statistics.median(ok), 1) if ok else None,
            }
        windows.append(window)
    return windows


def _plot(
    path: Path, rss: list[tuple[float, float]], windows: list[dict[str, Any]], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, latency, success) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    memory.plot([t for t, _ in rss], [m for _, m in rss], color="tab:purple")
    memory.set_ylabel("Lamina RSS (MiB)")
    memory.set_title(title, fontsize=10)
    memory.grid(alpha=0.3)
    middle = [w["t_s"] + WINDOW_S / 2 for w in windows]
    for name in OPERATIONS:
        p50 = [w[name]["p50_ms"] for w in windows]
        rate = [w[name]["success_rate"] for w in windows]
        latency.plot(
            middle, [float("nan") if v is None else v for v in p50], marker=".", label=name
        )
        success.plot(
            middle, [float("nan") if v is None else 100 * v for v in rate], marker=".", label=name
        )
    latency.set_ylabel(f"p50 latency of ok ops (ms)\nper {WINDOW_S:.0f} s window")
    latency.set_yscale("log")
    latency.grid(alpha=0.3, which="both")
    latency.legend(loc="upper right", fontsize=8)
    success.set_ylabel(f"success rate (%)\nper {WINDOW_S:.0f} s window")
    success.set_xlabel("seconds since the load began")
    success.set_ylim(0, 105)
    success.grid(alpha=0.3)
    success.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_problems(log: Path) -> dict[str, int]:
    """Tracebacks and 5xx answers Lamina logged (it logs at WARNING and above)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "error_lines": sum(
            1 for line in text.splitlines() if " ERROR " in line or '"level": "ERROR"' in line
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Mixed workload against a faulty model")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulators' faults")
    parser.add_argument("--error-rate", type=float, default=0.1)
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the work dir (Lamina's and the simulators' logs, the data dir) and print it",
    )
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    fault_options = ("--error-rate", str(args.error_rate), "--fault-kinds", FAULTS)
    pace = ("--tokens-per-second", "40", "--latency", "0.05")

    workdir = Path(tempfile.mkdtemp(prefix="lamina-soak-"))
    try:
        with ExitStack() as stack:
            simulators = {
                name: start_simulator(
                    stack,
                    workdir,
                    f"simulator-{name}",
                    *fault_options,
                    *pace,
                    "--seed",
                    str(args.seed + offset),
                )
                for offset, name in enumerate(("main", "agent"))
            }
            data = workdir / "data"
            data.mkdir()
            env = lamina_env(
                data,
                [
                    deployment("main", simulators["main"], tier="cheap"),
                    deployment("agent", simulators["agent"], tier="strong"),
                ],
                LAMINA_INTELLIGENCE__PLANNER="escalate",
                LAMINA_LIMITS__USER_REQUESTS_PER_MINUTE="600",
            )
            ingest_sample_corpus(env)
            lamina = start_lamina(stack, workdir, env)
            sampler = RssSampler(lamina.pid, interval_s=1.0).start()
            pids = {"lamina": lamina.pid, "bench": os.getpid()}
            pids |= {f"simulator-{n}": s.pid for n, s in simulators.items()}
            cpu_before, began = CpuSnapshot.take(pids), time.monotonic()
            try:
                outcomes = run_loop(_soak(lamina, simulators["agent"], args.duration, args.seed))
            finally:
                sampler.stop()
            usage = CpuUsage.between(cpu_before, CpuSnapshot.take(pids), time.monotonic() - began)
            lamina.child.ensure_running()
            stats = {
                name: httpx.get(f"{s.url}/_sim/stats").json() for name, s in simulators.items()
            }
            logged = _log_problems(lamina.child.log)
    finally:
        if args.keep_workdir:
            print(f"{'work dir':>20}: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rss = [(round(at - began, 1), round(value / MIB, 1)) for at, value in sampler.samples]
    loaded = [m for t, m in rss if t >= 0]
    windows = _windows(outcomes, args.duration)
    per_operation = {
        name: _summary([o for o in outcomes if o.operation == name]) for name in OPERATIONS
    }
    result = {
        "benchmark": "mixed workload (chat, stream, ingest, approval) against simulators "
        f"failing {args.error_rate:.0%} of model calls",
        "duration_s": args.duration,
        "seed": args.seed,
        "success_definition": "ok: 2xx with a complete answer; handled: a problem+json or "
        "SSE error event with a correlation id, or a failed job with an error code; bad: "
        "anything else",
        "overall": _summary(outcomes),
        "per_operation": per_operation,
        "rss_mib": {
            "start": loaded[0] if loaded else None,
            "peak": max(loaded) if loaded else None,
            "end": loaded[-1] if loaded else None,
        },
        "simulator_stats": stats,
        "lamina_log": logged,
        "cpu_s": usage.as_json(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "windows": windows,
        "rss_samples": rss,
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    title = (
        f"soak {args.duration:.0f}s, model faults {args.error_rate:.0%} (seed {args.seed}), "
        f"{os.cpu_count()} cores, load {load_before[0]}"
    )
    _plot(out / "soak.png", rss, windows, title)
    for key, value in result.items():
        if key not in ("windows", "rss_samples", "per_operation", "simulator_stats"):
            print(f"{key:>20}: {value}")
    for name, summary in per_operation.items():
        print(f"{name:>20}: {summary}")
    print(f"{'plot':>20}: {out / 'soak.png'}")
    if result["overall"]["bad"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
