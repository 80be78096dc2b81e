"""Open a store (or any resource with ``open`` and ``close``) for the length of a block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar


class Openable(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...


R = TypeVar("R", bound=Openable)


@asynccontextmanager
async def opened(resource: R) -> AsyncIterator[R]:
    """``resource`` opened; closed again when the block ends, however it ends."""
    await resource.open()
    try:
        yield resource
    finally:
        await resource.close()
