"""Cold start: from ``lamina serve`` starting to ``/readyz`` answering 200, and on to the
first authenticated chat answer.

Per configuration, the bundled sample corpus is ingested once into a template data dir
(``lamina ingest``, with that configuration's embedding model). Per run, a fresh copy of
the template is served by a new ``lamina serve`` process, started with everything else
at Lamina's defaults, which a server needs beyond ingestion only for auth: JWT against the
loopback OpenID provider of ``tests/support/identity.py`` (in this process). Readiness is
polled every 10 ms on one keep-alive client; the clock starts before the process is
spawned, so interpreter start, imports, settings, opening the stores and loading the
embedding model are all inside it.

Then one authenticated ``POST /v1/chat``: the first answer after readiness pays what
start-up left for first use (the OpenID metadata and signing keys, the index's vectors,
the embedding model's first inference). A second one shows the same turn warm. Each
answer must be a 200 that cites a source. Last, the process is stopped (SIGTERM) and the
time to exit is recorded.

Configurations (``--configs``):

- ``default``: no ``LAMINA_*`` setting but the data dir and auth: the extractive
  answerer (no model), the local embedding model (all-MiniLM-L6-v2 int8, loaded at
  start-up), the SQLite index and stores, telemetry on without exporters;
- ``hashing``: the same with ``LAMINA_KNOWLEDGE__EMBEDDINGS=hashing``, to show what
  loading the local model costs.

The first ``--warmup`` starts of each configuration are not counted: they fill the
operating system's file cache (Python's modules, the model file), which a cold start in
production (a new container on a warm node, a restart) mostly finds warm too.

    .venv/bin/python -m bench.cold_start [--runs 5] [--warmup 1] [--configs default,hashing]

Writes bench/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.knowledge_support import machine, write_result
from bench.processes import REPO, free_port, running
from bench.turn_support import (
    default_env,
    jwt_settings,
    machine_line,
    median_over_runs,
    with_machine,
)
from tests.support.identity import IdentityProvider, running_identity_provider

CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "hashing": {"LAMINA_KNOWLEDGE__EMBEDDINGS": "hashing"},
}
QUESTION = "How many days of annual leave do I get?"
POLL_S = 0.01


def _ingest(template: Path, settings: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "client_api.cli", "ingest", str(REPO / "samples" / "corpus")],
        env=default_env(template, **settings),
        cwd=template,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def _ask(client: httpx.Client, url: str, token: str) -> float:
    started = time.perf_counter()
    response = client.post(
        f"{url}/v1/chat",
        json={"message": QUESTION},
        headers={"Authorization": f"Bearer {token}"},
    )
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"chat answered {response.status_code}: {response.text[:300]}")
    if not response.json().get("citations"):
        raise SystemExit(f"the answer cites no source: {response.text[:300]}")
    return elapsed * 1000


def _start(
    name: str, template: Path, workdir: Path, settings: dict[str, str], token: str
) -> dict[str, object]:
    """One cold start of a copy of ``template``: readiness, first and second answer, exit."""
    data = workdir / name
    shutil.copytree(template, data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "client_api.cli", "serve", "--port", str(port)]
    with ExitStack() as stack:
        started = time.perf_counter()
        child = stack.enter_context(
            running(
                name,
                command,
                ready_url=f"{url}/readyz",
                cwd=data,
                log_dir=workdir,
                env=default_env(data, **settings),
                ready_timeout_s=180,
                poll_s=POLL_S,
            )
        )
        ready_ms = (time.perf_counter() - started) * 1000
        with httpx.Client(timeout=60) as client:
            first_ms = _ask(client, url, token)
            second_ms = _ask(client, url, token)
        stopping = time.perf_counter()
        child.stop()
        stop_ms = (time.perf_counter() - stopping) * 1000
    shutil.rmtree(data, ignore_errors=True)
    return with_machine(
        {
            "ready_ms": round(ready_ms, 1),
            "first_answer_ms": round(first_ms, 1),
            "ready_to_first_answer_ms": round(ready_ms + first_ms, 1),
            "second_answer_ms": round(second_ms, 1),
            "stop_ms": round(stop_ms, 1),
        }
    )


def _row(figures: dict[str, object]) -> str:
    return (
        f"ready {figures['ready_ms']} ms, first answer +{figures['first_answer_ms']} ms "
        f"(second {figures['second_answer_ms']} ms), stop {figures['stop_ms']} ms "
        f"{machine_line(figures)}"
    )


def _configuration(
    name: str, workdir: Path, identity: IdentityProvider, token: str, args: argparse.Namespace
) -> dict[str, object]:
    settings = CONFIGS[name] | jwt_settings(identity)
    template = workdir / f"{name}-template"
    template.mkdir()
    ingest_s = _ingest(template, settings)
    for n in range(args.warmup):
        _start(f"{name}-warmup{n}", template, workdir, settings, token)
    runs = []
    for n in range(args.runs):
        runs.append(_start(f"{name}-run{n}", template, workdir, settings, token))
        print(f"  {name}, run {n}: {_row(runs[-1])}")
    return {
        "settings": CONFIGS[name],
        "ingest_s": round(ingest_s, 1),
        "median_over_runs": median_over_runs(runs),
        "per_run": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Cold start of lamina serve to readiness")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="uncounted starts per config")
    parser.add_argument("--configs", default="default,hashing", help=f"of {', '.join(CONFIGS)}")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="lamina-cold-start-"))
    try:
        with running_identity_provider() as identity:
            token = identity.token("adele", groups=("employees", "hr"), expires_in=6 * 3600)
            results = {name: _configuration(name, workdir, identity, token, args) for name in names}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "lamina serve: process start to /readyz 200, then the first "
        "authenticated POST /v1/chat answer (JWT), sample corpus ingested",
        "configurations": results,
        **machine(),
    }
    path = write_result("cold_start", result)
    for name, figures in results.items():
        medians = figures["median_over_runs"]
        assert isinstance(medians, dict)
        print(f"median of {args.runs} run(s), {name}: {_row(medians)}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
