"""Added latency of the edge policy stack on POST /v1/chat, and the answer cache's hits.

Two ``lamina serve`` processes answer the same sample corpus in extractive mode, both
keeping gateway state in one private Redis:

- **bare**: dev-mode identity headers, no limits, safety filters off, no answer cache;
- **full**: Entra-style JWT validated against a loopback OpenID provider, requests- and
  tokens-per-minute limits plus daily and monthly quotas in Redis, caps, the offline
  prompt shield on the question and on every retrieved passage, streaming PII
  redaction, and an answer-cache lookup (every question is new, so each is a miss
  that is then stored).

Requests alternate between the two servers, so drift in the machine's load hits both
alike; the added latency is the difference of their percentiles. Then the same
question is asked of the full server again and again: the cache-hit latency.

    .venv/bin/python -m bench.edge_overhead --requests 300

Writes bench/results/edge_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.support.identity import AUDIENCE, running_identity_provider
from tests.support.processes import free_port, lamina_env, lamina_process
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("How many days of annual leave do I get?", "adele", ("employees", "hr")),
    ("Who is on the Kestrel rotation?", "alex", ("employees", "engineering")),
    ("What is the budget of Project Falcon?", "lynne", ("employees", "finance")),
    ("How long does Atlas keep my data?", "guest", ()),
]
HIGH = str(10**9)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p99_ms": round(_percentile(values, 0.99), 2),
        "mean_ms": round(statistics.fmean(values), 2),
    }


def _nonce(rng: random.Random) -> str:
    # Random words make each question new to the cache (its lexical embedder puts
    # questions differing by a number alone above the similarity threshold).
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(4))


def main() -> None:
    parser = argparse.ArgumentParser(description="Added latency of the edge policy stack")
    parser.add_argument("--requests", type=int, default=300, help="per server")
    parser.add_argument("--hits", type=int, default=200, help="cache hits to time")
    args = parser.parse_args()
    rng = random.Random(7)

    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        redis.start()
        idp = stack.enter_context(running_identity_provider())
        cli = [sys.executable, "-m", "client_api.cli"]
        common = {
            "LAMINA_LOG_LEVEL": "WARNING",
            "LAMINA_REDIS__URL": redis.url,
            "LAMINA_INTELLIGENCE__PLANNER": "deterministic",
        }
        bare = {
            **common,
            "LAMINA_AUTH__MODE": "dev",
            "LAMINA_SAFETY__INJECTION_CHECK": "false",
            "LAMINA_SAFETY__INDIRECT_CHECK": "false",
            "LAMINA_SAFETY__PII_REDACTION": "false",
        }
        full = {
            **common,
            "LAMINA_AUTH__MODE": "jwt",
            "LAMINA_AUTH__OPENID_CONFIG_URL": idp.config_url,
            "LAMINA_AUTH__AUDIENCE": AUDIENCE,
            "LAMINA_ANSWER_CACHE__ENABLED": "true",
            **{
                f"LAMINA_LIMITS__{who}_{what}": HIGH
                for who in ("USER", "TENANT")
                for what in (
                    "REQUESTS_PER_MINUTE",
                    "TOKENS_PER_MINUTE",
                    "TOKENS_PER_DAY",
                    "TOKENS_PER_MONTH",
                )
            },
        }
        servers: dict[str, str] = {}
        for name, settings in (("bare", bare), ("full", full)):
            data = Path(tempfile.mkdtemp(prefix=f"lamina-edge-{name}-"))
            env = lamina_env(LAMINA_DATA_DIR=str(data), **settings)
            subprocess.run(
                [*cli, "ingest", str(REPO / "samples" / "corpus")],
                env=env,
                check=True,
                capture_output=True,
            )
            port = free_port()
            env["LAMINA_API__PORT"] = str(port)
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(lamina_process("serve", env=env, ready_url=f"{url}/readyz"))
            servers[name] = url

        tokens = {user: idp.token(user, groups=groups) for _, user, groups in QUESTIONS}

        def headers(server: str, user: str, groups: tuple[str, ...]) -> dict[str, str]:
            if server == "bare":
                return {"X-Lamina-User": user, "X-Lamina-Groups": ",".join(groups)}
            return {"Authorization": f"Bearer {tokens[user]}"}

        timings: dict[str, list[float]] = {"bare": [], "full": []}
        with httpx.Client(timeout=30) as client:

            def ask(server: str, n: int, question: str) -> httpx.Response:
                _, user, groups = QUESTIONS[n % len(QUESTIONS)]
                started = time.perf_counter()
                response = client.post(
                    f"{servers[server]}/v1/chat",
                    json={"message": question},
                    headers=headers(server, user, groups),
                )
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if n >= 0:
                    timings[server].append(elapsed)
                return response

            for n in range(20):  # warm-up: connections, first-use imports, token checks
                for server in servers:
                    ask(server, -1, f"{QUESTIONS[n % 4][0]} {_nonce(rng)}")
            for n in range(args.requests):
                question = f"{QUESTIONS[n % len(QUESTIONS)][0]} {_nonce(rng)}"
                for server in rng.sample(list(servers), 2):
                    ask(server, n, question)

            hits: list[float] = []
            repeated = f"{QUESTIONS[0][0]} {_nonce(rng)}"
            ask("full", 0, repeated)  # stored
            for _ in range(args.hits):
                started = time.perf_counter()
                response = client.post(
                    f"{servers['full']}/v1/chat",
                    json={"message": repeated},
                    headers=headers("full", QUESTIONS[0][1], QUESTIONS[0][2]),
                )
                hits.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                if not response.headers.get("X-Lamina-Cache", "").startswith("hit"):
                    raise SystemExit(f"expected a cache hit, got {response.headers}")

    bare_s, full_s = _summary(timings["bare"]), _summary(timings["full"])
    result = {
        "benchmark": "POST /v1/chat, extractive, sample corpus, sequential, alternating servers",
        "requests_per_server": args.requests,
        "bare": bare_s,
        "full_edge_stack": full_s,
        "added_p50_ms": round(full_s["p50_ms"] - bare_s["p50_ms"], 2),
        "added_p99_ms": round(full_s["p99_ms"] - bare_s["p99_ms"], 2),
        "cache_hit": _summary(hits),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_overhead.json").write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
