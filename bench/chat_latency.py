"""Latency of POST /v1/chat in extractive mode on the bundled sample corpus.

Starts ``lamina serve`` on a free loopback port (dev auth, a fresh data dir with the
sample corpus ingested), sends N sequential requests cycling through questions and
callers, and prints p50/p95/p99 with the machine's cores and load. Writes JSON to
bench/results/chat_latency.json.

    .venv/bin/python -m bench.chat_latency --requests 100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("How many days of annual leave do I get?", "adele", "employees,hr"),
    ("Who is on the Kestrel rotation?", "alex", "employees,engineering"),
    ("What is the budget of Project Falcon?", "lynne", "employees,finance"),
    ("How long does Atlas keep my data?", "guest", ""),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency of POST /v1/chat, extractive mode")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="lamina-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    env |= {"LAMINA_DATA_DIR": str(data), "LAMINA_AUTH__MODE": "dev", "LAMINA_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "client_api.cli"]
    subprocess.run(
        [*cli, "ingest", str(REPO / "samples" / "corpus")], env=env, check=True, capture_output=True
    )
    port = _free_port()
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become ready")
                time.sleep(0.1)
            client.post("/v1/chat", json={"message": "warm up"}, headers={"X-Lamina-User": "w"})
            timings: list[float] = []
            for i in range(args.requests):
                question, user, groups = QUESTIONS[i % len(QUESTIONS)]
                headers = {"X-Lamina-User": user, "X-Lamina-Groups": groups}
                started = time.perf_counter()
                response = client.post("/v1/chat", json={"message": question}, headers=headers)
                timings.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
    finally:
        server.terminate()
        server.wait(timeout=15)

    result = {
        "benchmark": "POST /v1/chat, extractive mode, sample corpus, sequential",
        "requests": len(timings),
        "p50_ms": round(statistics.median(timings), 2),
        "p95_ms": round(_percentile(timings, 0.95), 2),
        "p99_ms": round(_percentile(timings, 0.99), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_latency.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>14}: {value}")


if __name__ == "__main__":
    main()
