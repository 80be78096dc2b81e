"""Fixtures for every layer's tests: one OpenAI-compatible simulator on loopback for the
session, reset before each test that asks for it; in-memory capture of spans and metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from inferencing.simulator import SimulatorServer
from tests.support import telemetry
from tests.support.telemetry import MetricsProbe

telemetry.install()

# Apps built in this process embed with the tiny offline hashing model: the local ONNX
# model costs half a second and hundreds of MB per app. Its own tests, and every
# `lamina` process the end-to-end tests start (their environment drops LAMINA_*), use it.
os.environ.setdefault("LAMINA_KNOWLEDGE__EMBEDDINGS", "hashing")


@pytest.fixture(autouse=True)
def _fresh_spans() -> Iterator[None]:
    yield from telemetry.clear_spans()


@pytest.fixture
def spans() -> telemetry.InMemorySpanExporter:
    """The spans finished during this test (the session's in-memory exporter, cleared)."""
    return telemetry.SPANS


@pytest.fixture
def metrics() -> MetricsProbe:
    """The metrics recorded during this test."""
    return MetricsProbe()


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> SimulatorServer:
    """The session's simulator, with an empty script and no recorded requests."""
    simulator_server.reset()
    return simulator_server
