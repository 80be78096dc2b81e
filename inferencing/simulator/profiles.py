"""Random draws of fault profiles: whether a request fails, how, where a stream is cut,
and how long the model takes. Pure functions of a ``random.Random``, so a seed replays them."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

from inferencing.simulator.config import FaultProfile, Latency, RandomFaultKind

Z_99 = NormalDist().inv_cdf(0.99)
"""The standard normal's 99th percentile (≈ 2.326)."""


def lognormal_parameters(p50_s: float, p99_s: float) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal distribution with median ``p50_s`` and 99th
    percentile ``p99_s``: the median of ``exp(N(mu, sigma))`` is ``exp(mu)``, and its
    99th percentile is ``exp(mu + Z_99 * sigma)``."""
    if p50_s <= 0 or p99_s < p50_s:
        raise ValueError("lognormal latency needs 0 < p50_s <= p99_s")
    mu = math.log(p50_s)
    return mu, (math.log(p99_s) - mu) / Z_99


def sample_latency(latency: Latency, rng: random.Random) -> float:
    """Seconds drawn from ``latency`` (a fixed latency draws nothing)."""
    if latency.kind == "fixed":
        return latency.seconds
    if latency.kind == "uniform":
        return rng.uniform(latency.min_s, latency.max_s)
    assert latency.p50_s is not None and latency.p99_s is not None  # checked by Latency
    mu, sigma = lognormal_parameters(latency.p50_s, latency.p99_s)
    return rng.lognormvariate(mu, sigma)


def draw_fault(profile: FaultProfile, rng: random.Random) -> RandomFaultKind | None:
    """The fault a request plays, or None if it does not fail."""
    if not profile.error_rate or rng.random() >= profile.error_rate:
        return None
    kinds = list(profile.kinds)
    if len(kinds) == 1:
        return kinds[0]
    return rng.choices(kinds, weights=list(profile.kinds.values()))[0]


def draw_stream_cut(profile: FaultProfile, chunk_count: int, rng: random.Random) -> int | None:
    """How many of a stream's ``chunk_count`` data chunks are sent before the connection
    drops (at least one, never the last), or None if the stream is not cut."""
    if not profile.stream_cut_rate or chunk_count < 2:
        return None
    if rng.random() >= profile.stream_cut_rate:
        return None
    return rng.randint(1, chunk_count - 1)
