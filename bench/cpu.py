"""Where the CPU went during a measurement (Linux ``/proc``; empty elsewhere).

On a small shared machine latency figures move with whatever else runs. The CPU
seconds a passthrough process spends per request move far less, and the CPU used by
processes outside the benchmark says how much a run was disturbed.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _machine_ticks() -> tuple[int, int, int] | None:
    """(busy, total, steal) ticks over all cores since boot."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in line.split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    total = sum(values[:8])
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    return total - idle - steal, total, steal


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    machine: tuple[int, int, int] | None
    reaped_children_s: float
    processes_s: Mapping[str, float | None]

    @classmethod
    def take(cls, pids: Mapping[str, int]) -> CpuSnapshot:
        return cls(
            machine=_machine_ticks(),
            reaped_children_s=_children_cpu_s(),
            processes_s={name: process_cpu_s(pid) for name, pid in pids.items()},
        )


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU seconds spent between two snapshots."""

    processes_s: Mapping[str, float]
    load_generator_s: float
    machine_busy_s: float | None
    machine_steal_s: float | None
    wall_s: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> CpuUsage:
        processes = {
            name: after_s - before_s
            for name, after_s in after.processes_s.items()
            if after_s is not None and (before_s := before.processes_s.get(name)) is not None
        }
        busy = steal = None
        if before.machine and after.machine:
            busy = (after.machine[0] - before.machine[0]) * _TICK_S
            steal = (after.machine[2] - before.machine[2]) * _TICK_S
        return cls(
            processes_s=processes,
            # wrk or bench.loadgen: the one child reaped in between.
            load_generator_s=after.reaped_children_s - before.reaped_children_s,
            machine_busy_s=busy,
            machine_steal_s=steal,
            wall_s=wall_s,
        )

    @property
    def outside_s(self) -> float | None:
        """CPU used by processes that are not part of the benchmark (other work on the box)."""
        if self.machine_busy_s is None:
            return None
        ours = self.load_generator_s + sum(self.processes_s.values())
        return max(0.0, self.machine_busy_s - ours)

    @property
    def outside_share(self) -> float | None:
        """``outside_s`` as a share of all the machine's cores over the measurement."""
        outside = self.outside_s
        if outside is None or self.wall_s <= 0:
            return None
        return outside / (self.wall_s * (os.cpu_count() or 1))

    def as_json(self) -> dict[str, object]:
        outside = self.outside_s
        return {
            "processes_s": {name: round(s, 3) for name, s in self.processes_s.items()},
            "load_generator_s": round(self.load_generator_s, 3),
            "machine_busy_s": _rounded(self.machine_busy_s),
            "machine_steal_s": _rounded(self.machine_steal_s),
            "outside_benchmark_s": _rounded(outside),
            "outside_benchmark_share_of_machine": _rounded(self.outside_share),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
