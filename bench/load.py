"""Load generators as separate processes, and the figures read back from them.

``wrk`` is preferred: it is C, costs the shared cores little and keeps an exact latency
histogram. A Lua script sets the POST body and headers and, in ``done()``, prints the
figures as one JSON line (microseconds, read from wrk's histogram, not from the rounded
``--latency`` text). Where wrk is missing, ``bench.loadgen`` (aiohttp) prints the same
JSON. Either way the generator is a process of its own, apart from what it measures.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from bench.processes import REPO

FIGURES_MARK = "BENCH_FIGURES "


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One measurement: the same POST sent back to back on ``concurrency`` connections."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    concurrency: int
    duration_s: int


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def failed(self) -> bool:
        return self.non_2xx > 0 or self.socket_errors > 0 or self.requests == 0

    def as_json(self) -> dict[str, float | int]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_figures(cls, figures: Mapping[str, float]) -> LoadResult:
        """From the JSON both generators print: counts, and times in microseconds."""
        duration_s = figures["duration_us"] / 1e6
        return cls(
            requests=int(figures["requests"]),
            duration_s=duration_s,
            rps=figures["requests"] / duration_s if duration_s else 0.0,
            p50_ms=figures["p50_us"] / 1000,
            p90_ms=figures["p90_us"] / 1000,
            p99_ms=figures["p99_us"] / 1000,
            mean_ms=figures["mean_us"] / 1000,
            max_ms=figures["max_us"] / 1000,
            non_2xx=int(figures["status"]),
            socket_errors=int(figures["socket"]),
        )


class LoadGenerator(Protocol):
    def describe(self) -> dict[str, str | int]:
        """What the generator is, for the results file."""
        ...

    def run(self, spec: LoadSpec) -> LoadResult:
        """Run one measurement to its end and return its figures."""
        ...


class LoadGeneratorError(Exception):
    """The load generator failed or printed no figures; the message carries its output."""


def _figures(stdout: str, stderr: str, command: Sequence[str]) -> dict[str, float]:
    for line in stdout.splitlines():
        if line.startswith(FIGURES_MARK):
            figures: dict[str, float] = json.loads(line.removeprefix(FIGURES_MARK))
            return figures
    raise LoadGeneratorError(
        f"{' '.join(command)} printed no figures.\nstdout:\n{stdout}\nstderr:\n{stderr}"
    )


def _lua_long_string(text: str) -> str:
    level = "=" * 4
    if f"]{level}]" in text:
        raise ValueError("text closes a Lua long string")
    return f"[{level}[{text}]{level}]"


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"mean_us":%.1f,"max_us":%d,"status":%d,"socket":%d}\\n',
    MARK, summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_script(spec: LoadSpec) -> str:
    """The Lua script wrk runs: the POST (body, headers) and a ``done()`` printing figures."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_long_string(spec.body.decode())}"]
    headers = {"Content-Type": "application/json", **spec.headers}
    lines += [
        f"wrk.headers[ {_lua_long_string(name)} ] = {_lua_long_string(value)}"
        for name, value in headers.items()
    ]
    lines.append(f"MARK = {_lua_long_string(FIGURES_MARK)}")
    return "\n".join(lines) + "\n" + _WRK_DONE


class WrkLoad:
    """``wrk`` with one thread: enough for tens of thousands of requests/second."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self._wrk = executable
        self._workdir = workdir
        self._runs = 0

    @staticmethod
    def find() -> str | None:
        return shutil.which("wrk")

    def describe(self) -> dict[str, str | int]:
        banner = subprocess.run(
            [self._wrk, "--version"], capture_output=True, text=True, check=False
        ).stdout
        version = re.search(r"wrk (\S+)", banner)
        return {"kind": "wrk", "version": version[1] if version else "?", "threads": 1}

    def run(self, spec: LoadSpec) -> LoadResult:
        self._runs += 1
        script = self._workdir / f"wrk-{self._runs}.lua"
        script.write_text(wrk_script(spec))
        command = [
            self._wrk,
            "--threads",
            "1",
            "--connections",
            str(spec.concurrency),
            "--duration",
            f"{spec.duration_s}s",
            "--timeout",
            "10s",
            "--latency",
            "--script",
            str(script),
            spec.url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=spec.duration_s + 60, check=False
        )
        if done.returncode != 0:
            raise LoadGeneratorError(f"wrk exited with {done.returncode}:\n{done.stderr}")
        return LoadResult.from_figures(_figures(done.stdout, done.stderr, command))


class PythonLoad:
    """``python -m bench.loadgen``: the fallback where wrk cannot be installed."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._runs = 0

    def describe(self) -> dict[str, str | int]:
        return {"kind": "bench.loadgen (aiohttp)", "version": sys.version.split()[0], "threads": 1}

    def run(self, spec: LoadSpec) -> LoadResult:
        self._runs += 1
        body_file = self._workdir / f"body-{self._runs}.json"
        body_file.write_bytes(spec.body)
        command = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            spec.url,
            "--body-file",
            str(body_file),
            "--concurrency",
            str(spec.concurrency),
            "--duration",
            str(spec.duration_s),
        ]
        for name, value in spec.headers.items():
            command += ["--header", f"{name}: {value}"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=spec.duration_s + 60,
            check=False,
        )
        if done.returncode != 0:
            raise LoadGeneratorError(f"bench.loadgen exited with {done.returncode}:\n{done.stderr}")
        return LoadResult.from_figures(_figures(done.stdout, done.stderr, command))
