"""Lamina served against ``python -m inferencing.simulator``, both on loopback.

The long-running benchmarks (``bench.sse_concurrency``, ``bench.soak``) start one or
more simulators, ingest the bundled sample corpus into a fresh data dir, and serve
``lamina serve`` from it. Every process is entered on the caller's ``ExitStack``, so it
stops on the way out whatever happens. Embeddings are the hashing model (no model file
to load, and the same in the ingest and the server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.processes import REPO, Child, free_port, running

SIM_KEY = "sk-bench"
SIM_MODEL = "gpt-sim"


@dataclass(frozen=True, slots=True)
class Served:
    """A child process and the URL it answers on."""

    url: str
    child: Child

    @property
    def pid(self) -> int:
        return self.child.process.pid


def start_simulator(stack: ExitStack, workdir: Path, name: str, *options: str) -> Served:
    """``python -m inferencing.simulator`` with ``options`` (``--tokens-per-second`` …)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        *("-m", "inferencing.simulator", "--port", str(port)),
        *("--no-record", "--log-level", "warning", *options),
    ]
    child = stack.enter_context(
        running(name, command, ready_url=f"{url}/v1/models", cwd=REPO, log_dir=workdir)
    )
    return Served(url, child)


def deployment(name: str, simulator: Served, **settings: object) -> dict[str, object]:
    """One entry of ``LAMINA_INFERENCING__DEPLOYMENTS`` served by ``simulator``."""
    return {
        "name": name,
        "provider": "openai",
        "base_url": f"{simulator.url}/v1",
        "model": SIM_MODEL,
        "api_key": SIM_KEY,
        **settings,
    }


def lamina_env(
    data_dir: Path, deployments: Sequence[Mapping[str, object]], **settings: str
) -> dict[str, str]:
    """Dev identity headers, hashing embeddings, the given deployments, then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMINA_", "OTEL_"))}
    env |= {
        "LAMINA_DATA_DIR": str(data_dir),
        "LAMINA_LOG_LEVEL": "WARNING",
        "LAMINA_AUTH__MODE": "dev",
        "LAMINA_KNOWLEDGE__EMBEDDINGS": "hashing",
        "LAMINA_TELEMETRY__ENABLED": "false",
        "LAMINA_INFERENCING__DEPLOYMENTS": json.dumps(list(deployments)),
        # Lamina runs from its data dir (so no developer's .env is read); find the repo.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return env | settings


def ingest_sample_corpus(env: Mapping[str, str]) -> None:
    """``lamina ingest samples/corpus`` into the data dir of ``env``."""
    subprocess.run(
        [sys.executable, "-m", "client_api.cli", "ingest", str(REPO / "samples" / "corpus")],
        env=dict(env),
        cwd=env["LAMINA_DATA_DIR"],
        check=True,
        capture_output=True,
    )


def start_lamina(stack: ExitStack, workdir: Path, env: Mapping[str, str]) -> Served:
    """``lamina serve`` (one uvicorn worker) on a free port, from the data dir of ``env``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        *("-m", "client_api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
    ]
    child = stack.enter_context(
        running(
            "lamina",
            command,
            ready_url=f"{url}/readyz",
            cwd=Path(env["LAMINA_DATA_DIR"]),
            log_dir=workdir,
            env=env,
        )
    )
    return Served(url, child)
