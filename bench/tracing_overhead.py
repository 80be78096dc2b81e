"""What tracing costs a chat turn: POST /v1/chat latency with telemetry on, against off.

Per run, two ``lamina serve`` processes answer the bundled sample corpus, each from a
fresh copy of one ingested data dir, in model mode against the OpenAI-compatible
simulator with zero latency (so that the turn is all Lamina):

- **off**: ``LAMINA_TELEMETRY__ENABLED=false``: no providers, every span a no-op;
- **on**: SDK providers sampling every trace, every span through a batch processor to
  the OTLP/HTTP exporter, received by a collector on loopback that decodes and discards
  them (the production path short of the network), metrics recorded as well.

Requests alternate between the two servers in a random order, so drift in the
machine's load hits both alike. Each run's figures are percentiles of its turns; the
result is the median over runs. ``cpu ms/turn`` is what the server process spent per
turn (its export thread included), which moves far less with machine noise than
latency does.

    .venv/bin/python -m bench.tracing_overhead [--runs 3] [--requests 200] [--warmup 20]

Writes bench/results/tracing_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.cpu import CpuSnapshot, CpuUsage, process_cpu_s
from bench.processes import REPO, Child, free_port, running

QUESTIONS = [
    ("How many days of annual leave do I get?", "adele", "employees,hr"),
    ("Who is on the Kestrel rotation?", "alex", "employees,engineering"),
    ("What is the budget of Project Falcon?", "lynne", "employees,finance"),
    ("How long does Atlas keep my data?", "guest", ""),
]
MODES = ("off", "on")
CORRELATION_HEADER = "X-Correlation-ID"


@dataclass
class Collector:
    """An OTLP/HTTP collector that decodes what arrives and keeps only its trace ids."""

    url: str = ""
    spans: int = 0
    trace_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans += 1
                        self.trace_ids.add(span.trace_id.hex())


@contextmanager
def discarding_collector() -> Iterator[Collector]:
    collector = Collector()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                collector.receive(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    collector.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()


def _base_env(data_dir: Path, simulator_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMINA_", "OTEL_"))}
    env |= {
        "LAMINA_DATA_DIR": str(data_dir),
        "LAMINA_LOG_LEVEL": "WARNING",
        "LAMINA_AUTH__MODE": "dev",
        "LAMINA_INFERENCING__PROVIDER": "openai",
        "LAMINA_INFERENCING__BASE_URL": f"{simulator_url}/v1",
        "LAMINA_INFERENCING__API_KEY": "sk-bench",
        "LAMINA_INFERENCING__MODEL": "gpt-sim",
        # Lamina runs from its data dir (so no developer's .env is read); find the repo.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return env


def _mode_env(mode: str, collector: Collector) -> dict[str, str]:
    if mode == "off":
        return {"LAMINA_TELEMETRY__ENABLED": "false"}
    return {
        "LAMINA_TELEMETRY__ENABLED": "true",
        "LAMINA_TELEMETRY__EXPORTERS": '["otlp"]',
        "LAMINA_TELEMETRY__OTLP_PROTOCOL": "http/protobuf",
        "LAMINA_TELEMETRY__OTLP_ENDPOINT": collector.url,
        "LAMINA_TELEMETRY__SAMPLE_RATIO": "1.0",
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Server:
    mode: str
    url: str
    child: Child
    timings_ms: list[float] = field(default_factory=list)
    cpu_before_s: float = 0.0

    def ask(self, client: httpx.Client, n: int) -> httpx.Response:
        question, user, groups = QUESTIONS[n % len(QUESTIONS)]
        response = client.post(
            f"{self.url}/v1/chat",
            json={"message": question},
            headers={"X-Lamina-User": user, "X-Lamina-Groups": groups},
        )
        if response.status_code != 200:
            self.child.ensure_running()
            raise SystemExit(f"{self.mode}: {response.status_code} {response.text[:300]}")
        return response

    def cpu_s(self) -> float:
        spent = process_cpu_s(self.child.process.pid)
        return 0.0 if spent is None else spent


def _run(
    number: int,
    template: Path,
    workdir: Path,
    simulator: Child,
    simulator_url: str,
    collector: Collector,
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, dict[str, float]]:
    """One run: both servers started fresh, warmed up, then measured turn by turn."""
    with ExitStack() as stack:
        servers: list[Server] = []
        for mode in MODES:
            data = workdir / f"run{number}-{mode}"
            shutil.copytree(template, data)
            port = free_port()
            env = _base_env(data, simulator_url) | _mode_env(mode, collector)
            command = [sys.executable, "-m", "client_api.cli", "serve", "--port", str(port)]
            url = f"http://127.0.0.1:{port}"
            child = stack.enter_context(
                running(
                    f"lamina-{mode}-{number}",
                    command,
                    ready_url=f"{url}/readyz",
                    cwd=data,
                    log_dir=workdir,
                    env=env,
                )
            )
            servers.append(Server(mode, url, child))
        with httpx.Client(timeout=30) as client:
            traced: str | None = None
            for n in range(args.warmup):  # connections, first-use imports and caches
                for server in servers:
                    response = server.ask(client, n)
                    if not response.json().get("route"):
                        raise SystemExit(f"{server.mode}: no model answered: {response.text}")
                    if server.mode == "on":
                        traced = response.headers[CORRELATION_HEADER]
            for server in servers:
                server.cpu_before_s = server.cpu_s()
            ours = {s.mode: s.child.process.pid for s in servers} | {
                "simulator": simulator.process.pid,
                "bench": os.getpid(),
            }
            machine_before, started_at = CpuSnapshot.take(ours), time.monotonic()
            for n in range(args.requests):
                for server in rng.sample(servers, len(servers)):
                    started = time.perf_counter()
                    server.ask(client, n)
                    server.timings_ms.append((time.perf_counter() - started) * 1000)
            usage = CpuUsage.between(
                machine_before, CpuSnapshot.take(ours), time.monotonic() - started_at
            )
            figures = {
                server.mode: {
                    "p50_ms": statistics.median(server.timings_ms),
                    "p99_ms": _percentile(server.timings_ms, 0.99),
                    "mean_ms": statistics.fmean(server.timings_ms),
                    "cpu_ms_per_turn": (server.cpu_s() - server.cpu_before_s)
                    * 1000
                    / len(server.timings_ms),
                }
                for server in servers
            }
            # Other work on the machine during the run: when high, distrust the latencies.
            figures["machine"] = {"other_cpu_share": usage.outside_share or 0.0}
    # The servers have stopped, flushing what they buffered: tracing was really on.
    if traced is None or traced not in collector.trace_ids:
        raise SystemExit("tracing on: the collector never received the warm-up turn's trace")
    return figures


def _median_over_runs(runs: list[dict[str, dict[str, float]]], mode: str) -> dict[str, float]:
    keys = runs[0][mode].keys()
    return {key: round(statistics.median(run[mode][key] for run in runs), 2) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description="Overhead of tracing on chat turn latency")
    parser.add_argument("--runs", type=int, default=3, help="fresh server pairs")
    parser.add_argument("--requests", type=int, default=200, help="turns per server per run")
    parser.add_argument("--warmup", type=int, default=20, help="turns per server before timing")
    args = parser.parse_args()
    rng = random.Random(7)
    load_before = [round(x, 2) for x in os.getloadavg()]

    workdir = Path(tempfile.mkdtemp(prefix="lamina-tracing-"))
    try:
        with ExitStack() as stack:
            simulator_port = free_port()
            simulator_url = f"http://127.0.0.1:{simulator_port}"
            simulator = stack.enter_context(
                running(
                    "simulator",
                    [
                        sys.executable,
                        *("-m", "inferencing.simulator", "--port", str(simulator_port)),
                        *("--latency", "0", "--no-record", "--log-level", "warning"),
                    ],
                    ready_url=f"{simulator_url}/v1/models",
                    cwd=REPO,
                    log_dir=workdir,
                )
            )
            collector = stack.enter_context(discarding_collector())
            template = workdir / "ingested"
            template.mkdir()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "client_api.cli",
                    "ingest",
                    str(REPO / "samples" / "corpus"),
                ],
                env=_base_env(template, simulator_url) | _mode_env("off", collector),
                cwd=template,
                check=True,
                capture_output=True,
            )
            runs = [
                _run(n, template, workdir, simulator, simulator_url, collector, args, rng)
                for n in range(args.runs)
            ]
            spans_received = collector.spans
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    off, on = _median_over_runs(runs, "off"), _median_over_runs(runs, "on")
    result = {
        "benchmark": "POST /v1/chat, model mode (zero-latency simulator), sample corpus, "
        "sequential, alternating servers; tracing off vs on (OTLP/HTTP to a discarding "
        "collector)",
        "runs": args.runs,
        "turns_per_server_per_run": args.requests,
        "off": off,
        "on": on,
        "added_p50_ms": round(on["p50_ms"] - off["p50_ms"], 2),
        "added_p50_percent": round(100 * (on["p50_ms"] - off["p50_ms"]) / off["p50_ms"], 1),
        "added_p99_ms": round(on["p99_ms"] - off["p99_ms"], 2),
        "added_cpu_ms_per_turn": round(on["cpu_ms_per_turn"] - off["cpu_ms_per_turn"], 2),
        "spans_per_turn": round(spans_received / (args.runs * (args.requests + args.warmup)), 1),
        "p50_ms_per_run": [{mode: round(run[mode]["p50_ms"], 2) for mode in MODES} for run in runs],
        "other_cpu_share_per_run": [round(run["machine"]["other_cpu_share"], 3) for run in runs],
        "per_run": runs,
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracing_overhead.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        if key != "per_run":
            print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
