"""Settings that point Lamina's model at the OpenAI-compatible simulator: for an app built
in the test's process, and for a ``lamina`` process."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inferencing.simulator import SimulatorServer
from tests.support.processes import lamina_env


def simulated_inferencing(simulator: SimulatorServer) -> dict[str, Any]:
    """Inferencing settings for one deployment served by ``simulator``, with one attempt
    per call, so that a scripted failure reaches the caller instead of being retried."""
    return {
        "provider": "openai",
        "base_url": simulator.openai_base_url,
        "api_key": "sim-key",
        "model": "gpt-sim",
        "retry": {"max_attempts": 1},
    }


def simulator_env(simulator: SimulatorServer, data: Path, **settings: str) -> dict[str, str]:
    """The environment of a ``lamina`` process in dev identity mode, its stores in ``data``
    and its model ``simulated_inferencing(simulator)``; ``settings`` add to it."""
    return lamina_env(
        LAMINA_DATA_DIR=str(data),
        LAMINA_AUTH__MODE="dev",
        **_variables("LAMINA_INFERENCING", simulated_inferencing(simulator)),
        **settings,
    )


def _variables(prefix: str, settings: Mapping[str, Any]) -> dict[str, str]:
    """Nested settings as the environment variables that set them (``__`` nests)."""
    found: dict[str, str] = {}
    for name, value in settings.items():
        variable = f"{prefix}__{name.upper()}"
        if isinstance(value, Mapping):
            found.update(_variables(variable, value))
        else:
            found[variable] = str(value)
    return found
