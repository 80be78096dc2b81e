"""Real servers for tests: free loopback ports, a uvicorn app in a thread, a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(
    url: str, *, timeout_s: float = 30.0, process: subprocess.Popen[str] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")


@contextmanager
def app_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base}/readyz")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def lamina_env(**settings: str) -> dict[str, str]:
    """The test process's environment without its ``LAMINA_*`` settings, plus ``settings``.
    Embeddings are the hashing model unless ``settings`` choose (as in-process apps of the
    tests, so an index built by one is searchable by the other)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    env["LAMINA_KNOWLEDGE__EMBEDDINGS"] = "hashing"
    env.update(settings)
    return env


def run_lamina(
    *args: str, env: Mapping[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client_api.cli", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def ingest_corpus(corpus: Path, env: Mapping[str, str]) -> None:
    """``lamina ingest corpus``, which must succeed (its output tells why not)."""
    ingest = run_lamina("ingest", str(corpus), env=env)
    assert ingest.returncode == 0, ingest.stderr + ingest.stdout


@contextmanager
def lamina_process(
    *args: str, env: Mapping[str, str], ready_url: str, module: str = "client_api.cli"
) -> Iterator[subprocess.Popen[str]]:
    """``python -m <module> *args`` (the ``lamina`` command line unless ``module`` wraps
    it), once ``ready_url`` answers 200; terminated when the block ends.

    Its output is read as it comes, keeping the last lines: a pipe nobody reads fills
    up, and a server writing its log to it would then block mid-request."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=dict(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said: deque[str] = deque(maxlen=400)
    reader = threading.Thread(target=_keep_tail, args=(process, said), daemon=True)
    reader.start()

    def output() -> str:
        stop_process(process)
        reader.join(timeout=10)
        return "".join(said)

    try:
        try:
            wait_until_ready(ready_url, timeout_s=60, process=process)
        except (RuntimeError, TimeoutError):
            process.kill()
            raise RuntimeError(
                f"lamina {' '.join(args)} did not become ready:\n{output()}"
            ) from None
        try:
            yield process
        except Exception as failure:
            # A failing test shows what the server said (its logged tracebacks).
            failure.add_note(f"lamina {' '.join(args)} said:\n{output()[-20_000:]}")
            raise
    finally:
        stop_process(process)
        reader.join(timeout=10)


def _keep_tail(process: subprocess.Popen[str], lines: deque[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 15) -> None:
    """Terminate ``process`` if it still runs; kill it if it has not ended in ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
