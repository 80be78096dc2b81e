"""Overhead of Lamina's inferencing gateway as an OpenAI passthrough, against the direct call.

Starts, on loopback, a zero-latency OpenAI-compatible upstream (``bench.stub_upstream``),
a bare aiohttp passthrough to it for calibration (``bench.reference_proxy``), the
LiteLLM proxy (``bench.litellm_proxy``: pinned, in a cached virtualenv of its own, master
key and rate limiting on), and ``lamina serve`` (one uvicorn worker, JWT auth against a
loopback OpenID provider, rate limits on, one deployment ``bench`` pointing at the
stub). For each concurrency it warms up, then measures ``POST /v1/chat/completions``
direct to the stub and through each passthrough for the same fixed time with ``wrk``
(or ``bench.loadgen`` where wrk is missing), ``--runs`` times, and reports the medians
of requests/second, p50 and p99, and the latency each passthrough adds over the direct
call, then LiteLLM and Lamina side by side. The load generator, the stub and the
passthrough under test share the machine's cores (2 here); nothing is pinned. Writes
JSON to bench/results/gateway_overhead.json (gateway_overhead_stream.json with
``--stream``).

    .venv/bin/python -m bench.gateway_overhead --duration 10 --runs 3 --concurrency 1,10,50

``--lamina-url http://127.0.0.1:PORT`` measures an already running OpenAI-compatible
server in Lamina's place (``--lamina-token``, ``--lamina-model`` for what to send).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from bench.cpu import CpuSnapshot, CpuUsage
from bench.litellm_proxy import LITELLM_VERSION, start_litellm
from bench.load import (
    LoadGenerator,
    LoadGeneratorError,
    LoadResult,
    PythonLoad,
    WrkLoad,
)
from bench.processes import REPO, ProcessFailed
from bench.targets import (
    DEPLOYMENT,
    BenchFailed,
    Target,
    start_lamina,
    start_reference,
    start_stub,
)

RESULTS = REPO / "bench" / "results"

# Given for context: passthroughs measured on this kind of machine (2 cores) before.
REFERENCE_FIGURES = {
    "litellm_proxy": {"rps": "40-70", "added_p50_ms_c1": "17-23"},
    "fastapi_passthrough_httpx": {"rps": "350-620", "added_p50_ms_c1": "1.4"},
    "fastapi_passthrough_aiohttp": {"rps": "1400-2800", "added_p50_ms_c1": "0.5"},
}
LAMINA_TARGETS = {"added_p50_ms_c1": 1.5, "added_p99_ms_c1": 5.0, "rps_c50": 1000.0}
"""``rps_c50`` applies when LiteLLM is not measured; with it, the target is
``LITELLM_RPS_FACTOR`` times LiteLLM's requests/second at concurrency 50."""
LITELLM_RPS_FACTOR = 15.0


def median_result(results: Sequence[LoadResult]) -> LoadResult:
    """Each figure's median over repeated runs; errors add up, so any failed run shows."""
    if len(results) == 1:
        return results[0]

    def mid(values: Sequence[float]) -> float:
        return float(statistics.median(values))

    return LoadResult(
        requests=round(mid([r.requests for r in results])),
        duration_s=mid([r.duration_s for r in results]),
        rps=mid([r.rps for r in results]),
        p50_ms=mid([r.p50_ms for r in results]),
        p90_ms=mid([r.p90_ms for r in results]),
        p99_ms=mid([r.p99_ms for r in results]),
        mean_ms=mid([r.mean_ms for r in results]),
        max_ms=max(r.max_ms for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
    )


def _cpu_per_request(result: LoadResult, cpu: CpuUsage, process: str | None) -> float | None:
    if process is None or process not in cpu.processes_s or not result.requests:
        return None
    return cpu.processes_s[process] / result.requests * 1e6


@dataclass(frozen=True, slots=True)
class TargetRun:
    """One target measured at one concurrency, ``--runs`` times: the load figures (their
    medians in ``result``) and where the CPU went in each run."""

    runs: tuple[tuple[LoadResult, CpuUsage], ...]
    process: str | None  # the target's own process, when the benchmark started it

    @property
    def result(self) -> LoadResult:
        return median_result([result for result, _ in self.runs])

    @property
    def cpu_us_per_request(self) -> float | None:
        """CPU the target's own process spent per request (the stub's, for direct calls),
        median over the runs."""
        values = [_cpu_per_request(r, cpu, self.process) for r, cpu in self.runs]
        known = [v for v in values if v is not None]
        return float(statistics.median(known)) if known else None

    @property
    def outside_share(self) -> float | None:
        """Median share of the machine used outside the benchmark during the runs."""
        known = [s for _, cpu in self.runs if (s := cpu.outside_share) is not None]
        return float(statistics.median(known)) if known else None

    def as_json(self) -> dict[str, Any]:
        per_request = self.cpu_us_per_request
        return {
            **self.result.as_json(),
            "cpu_us_per_request": None if per_request is None else round(per_request, 1),
            "runs": [
                {
                    **result.as_json(),
                    "cpu_us_per_request": _rounded(_cpu_per_request(result, cpu, self.process)),
                    "cpu": cpu.as_json(),
                }
                for result, cpu in self.runs
            ],
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class Measurement:
    concurrency: int
    runs: dict[str, TargetRun] = field(default_factory=dict)

    def added(self, name: str) -> dict[str, float]:
        direct, through = self.runs["direct"].result, self.runs[name].result
        return {
            "p50_ms": round(through.p50_ms - direct.p50_ms, 3),
            "p99_ms": round(through.p99_ms - direct.p99_ms, 3),
            "rps_ratio": round(through.rps / direct.rps, 4) if direct.rps else 0.0,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "results": {name: run.as_json() for name, run in self.runs.items()},
            "added_over_direct": {name: self.added(name) for name in self.runs if name != "direct"},
        }


def measure(
    targets: Sequence[Target],
    generator: LoadGenerator,
    *,
    concurrencies: Sequence[int],
    duration_s: int,
    warmup_s: int,
    stream: bool,
    runs: int = 1,
) -> list[Measurement]:
    """Each concurrency in turn; within it, ``runs`` rounds over all targets (so that a
    noisy moment on the machine hits one round of every target, not all of one)."""
    pids = {t.child.name: t.child.process.pid for t in targets if t.child is not None}
    measurements: list[Measurement] = []
    for concurrency in concurrencies:
        measurement = Measurement(concurrency)
        figures: dict[str, list[tuple[LoadResult, CpuUsage]]] = {t.name: [] for t in targets}
        for round_ in range(1, runs + 1):
            for target in targets:
                target.ensure_running()
                if warmup_s > 0:
                    warmup = target.load(
                        concurrency=concurrency, duration_s=warmup_s, stream=stream
                    )
                    generator.run(warmup)
                spec = target.load(concurrency=concurrency, duration_s=duration_s, stream=stream)
                before, started = CpuSnapshot.take(pids), time.monotonic()
                result = generator.run(spec)
                cpu = CpuUsage.between(before, CpuSnapshot.take(pids), time.monotonic() - started)
                target.ensure_running()
                figures[target.name].append((result, cpu))
                process = target.child.name if target.child else None
                run = TargetRun(((result, cpu),), process)
                label = f"run {round_}/{runs}" if runs > 1 else ""
                print(
                    f"  c={concurrency:<3} {target.name:<10} {_progress(run)}  {label}",
                    flush=True,
                )
        for target in targets:
            process = target.child.name if target.child else None
            measurement.runs[target.name] = TargetRun(tuple(figures[target.name]), process)
        measurements.append(measurement)
    return measurements


def _progress(run: TargetRun) -> str:
    result = run.result
    line = f"{result.rps:>9,.0f} rps  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
    if result.failed:
        line += f"  ERRORS: {result.non_2xx} non-2xx, {result.socket_errors} socket"
    return line


def check_lamina_targets(measurements: Sequence[Measurement]) -> dict[str, dict[str, Any]]:
    """Lamina's figures against its targets: added latency at concurrency 1, and
    requests/second at 50 (``LITELLM_RPS_FACTOR`` times LiteLLM's when it was measured)."""
    by_concurrency = {m.concurrency: m for m in measurements if "lamina" in m.runs}
    checks: dict[str, dict[str, Any]] = {}
    if 1 in by_concurrency:
        added = by_concurrency[1].added("lamina")
        for key, figure in (
            ("added_p50_ms_c1", added["p50_ms"]),
            ("added_p99_ms_c1", added["p99_ms"]),
        ):
            target = LAMINA_TARGETS[key]
            checks[key] = {"measured": figure, "target_at_most": target, "met": figure <= target}
    if 50 in by_concurrency:
        runs = by_concurrency[50].runs
        rps = round(runs["lamina"].result.rps, 1)
        target = LAMINA_TARGETS["rps_c50"]
        check: dict[str, Any] = {"measured": rps, "target_at_least": target}
        if "litellm" in runs:
            litellm_rps = runs["litellm"].result.rps
            target = round(LITELLM_RPS_FACTOR * litellm_rps, 1)
            check |= {
                "target_at_least": target,
                "target_rule": f"{LITELLM_RPS_FACTOR:g} x litellm ({litellm_rps:.1f} rps)",
                "times_litellm": round(rps / litellm_rps, 1) if litellm_rps else None,
            }
        checks["rps_c50"] = check | {"met": rps >= target}
    return checks


# --- reporting ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def print_table(report: dict[str, Any], measurements: Sequence[Measurement]) -> None:
    machine = report["machine"]
    config = report["config"]
    print()
    print(
        f"Gateway overhead, POST /v1/chat/completions "
        f"({'streaming' if config['stream'] else 'non-streaming'}), "
        f"{config['duration_s']} s per measurement after {config['warmup_s']} s warm-up, "
        f"median of {config['runs']} run(s), "
        f"load by {config['load_generator']['kind']} {config['load_generator']['version']}"
    )
    print(
        f"machine: {machine['cores']} cores ({machine['cpu_model']}), Python {machine['python']}, "
        f"load average {machine['load_average_before']} -> {machine['load_average_after']}"
    )
    print(f"note: {machine['note']}")
    print()
    columns = (
        "conc",
        "target",
        "rps",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "rps/direct",
        "cpu us/req",
        "other cpu",
    )
    widths = (4, 10, 8, 7, 7, 7, 7, 10, 10, 9)

    def row(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    print(row(columns))
    print("-" * len(row(columns)))
    for measurement in measurements:
        for name, run in measurement.runs.items():
            result = run.result
            added = ("", "", "")
            if name != "direct":
                extra = measurement.added(name)
                added = (
                    f"{extra['p50_ms']:+.2f}",
                    f"{extra['p99_ms']:+.2f}",
                    f"{extra['rps_ratio']:.0%}",
                )
            figures = (f"{result.rps:,.0f}", f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}")
            per_request = run.cpu_us_per_request
            # A server the benchmark did not start counts as "outside": show nothing.
            outside = run.outside_share if run.process else None
            cpu = (
                "-" if per_request is None else f"{per_request:,.0f}",
                "-" if outside is None else f"{outside:.0%}",
            )
            line = row((str(measurement.concurrency), name, *figures, *added, *cpu))
            print(line + ("  (errors)" if result.failed else ""))
    print(
        "cpu us/req: CPU of the target's own process per request (the stub's for direct); "
        "other cpu: share of the machine used by processes outside the benchmark"
    )
    _print_side_by_side(measurements)
    checks = report["lamina_targets"]
    if checks:
        print()
        for key, check in checks.items():
            bound = "<=" if "target_at_most" in check else ">="
            limit = check.get("target_at_most", check.get("target_at_least"))
            verdict = "met" if check["met"] else "NOT met"
            rule = f", {check['target_rule']}" if "target_rule" in check else ""
            print(f"lamina target {key}: {check['measured']} ({bound} {limit}{rule}) {verdict}")
    print()
    print(f"written: {report['output']}")


def _print_side_by_side(measurements: Sequence[Measurement]) -> None:
    """LiteLLM and Lamina (and the bare reference, for scale) per concurrency."""
    names = [
        n for n in ("litellm", "lamina", "reference") if any(n in m.runs for m in measurements)
    ]
    if "litellm" not in names or "lamina" not in names:
        return
    print()
    print("side by side (medians): " + ", ".join(names))
    header = f"{'conc':>4}  {'figure':<8}" + "".join(f"  {n:>10}" for n in names)
    header += f"  {'lamina vs litellm':>18}"
    print(header)
    print("-" * len(header))
    for measurement in measurements:
        if "litellm" not in measurement.runs or "lamina" not in measurement.runs:
            continue
        rps = {n: measurement.runs[n].result.rps for n in names if n in measurement.runs}
        added = {n: measurement.added(n) for n in names if n in measurement.runs}
        lines = (
            (
                "rps",
                {n: f"{v:,.0f}" for n, v in rps.items()},
                _ratio(rps["lamina"], rps["litellm"]),
            ),
            (
                "+p50 ms",
                {n: f"{a['p50_ms']:+.2f}" for n, a in added.items()},
                _ratio(added["litellm"]["p50_ms"], added["lamina"]["p50_ms"], "lower"),
            ),
            (
                "+p99 ms",
                {n: f"{a['p99_ms']:+.2f}" for n, a in added.items()},
                _ratio(added["litellm"]["p99_ms"], added["lamina"]["p99_ms"], "lower"),
            ),
        )
        for figure, cells, ratio in lines:
            row = f"{measurement.concurrency:>4}  {figure:<8}"
            row += "".join(f"  {cells.get(n, '-'):>10}" for n in names)
            print(row + f"  {ratio:>18}")


def _ratio(numerator: float, denominator: float, word: str = "") -> str:
    if numerator <= 0 or denominator <= 0:
        return "-"
    return f"{numerator / denominator:,.1f}x{' ' + word if word else ''}"


# --- command line ------------------------------------------------------------------


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("each concurrency must be at least 1")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Overhead of Lamina's OpenAI passthrough against calling the upstream directly"
    )
    parser.add_argument("--duration", type=int, default=10, help="Seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="Seconds of warm-up per measurement")
    parser.add_argument("--concurrency", type=_concurrencies, default=[1, 10, 50])
    parser.add_argument(
        "--runs", type=int, default=3, help="Measurements per target and concurrency (medians)"
    )
    parser.add_argument("--stream", action="store_true", help="Measure streamed (SSE) completions")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure the bare aiohttp passthrough (bench.reference_proxy)",
    )
    parser.add_argument(
        "--litellm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure the LiteLLM proxy (installed on first use into "
        "~/.cache/lamina-bench/litellm-<version>)",
    )
    parser.add_argument(
        "--litellm-version", default=LITELLM_VERSION, help="The litellm[proxy] release to pin"
    )
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk when installed, else bench.loadgen",
    )
    parser.add_argument(
        "--lamina-url", help="Measure this running server instead of starting lamina serve"
    )
    parser.add_argument("--lamina-token", default="bench", help="Bearer token for --lamina-url")
    parser.add_argument("--lamina-model", default=DEPLOYMENT, help="Model sent to --lamina-url")
    parser.add_argument("--output", type=Path, help="Results file (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 and --warmup at least 0 (whole seconds)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _choose_generator(kind: str, workdir: Path) -> LoadGenerator:
    wrk = WrkLoad.find()
    if kind == "wrk" and wrk is None:
        raise BenchFailed("wrk is not installed (apt-get install -y wrk)")
    if kind != "python" and wrk is not None:
        return WrkLoad(wrk, workdir)
    return PythonLoad(workdir)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    # SystemExit unwinds the ExitStack, so every child is stopped as on Ctrl-C.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    load_before = _load_average()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    stream: bool = args.stream
    per_target_s = len(args.concurrency) * args.runs * (args.duration + args.warmup)
    # The stack closes first: children stop before their logs and data dir are removed.
    with tempfile.TemporaryDirectory(prefix="lamina-gateway-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        generator = _choose_generator(args.load_generator, workdir)
        print("starting the stub upstream and what is measured against it", flush=True)
        stub = start_stub(stack, workdir)
        targets = [stub]
        if args.reference:
            targets.append(start_reference(stack, workdir, stub))
        if args.litellm:
            targets.append(start_litellm(stack, workdir, stub, args.litellm_version))
        if args.lamina_url:
            base = args.lamina_url.rstrip("/").removesuffix("/v1") + "/v1"
            targets.append(
                Target(
                    "lamina",
                    f"--lamina-url {args.lamina_url}",
                    base,
                    args.lamina_model,
                    args.lamina_token,
                )
            )
        else:
            # The token must outlive the run: every target is measured at every concurrency.
            targets.append(
                start_lamina(
                    stack, workdir, stub, token_ttl_s=(len(targets) + 1) * per_target_s + 600
                )
            )
        for target in targets:
            target.verify(stream=stream)
        measurements = measure(
            targets,
            generator,
            concurrencies=args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            stream=stream,
            runs=args.runs,
        )
        load_generator = generator.describe()
    output: Path = args.output or RESULTS / (
        "gateway_overhead_stream.json" if stream else "gateway_overhead.json"
    )
    cores = os.cpu_count()
    report: dict[str, Any] = {
        "benchmark": "POST /v1/chat/completions, direct to a zero-latency stub and through "
        "passthroughs",
        "started_at": started_at,
        "output": str(output),
        "config": {
            "stream": stream,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "runs": args.runs,
            "concurrency": args.concurrency,
            "load_generator": load_generator,
        },
        "machine": {
            "cores": cores,
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
            "note": f"the load generator, the stub and the passthrough under test share the "
            f"{cores} cores (no pinning); Lamina and the reference proxy each run one process",
        },
        "targets": {
            t.name: {"description": t.description, "base_url": t.base_url} for t in targets
        },
        "measurements": [m.as_json() for m in measurements],
        "lamina_targets": check_lamina_targets(measurements),
        "reference_figures": REFERENCE_FIGURES,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, measurements)
    failed = [
        f"c={m.concurrency} {name}"
        for m in measurements
        for name, run in m.runs.items()
        if run.result.failed
    ]
    if failed:
        print(
            f"FAILED requests in: {', '.join(failed)}: those figures are not meaningful",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        code = run(args)
    except (BenchFailed, ProcessFailed, LoadGeneratorError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped, no results written", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
