"""Fixtures for every layer's tests: one OpenAI-compatible simulator on loopback for the
session, reset before each test that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferencing.simulator import SimulatorServer


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> SimulatorServer:
    """The session's simulator, with an empty script and no recorded requests."""
    simulator_server.reset()
    return simulator_server
