"""A closed-loop HTTP load generator, for machines without ``wrk``.

``--concurrency`` connections each send the same POST back to back for ``--duration``
seconds, reading every response whole; prints one JSON object with the request count,
requests/second and latency percentiles (the figures ``bench.load`` reads from wrk).
It runs as its own process so it never shares an event loop with what it measures.

    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8200/v1/chat/completions \
        --body-file body.json --header 'Authorization: Bearer x' --concurrency 10 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp

from bench.eventloop import run
from bench.load import FIGURES_MARK, percentile


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    deadline: float,
    latencies_us: list[float],
    errors: dict[str, int],
) -> None:
    while True:
        started = time.perf_counter()
        if started >= deadline:
            return
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = 200 <= response.status < 400
        except (aiohttp.ClientError, TimeoutError):
            errors["socket"] += 1
            continue
        finished = time.perf_counter()
        if not ok:
            errors["status"] += 1
        # As wrk does: every completed response counts, its status is reported apart.
        latencies_us.append((finished - started) * 1e6)


async def generate(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: float
) -> dict[str, float | int]:
    latencies_us: list[float] = []
    errors = {"status": 0, "socket": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s
        await asyncio.gather(
            *(
                _worker(session, url, body, headers, deadline, latencies_us, errors)
                for _ in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies_us)
    return {
        "requests": len(ordered),
        "duration_us": round(elapsed * 1e6),
        "p50_us": percentile(ordered, 50),
        "p90_us": percentile(ordered, 90),
        "p99_us": percentile(ordered, 99),
        "mean_us": sum(ordered) / len(ordered) if ordered else 0.0,
        "max_us": ordered[-1] if ordered else 0.0,
        "status": errors["status"],
        "socket": errors["socket"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Closed-loop POST load generator (JSON out)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds")
    args = parser.parse_args()
    headers = {"Content-Type": "application/json"}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    figures = run(
        generate(args.url, args.body_file.read_bytes(), headers, args.concurrency, args.duration)
    )
    print(FIGURES_MARK + json.dumps(figures))


if __name__ == "__main__":
    main()
