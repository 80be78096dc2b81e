"""Mutable state of one simulator: the reply queue, the pacing, what it received.

The server's event loop and a test's thread both touch it (``SimulatorServer``
runs uvicorn in a background thread), so every access holds a lock. Nothing
here blocks for long.
"""

from __future__ import annotations

import threading
from collections import deque

from inferencing.simulator.config import (
    ConfigUpdate,
    Fault,
    RecordedRequest,
    ScriptedReply,
    SimulatorConfig,
)


class SimulatorState:
    def __init__(self, config: SimulatorConfig) -> None:
        self._initial = config.model_copy(deep=True)
        self._lock = threading.Lock()
        self._config = self._initial.model_copy(deep=True)
        self._replies: deque[ScriptedReply] = deque(self._config.script)
        self._embedding_faults: deque[Fault] = deque(self._config.embedding_faults)
        self._requests: list[RecordedRequest] = []
        self._dropped_connections = 0
        self.closing = threading.Event()
        """Set when the server stops, so that simulated hangs end at once."""

    @property
    def config(self) -> SimulatorConfig:
        with self._lock:
            return self._config

    def enqueue(
        self, replies: list[ScriptedReply], embedding_faults: list[Fault] | None = None
    ) -> int:
        """Queue replies (and embedding faults); returns how many replies are now waiting."""
        with self._lock:
            self._replies.extend(replies)
            self._embedding_faults.extend(embedding_faults or ())
            return len(self._replies)

    def next_reply(self) -> ScriptedReply | None:
        with self._lock:
            return self._replies.popleft() if self._replies else None

    def next_embedding_fault(self) -> Fault | None:
        with self._lock:
            return self._embedding_faults.popleft() if self._embedding_faults else None

    def pending_replies(self) -> int:
        with self._lock:
            return len(self._replies)

    def configure(self, update: ConfigUpdate) -> SimulatorConfig:
        with self._lock:
            self._config = self._config.model_copy(update=update.model_dump(exclude_unset=True))
            return self._config

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def note_dropped_connection(self) -> None:
        """A scripted ``stream_cut`` is about to leave a response unfinished."""
        with self._lock:
            self._dropped_connections += 1

    def claim_dropped_connection(self) -> bool:
        """True (once per drop) if an unfinished response was scripted, not a bug."""
        with self._lock:
            if self._dropped_connections == 0:
                return False
            self._dropped_connections -= 1
            return True

    def reset(self) -> None:
        """Back to the configuration the simulator started with; forget received requests."""
        with self._lock:
            self._config = self._initial.model_copy(deep=True)
            self._replies = deque(self._config.script)
            self._embedding_faults = deque(self._config.embedding_faults)
            self._requests.clear()
