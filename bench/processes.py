"""Child processes of a benchmark: started on a free loopback port, awaited, always stopped."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ProcessFailed(Exception):
    """A child did not become ready, or exited while it was measured; carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ensure_running(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ProcessFailed(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_until_ready(child: Child, url: str, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    # One client: a new one per poll costs milliseconds (its SSL context), which would
    # blur a start-up time measured through this wait.
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            child.ensure_running()
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
    raise ProcessFailed(f"{child.name}: {url} not 200 within {timeout_s:.0f}s:\n{child.log_tail()}")


@contextmanager
def running(
    name: str,
    command: Sequence[str],
    *,
    ready_url: str,
    cwd: Path,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    poll_s: float = 0.05,
) -> Iterator[Child]:
    """Start ``command``, wait for ``ready_url`` to answer 200, stop it on the way out.

    Output goes to ``<log_dir>/<name>.log`` rather than a pipe nobody reads, which
    would fill and stall the child in the middle of a measurement.
    """
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    child = Child(name, process, log)
    try:
        _wait_until_ready(child, ready_url, ready_timeout_s, poll_s)
        yield child
    finally:
        child.stop()
