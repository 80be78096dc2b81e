"""Run the simulator on loopback in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn

from inferencing.simulator.app import create_app
from inferencing.simulator.config import (
    ConfigUpdate,
    DeploymentStats,
    Fault,
    RecordedRequest,
    ScriptedReply,
    SimulatorConfig,
)
from inferencing.simulator.state import SimulatorState


class _ScriptedDropFilter(logging.Filter):
    """Hides uvicorn's complaint about an unfinished response when the script asked for it."""

    def __init__(self, state: SimulatorState) -> None:
        super().__init__()
        self._state = state

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != _UNFINISHED_RESPONSE:
            return True
        return not self._state.claim_dropped_connection()


_UNFINISHED_RESPONSE = "ASGI callable returned without completing response."


class SimulatorServer:
    """The simulator served by uvicorn on ``127.0.0.1`` and a free port.

    ::

        with SimulatorServer() as sim:
            sim.script(ScriptedReply(content="Hello"))
            client = AsyncOpenAI(base_url=sim.openai_base_url, api_key="test")

    The script, configuration, received requests and counters are reachable directly
    (``script``, ``configure``, ``requests``, ``stats``, ``reset``) as well as over HTTP.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.state = SimulatorState(config or SimulatorConfig())
        self._host = host
        self._requested_port = port
        self._log_level = log_level
        self._start_timeout_s = start_timeout_s
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._log_filter = _ScriptedDropFilter(self.state)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the simulator is already running")
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._requested_port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(state=self.state),
            # Leave the process's logging set-up alone (tests, benchmarks configure their own).
            log_config=None,
            log_level=self._log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        logging.getLogger("uvicorn.error").addFilter(self._log_filter)
        self.state.closing.clear()

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported to the starting thread
                self._failure = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="lamina-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not server.started:
            if self._failure is not None or not self._thread.is_alive():
                raise RuntimeError("the simulator failed to start") from self._failure
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator did not start in time")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.state.closing.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        logging.getLogger("uvicorn.error").removeFilter(self._log_filter)

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: the Azure OpenAI endpoint."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``<base_url>/v1``: the ``base_url`` an OpenAI client takes."""
        return f"{self.base_url}/v1"

    # --- control -----------------------------------------------------------------

    def script(self, *replies: ScriptedReply) -> None:
        """Queue replies (or faults) for the next chat requests, in order."""
        self.state.enqueue(list(replies))

    def script_embedding_faults(self, *faults: Fault) -> None:
        self.state.enqueue([], list(faults))

    def configure(self, update: ConfigUpdate) -> SimulatorConfig:
        """Change the configuration (pacing, profiles, seed, ...) of the running server."""
        return self.state.configure(update)

    def requests(self) -> list[RecordedRequest]:
        return self.state.requests()

    def stats(self) -> dict[str, DeploymentStats]:
        """Counters per deployment since the start or the last reset."""
        return self.state.stats()

    def reset(self) -> None:
        self.state.reset()
