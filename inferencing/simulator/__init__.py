"""An OpenAI-compatible simulator server for tests, benchmarks and development.

It speaks the OpenAI chat completions (JSON and SSE), embeddings and models APIs,
and the Azure OpenAI deployment routes, and plays scripted replies and faults.
Run it with ``python -m inferencing.simulator --port 8900``, or in-process with
:class:`SimulatorServer`.

Scripted behaviour
------------------
Replies queued with ``SimulatorServer.script`` (or ``POST /_sim/script``) are played
in order, one per chat request: text, tool calls, or a :class:`Fault` (429 with
``Retry-After``, 503, any status, a hang, a stream cut). The queue always wins over
the random behaviour below. A reply with ``when_tool`` waits for a request that offers
a tool of that name; other requests pass it by.

Random faults (fault injection for gateways)
--------------------------------------------
A :class:`FaultProfile` describes how one deployment misbehaves: ``error_rate`` and
the weights of the fault ``kinds`` it plays, ``retry_after_s`` of its 429s,
``status_code``, ``stream_cut_rate`` (a streamed answer that did not fail stops after
a random number of chunks, without ``[DONE]``), ``first_token_latency`` (a
:class:`Latency`: ``fixed``, ``uniform`` or ``lognormal`` from ``p50_s``/``p99_s``),
``tokens_per_second`` and ``context_window`` (prompt plus ``max_tokens`` above it is
refused with HTTP 400 ``context_length_exceeded``, as OpenAI does).

``SimulatorConfig.profiles`` maps a deployment to its profile: the Azure path's
deployment, else the request body's ``model``. ``default_profile`` covers the others,
``seed`` makes the draws reproducible. Chat requests use the whole profile; embeddings
requests its faults and latency. Change any of it at run time with ``POST /_sim/config``
or ``SimulatorServer.configure`` (a :class:`ConfigUpdate`).

Other behaviour
---------------
- ``response_format`` ``json_schema``: unscripted replies are the smallest JSON
  document the schema accepts; ``json_object``: ``{}``.
- ``GET /_sim/stats``: per deployment, requests, completed, faults by kind, stream
  cuts and rejected requests (:class:`DeploymentStats`). ``POST /_sim/reset`` clears
  them with the script and the recorded requests, and restarts the seeded draws.
- ``record_requests=False`` keeps no request in memory (``GET /_sim/requests`` stays
  empty), for benchmarks of hundreds of thousands of requests.

Command line
------------
::

    python -m inferencing.simulator [--host H] [--port P] [--model NAME]
        [--default-reply TEXT] [--latency S] [--tokens-per-second N]
        [--embedding-dims N] [--script FILE.json]
        [--seed N] [--error-rate P] [--fault-kinds rate_limited=1,unavailable=2]
        [--retry-after S] [--stream-cut-rate P] [--latency-p50 S --latency-p99 S]
        [--context-window TOKENS] [--profiles FILE.json] [--no-record]

The fault flags (``--error-rate`` … ``--context-window``) build the default profile;
``--profiles`` reads a JSON object of deployment name to profile, e.g.
``{"gpt-4o": {"error_rate": 0.2, "kinds": {"rate_limited": 1}, "retry_after_s": 2}}``.
``--latency`` is the fixed time to first token of deployments whose profile sets none.
"""

from inferencing.simulator.app import create_app
from inferencing.simulator.config import (
    ConfigUpdate,
    DeploymentStats,
    Fault,
    FaultProfile,
    Latency,
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
    "DeploymentStats",
    "Fault",
    "FaultProfile",
    "Latency",
    "RecordedRequest",
    "ScriptUpdate",
    "ScriptedReply",
    "ScriptedToolCall",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "create_app",
]
