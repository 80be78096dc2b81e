"""``python -m inferencing.simulator --port 8900``: serve the simulator in the foreground."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn

from inferencing.simulator.app import create_app
from inferencing.simulator.config import ScriptUpdate, SimulatorConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m inferencing.simulator",
        description="OpenAI-compatible simulator (chat completions, embeddings, Azure routes).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--model", default=SimulatorConfig().model)
    parser.add_argument("--default-reply", help="fixed text instead of echoing the question")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before first token")
    parser.add_argument("--tokens-per-second", type=float, help="pace of streamed tokens")
    parser.add_argument("--embedding-dims", type=int, default=SimulatorConfig().embedding_dims)
    parser.add_argument(
        "--script",
        type=Path,
        help='JSON file: {"replies": [...], "embedding_faults": [...]} queued at start',
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    script = (
        ScriptUpdate.model_validate(json.loads(args.script.read_text("utf-8")))
        if args.script
        else ScriptUpdate()
    )
    config = SimulatorConfig(
        model=args.model,
        default_reply=args.default_reply,
        first_token_latency_s=args.latency,
        tokens_per_second=args.tokens_per_second,
        embedding_dims=args.embedding_dims,
        script=script.replies,
        embedding_faults=script.embedding_faults,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
