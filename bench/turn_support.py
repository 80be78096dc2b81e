"""What the turn benchmarks (``rag_turn``, ``streaming_ttft``, ``cold_start``) share.

``bench.simulated`` starts the simulator and ``lamina serve``; this module adds what
those benchmarks need beyond it: production-like settings (JWT auth against the loopback
OpenID provider of ``tests/support/identity.py``, every rate limit and token quota on),
the simulator's request count (model calls per turn), and the figures: percentiles of one
run, medians over runs, each with the machine's cores and load average beside it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from bench.knowledge_support import machine
from bench.load import percentile
from bench.processes import REPO
from bench.simulated import Served
from tests.support.identity import AUDIENCE, IdentityProvider

# Far above what a benchmark sends: every limit is checked and recorded, none refuses.
_GENEROUS = str(10**9)
LIMITS_ON: dict[str, str] = {
    f"LAMINA_LIMITS__{scope}_{measure}": _GENEROUS
    for scope in ("USER", "TENANT")
    for measure in (
        "REQUESTS_PER_MINUTE",
        "TOKENS_PER_MINUTE",
        "TOKENS_PER_DAY",
        "TOKENS_PER_MONTH",
    )
}
"""Every per-user and per-tenant limit of ``LAMINA_LIMITS__*`` set (in-process store)."""

LIMIT_HEADER = "X-RateLimit-Limit-Requests"
"""Sent on every admitted request while a request limit applies: proof the limits ran."""


def jwt_settings(identity: IdentityProvider) -> dict[str, str]:
    """``LAMINA_AUTH__*`` for bearer tokens signed by ``identity`` (RS256, JWKS fetched)."""
    return {
        "LAMINA_AUTH__MODE": "jwt",
        "LAMINA_AUTH__OPENID_CONFIG_URL": identity.config_url,
        "LAMINA_AUTH__AUDIENCE": AUDIENCE,
        "LAMINA_AUTH__ISSUER": identity.issuer,
    }


def default_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This environment without any ``LAMINA_``/``OTEL_`` variable: Lamina's defaults,
    except the data dir and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMINA_", "OTEL_"))}
    env |= {
        "LAMINA_DATA_DIR": str(data_dir),
        # Lamina runs from its data dir (so no developer's .env is read); find the repo.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return env | settings


def model_calls(simulator: Served) -> int:
    """Chat and embedding requests the simulator has received so far, all models."""
    stats = httpx.get(f"{simulator.url}/_sim/stats", timeout=10).json()
    return sum(int(model["requests"]) for model in stats.values())


def summarise(timings_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p99 (nearest rank), mean and count of one run's timings."""
    ordered = sorted(timings_ms)
    return {
        "p50_ms": round(percentile(ordered, 50), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "mean_ms": round(statistics.fmean(ordered), 2) if ordered else 0.0,
        "count": len(ordered),
    }


def with_machine(figures: Mapping[str, object]) -> dict[str, object]:
    """``figures`` with the cores and load average at the time they were taken."""
    snapshot = machine()
    return {**figures, "cores": snapshot["cores"], "load_average": snapshot["load_average"]}


def median_over_runs(runs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Per numeric key of the runs' figures, the median over runs; the machine as it was
    at each run (cores, and the load averages, one per run)."""
    numeric = [key for key, value in runs[0].items() if _is_number(value) and key != "cores"]
    medians: dict[str, object] = {
        key: round(statistics.median(_number(run[key]) for run in runs), 2) for key in numeric
    }
    medians["runs"] = len(runs)
    medians["cores"] = os.cpu_count()
    medians["load_average_per_run"] = [run.get("load_average") for run in runs]
    return medians


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def machine_line(figures: Mapping[str, object]) -> str:
    """How a printed row ends: the cores and the 1/5/15-minute load average."""
    load = figures.get("load_average") or figures.get("load_average_per_run")
    return f"[cores {figures.get('cores')}, load {load}]"
