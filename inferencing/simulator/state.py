"""Mutable state of one simulator: the reply queue, the pacing, the random draws, what it
received and how it answered.

The server's event loop and a test's thread both touch it (``SimulatorServer``
runs uvicorn in a background thread), so every access holds a lock. Nothing
here blocks for long.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from inferencing.simulator import profiles
from inferencing.simulator.config import (
    ConfigUpdate,
    DeploymentStats,
    Fault,
    FaultKind,
    FaultProfile,
    RandomFaultKind,
    RecordedRequest,
    ScriptedReply,
    SimulatorConfig,
)


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    completed: int = 0
    stream_cuts: int = 0
    rejected: int = 0
    faults: Counter[str] = field(default_factory=Counter)


class SimulatorState:
    def __init__(self, config: SimulatorConfig) -> None:
        self._initial = config.model_copy(deep=True)
        self._lock = threading.Lock()
        self._config = self._initial.model_copy(deep=True)
        self._replies: deque[ScriptedReply] = deque(self._config.script)
        self._embedding_faults: deque[Fault] = deque(self._config.embedding_faults)
        self._requests: list[RecordedRequest] = []
        self._stats: dict[str, _Counters] = {}
        self._rng = random.Random(self._config.seed)
        self._dropped_connections = 0
        self.closing = threading.Event()
        """Set when the server stops, so that simulated hangs end at once."""

    @property
    def config(self) -> SimulatorConfig:
        with self._lock:
            return self._config

    # --- script ----------------------------------------------------------------------

    def enqueue(
        self, replies: list[ScriptedReply], embedding_faults: list[Fault] | None = None
    ) -> int:
        """Queue replies (and embedding faults); returns how many replies are now waiting."""
        with self._lock:
            self._replies.extend(replies)
            self._embedding_faults.extend(embedding_faults or ())
            return len(self._replies)

    def next_reply(self, offered_tools: Collection[str] = ()) -> ScriptedReply | None:
        """The first queued reply this request may take (see ``ScriptedReply.when_tool``)."""
        with self._lock:
            for position, reply in enumerate(self._replies):
                if reply.when_tool is None or reply.when_tool in offered_tools:
                    del self._replies[position]
                    return reply
            return None

    def next_embedding_fault(self) -> Fault | None:
        with self._lock:
            return self._embedding_faults.popleft() if self._embedding_faults else None

    def pending_replies(self) -> int:
        with self._lock:
            return len(self._replies)

    def configure(self, update: ConfigUpdate) -> SimulatorConfig:
        # The validated values themselves: model_dump would turn profiles into dicts.
        changes = {name: getattr(update, name) for name in update.model_fields_set}
        with self._lock:
            self._config = self._config.model_copy(update=changes)
            if "seed" in changes:
                self._rng.seed(self._config.seed)
            return self._config

    # --- random draws (seeded by config.seed) ----------------------------------------

    def draw_fault(self, profile: FaultProfile) -> RandomFaultKind | None:
        if not profile.error_rate:
            return None
        with self._lock:
            return profiles.draw_fault(profile, self._rng)

    def draw_stream_cut(self, profile: FaultProfile, chunk_count: int) -> int | None:
        if not profile.stream_cut_rate:
            return None
        with self._lock:
            return profiles.draw_stream_cut(profile, chunk_count, self._rng)

    def first_token_delay(self, profile: FaultProfile | None) -> float:
        """Seconds before the first token: drawn from the profile's latency if it has one,
        else the configured ``first_token_latency_s``."""
        latency = profile.first_token_latency if profile is not None else None
        if latency is None:
            return self.config.first_token_latency_s
        if latency.kind == "fixed":
            return latency.seconds
        with self._lock:
            return profiles.sample_latency(latency, self._rng)

    # --- what was received and answered ----------------------------------------------

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def note_request(self, deployment: str) -> None:
        with self._lock:
            self._counters(deployment).requests += 1

    def note_completed(self, deployment: str) -> None:
        with self._lock:
            self._counters(deployment).completed += 1

    def note_fault(self, deployment: str, kind: FaultKind) -> None:
        with self._lock:
            self._counters(deployment).faults[kind] += 1

    def note_stream_cut(self, deployment: str) -> None:
        with self._lock:
            self._counters(deployment).stream_cuts += 1

    def note_rejected(self, deployment: str) -> None:
        with self._lock:
            self._counters(deployment).rejected += 1

    def stats(self) -> dict[str, DeploymentStats]:
        """Counters per deployment (or model, on the OpenAI routes) since the last reset."""
        with self._lock:
            return {
                deployment: DeploymentStats(
                    requests=c.requests,
                    completed=c.completed,
                    faults=dict(c.faults),
                    stream_cuts=c.stream_cuts,
                    rejected=c.rejected,
                )
                for deployment, c in self._stats.items()
            }

    def _counters(self, deployment: str) -> _Counters:
        counters = self._stats.get(deployment)
        if counters is None:
            counters = self._stats[deployment] = _Counters()
        return counters

    # --- connection drops --------------------------------------------------------------

    def note_dropped_connection(self) -> None:
        """A simulated ``stream_cut`` is about to leave a response unfinished."""
        with self._lock:
            self._dropped_connections += 1

    def claim_dropped_connection(self) -> bool:
        """True (once per drop) if an unfinished response was simulated, not a bug."""
        with self._lock:
            if self._dropped_connections == 0:
                return False
            self._dropped_connections -= 1
            return True

    def reset(self) -> None:
        """Back to the configuration the simulator started with (and its seed); forget
        received requests and statistics."""
        with self._lock:
            self._config = self._initial.model_copy(deep=True)
            self._replies = deque(self._config.script)
            self._embedding_faults = deque(self._config.embedding_faults)
            self._requests.clear()
            self._stats.clear()
            self._rng.seed(self._config.seed)
