"""Name resolution and routing for tests of the guarded HTTP client.

:class:`FakeResolver` answers host names from a table, as DNS would (including the
hostile answers: private addresses, a public one mixed with a private one).
:class:`LoopbackConnector` opens every checked connection to 127.0.0.1 on the
same port, recording the address it was asked for: a "public" host in a test is
thus served by a loopback server, and no packet ever leaves the machine, even if
the code under test were wrong.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import httpcore

PUBLIC_IP = "93.184.216.34"
"""A global address; tests reach it only through :class:`LoopbackConnector`."""


@dataclass
class FakeResolver:
    """Resolves names from ``answers``; a list of answers per name is served in turn
    (the last one repeating), like a DNS server that changes its mind."""

    answers: Mapping[str, Sequence[str] | Sequence[Sequence[str]]]
    calls: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = self.answers[host]
        if answer and not isinstance(answer[0], str):
            rounds = [list(a) for a in answer]
            return rounds[min(self.calls.count(host), len(rounds)) - 1]
        return [str(a) for a in answer]


@dataclass
class LoopbackConnector(httpcore.AsyncNetworkBackend):
    """Connects to 127.0.0.1 whatever address it is given, and records that address."""

    connected: list[tuple[str, int]] = field(default_factory=list)
    _backend: httpcore.AnyIOBackend = field(default_factory=httpcore.AnyIOBackend)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        return await self._backend.connect_tcp(
            "127.0.0.1", port, timeout=timeout, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)
