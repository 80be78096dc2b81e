"""``python -m tests.support.collectable_serve serve --port N``: the real ``lamina`` command
line, with one addition for memory tests: on ``SIGUSR1`` the process collects its garbage.

A memory test compares the server's resident set size before and after a load. Garbage
the collector has not reached yet, and freed memory the C allocator still holds, would
show up as growth that is no leak; so the test signals the process and reads RSS only
once the collection is done. Collection runs in the signal handler, that is on the main
thread (the event loop's) between two bytecodes, so no request is half-way through a
Python statement while it runs. Each finished collection appends a line to the file
named by ``LAMINA_TEST_GC_REPORT``: the test waits for that line.

Nothing else differs from ``lamina``: the same settings, app and uvicorn server.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import signal
import sys
from types import FrameType

REPORT_VARIABLE = "LAMINA_TEST_GC_REPORT"
"""The file a finished collection appends a line to (its number and the objects freed)."""


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc only; elsewhere a no-op)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def install_collector(report: str) -> None:
    collections = 0

    def collect(signum: int, frame: FrameType | None) -> None:
        nonlocal collections
        freed = gc.collect()
        _malloc_trim()
        collections += 1
        with open(report, "a", encoding="utf-8") as out:
            out.write(f"{collections} {freed}\n")

    signal.signal(signal.SIGUSR1, collect)


def main() -> None:
    install_collector(os.environ[REPORT_VARIABLE])
    from client_api.cli import app

    app(args=sys.argv[1:], prog_name="lamina")


if __name__ == "__main__":
    main()
