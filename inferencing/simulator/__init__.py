"""An OpenAI-compatible simulator server for tests, benchmarks and development.

It speaks the OpenAI chat completions (JSON and SSE), embeddings and models APIs,
and the Azure OpenAI deployment routes, and plays scripted replies and faults.
Run it with ``python -m inferencing.simulator --port 8900``, or in-process with
:class:`SimulatorServer`.
"""

from inferencing.simulator.app import create_app
from inferencing.simulator.config import (
    ConfigUpdate,
    Fault,
    RecordedRequest,
    ScriptedReply,
    ScriptedToolCall,
    ScriptUpdate,
    SimulatorConfig,
)
from inferencing.simulator.server import SimulatorServer
from inferencing.simulator.state import SimulatorState

__all__ = [
    "ConfigUpdate",
    "Fault",
    "RecordedRequest",
    "ScriptUpdate",
    "ScriptedReply",
    "ScriptedToolCall",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "create_app",
]
