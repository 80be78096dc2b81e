"""How the bench's own servers and load generator run: on uvloop when installed.

uvicorn[standard] brings uvloop and Lamina's server runs on it, so the stub, the
reference proxy and the Python load generator use it too, to compare like with like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TypeVar

T = TypeVar("T")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[object, object, T]) -> T:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


def serve_until_interrupted(main: Coroutine[object, object, None]) -> None:
    """Run a server coroutine; Ctrl-C (which reaches the whole process group) ends it quietly."""
    with contextlib.suppress(KeyboardInterrupt):
        run(main)
