"""Resident memory of a process over time, sampled on a thread (psutil).

Sampling from a thread rather than the benchmark's event loop keeps the interval steady
while the loop is busy with a thousand streams; the samples carry monotonic times so a
caller can cut them into phases (baseline, load, after).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

MIB = 1024 * 1024


@dataclass
class RssSampler:
    """Samples the RSS of ``pid`` every ``interval_s`` until :meth:`stop`."""

    pid: int
    interval_s: float = 0.1
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        process = psutil.Process(self.pid)

        def sample() -> None:
            while not self._stop.is_set():
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    return  # the process has gone: nothing more to sample
                self.samples.append((time.monotonic(), rss))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def now_mib(self) -> float:
        rss: int = psutil.Process(self.pid).memory_info().rss
        return rss / MIB

    def peak_mib(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        values = [rss for at, rss in self.samples if since <= at <= until]
        return round(max(values) / MIB, 1) if values else None
