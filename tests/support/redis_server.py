"""A private ``redis-server`` for tests: on a free loopback port, without persistence,
and stoppable mid-test to play an outage.

Use it as a context manager (``with RedisServer() as server: ...``) or through
:func:`private_redis`, which skips the test when ``redis-server`` is not installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from tests.support.processes import free_port, stop_process


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` child process; ``stop()`` and ``start()`` keep the port."""

    def __init__(self, executable: str = "redis-server") -> None:
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(f"{executable} is not on PATH")
        self._executable = found
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        # fmt: off
        self._process = subprocess.Popen(
            [
                self._executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        deadline = time.monotonic() + timeout_s
        while not _answers_ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer within {timeout_s}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is gone: it keeps none)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout_s=10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    """A started private server, stopped afterwards. A missing redis-server fails the
    test rather than skipping it: .ci/run needs one anyway, and a skip would hide it."""
    with RedisServer() as server:
        yield server
