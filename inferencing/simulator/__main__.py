"""``python -m inferencing.simulator --port 8900``: serve the simulator in the foreground."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import uvicorn
from pydantic import TypeAdapter, ValidationError

from inferencing.simulator.app import create_app
from inferencing.simulator.config import (
    FaultProfile,
    Latency,
    RandomFaultKind,
    ScriptUpdate,
    SimulatorConfig,
)

_FAULT_KINDS: tuple[RandomFaultKind, ...] = get_args(RandomFaultKind)
_PROFILES = TypeAdapter(dict[str, FaultProfile])


def build_parser() -> argparse.ArgumentParser:
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m inferencing.simulator",
        description=(
            "OpenAI-compatible simulator (chat completions, embeddings, Azure routes) "
            "with scripted and random faults."
        ),
        epilog=(
            "The fault flags build the default profile, used by every deployment that "
            "--profiles does not name. Example: --seed 7 --error-rate 0.1 "
            "--fault-kinds rate_limited=3,unavailable=1 --latency-p50 0.4 --latency-p99 2"
        ),
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=8900)
    serving.add_argument("--log-level", default="info")

    replies = parser.add_argument_group("replies")
    replies.add_argument("--model", default=defaults.model, help="model named in answers")
    replies.add_argument("--default-reply", help="fixed text instead of echoing the question")
    replies.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds before the first token (fixed)",
    )
    replies.add_argument(
        "--tokens-per-second", type=float, metavar="N", help="pace of generated tokens"
    )
    replies.add_argument("--embedding-dims", type=int, default=defaults.embedding_dims)
    replies.add_argument(
        "--script",
        type=Path,
        metavar="FILE.json",
        help='JSON file: {"replies": [...], "embedding_faults": [...]} queued at start',
    )

    faults = parser.add_argument_group("random faults (default profile)")
    faults.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random draws, for reproducible runs"
    )
    faults.add_argument(
        "--error-rate", type=_probability, metavar="P", help="probability a request fails (0..1)"
    )
    faults.add_argument(
        "--fault-kinds",
        type=_fault_weights,
        metavar="KIND=WEIGHT,...",
        help=f"weights of the faults a failing request plays, of: {', '.join(_FAULT_KINDS)} "
        "(default: unavailable)",
    )
    faults.add_argument("--retry-after", type=float, metavar="SECONDS", help="Retry-After of a 429")
    faults.add_argument(
        "--stream-cut-rate",
        type=_probability,
        metavar="P",
        help="probability a streamed answer that did not fail is cut mid-way (0..1)",
    )
    faults.add_argument(
        "--latency-p50",
        type=float,
        metavar="SECONDS",
        help="median time to first token (lognormal; needs --latency-p99)",
    )
    faults.add_argument(
        "--latency-p99", type=float, metavar="SECONDS", help="99th percentile of the same"
    )
    faults.add_argument(
        "--context-window",
        type=int,
        metavar="TOKENS",
        help="refuse prompt + max_tokens above this with context_length_exceeded",
    )
    faults.add_argument(
        "--profiles",
        type=Path,
        metavar="FILE.json",
        help="JSON object: deployment (or model) name -> fault profile",
    )

    benchmarks = parser.add_argument_group("benchmarks")
    benchmarks.add_argument(
        "--no-record",
        dest="record_requests",
        action="store_false",
        help="keep no received requests in memory (counters stay at /_sim/stats)",
    )
    return parser


def build_config(argv: Sequence[str] | None = None) -> SimulatorConfig:
    """The configuration the command line asks for (exits with a usage error if invalid)."""
    parser = build_parser()
    return _config(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SimulatorConfig:
    try:
        script = (
            ScriptUpdate.model_validate(json.loads(args.script.read_text("utf-8")))
            if args.script
            else ScriptUpdate()
        )
        profiles = _PROFILES.validate_json(args.profiles.read_bytes()) if args.profiles else {}
        return SimulatorConfig(
            model=args.model,
            default_reply=args.default_reply,
            first_token_latency_s=args.latency,
            tokens_per_second=args.tokens_per_second,
            embedding_dims=args.embedding_dims,
            script=script.replies,
            embedding_faults=script.embedding_faults,
            profiles=profiles,
            default_profile=_default_profile(parser, args),
            seed=args.seed,
            record_requests=args.record_requests,
        )
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        parser.error(_describe(exc))


def _default_profile(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> FaultProfile | None:
    if (args.latency_p50 is None) != (args.latency_p99 is None):
        parser.error("--latency-p50 and --latency-p99 go together")
    fields: dict[str, object] = {
        "error_rate": args.error_rate,
        "kinds": args.fault_kinds,
        "retry_after_s": args.retry_after,
        "stream_cut_rate": args.stream_cut_rate,
        "context_window": args.context_window,
    }
    if args.latency_p50 is not None:
        fields["first_token_latency"] = Latency(
            kind="lognormal", p50_s=args.latency_p50, p99_s=args.latency_p99
        )
    given = {name: value for name, value in fields.items() if value is not None}
    return FaultProfile.model_validate(given) if given else None


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _fault_weights(text: str) -> dict[str, float]:
    """``rate_limited=1,unavailable=2`` (a bare kind weighs 1)."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, weight = item.partition("=")
        kind = kind.strip()
        if kind not in _FAULT_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown fault kind {kind!r}; choose from {', '.join(_FAULT_KINDS)}"
            )
        try:
            weights[kind] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{weight!r} is not a weight") from None
    if not weights:
        raise argparse.ArgumentTypeError("name at least one fault kind")
    return weights


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {error['msg']}"
            for error in exc.errors()
        )
    return str(exc)


if __name__ == "__main__":
    main()
