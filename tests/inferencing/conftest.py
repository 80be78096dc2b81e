"""Fixtures of the inferencing tests: one simulator on loopback for the session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from inferencing.simulator import SimulatorServer


@dataclass(frozen=True)
class Caller:
    """Satisfies ``InferenceCaller``."""

    tenant_id: str = "contoso"
    user_id: str = "adele"


@pytest.fixture
def caller() -> Caller:
    return Caller()


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> SimulatorServer:
    """The session's simulator, with an empty script and no recorded requests."""
    simulator_server.reset()
    return simulator_server
