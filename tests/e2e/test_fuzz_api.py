"""Property-based fuzzing of the whole HTTP API against its own published OpenAPI schema.

A real ``lamina serve`` process (Entra-style JWT sign-in against a loopback identity
provider, the OpenAI-compatible simulator as its model, the sample corpus ingested)
publishes ``/openapi.json``; schemathesis loads that live document and, for every
operation in it, sends generated requests, valid and deliberately invalid, with a
valid token. Every response must be:

- no 5xx: malformed input is the caller's problem, answered with a 4xx problem;
- a status the operation documents, with a documented media type
  (``application/problem+json`` for errors, ``text/event-stream`` / NDJSON for streams);
- a body that matches the documented schema (each event of an SSE stream included).

It runs twice: as an administrator who is also an auditor (so the admin and audit
routes run their handlers, not only the 403), and as a plain signed-in user (default
roles: the admin routes' refusals must be documented problems too).

Reproducible: a fixed schemathesis seed and derandomized Hypothesis, no example database.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from client_api.auth.permissions import ADMIN_ROLE, AUDITOR_ROLE
from tests.e2e.conftest import write_corpus
from tests.support.identity import AUDIENCE, IdentityProvider, running_identity_provider
from tests.support.processes import (
    REPO,
    free_port,
    lamina_env,
    lamina_process,
    run_lamina,
    wait_until_ready,
)

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 40
"""Generated cases per operation in the fuzzing phase (the coverage phase adds its own
boundary and negative cases): ~30 operations x 2 callers stays within a few minutes."""

SEED = 20_250_601

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

CONFIG = {
    "seed": SEED,
    "request-timeout": 60,
    "generation": {
        "mode": "all",  # positive and negative (schema-violating) data
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        # Credentials come from the test; generated ones would only be refused (401).
        "with-security-parameters": False,
    },
    "phases": {"stateful": {"enabled": False}},
}


@dataclass(frozen=True)
class FuzzTarget:
    base_url: str
    idp: IdentityProvider


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    corpus = tmp_path_factory.mktemp("fuzz-corpus")
    write_corpus(corpus)
    data = tmp_path_factory.mktemp("fuzz-data")
    sim_port = free_port()
    simulator = subprocess.Popen(
        [sys.executable, "-m", "inferencing.simulator", "--port", str(sim_port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{sim_port}/v1/models", process=simulator)
        with running_identity_provider() as idp:
            ingest = run_lamina("ingest", str(corpus), env=lamina_env(LAMINA_DATA_DIR=str(data)))
            assert ingest.returncode == 0, ingest.stderr + ingest.stdout
            env = lamina_env(
                LAMINA_DATA_DIR=str(data),
                LAMINA_AUTH__OPENID_CONFIG_URL=idp.config_url,
                LAMINA_AUTH__AUDIENCE=AUDIENCE,
                # Production sign-in, with the schema published for the fuzzer to read.
                LAMINA_API__PUBLISH_DOCS="true",
                LAMINA_INFERENCING__PROVIDER="openai",
                LAMINA_INFERENCING__BASE_URL=f"http://127.0.0.1:{sim_port}/v1",
                LAMINA_INFERENCING__API_KEY="sim-key",
                LAMINA_INFERENCING__MODEL="gpt-sim",
            )
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"):
                yield FuzzTarget(base, idp)
    finally:
        simulator.terminate()
        simulator.wait(timeout=15)


def _bearer(target: FuzzTarget, user: str, roles: tuple[str, ...]) -> dict[str, str]:
    token = target.idp.token(user, groups=("alpha",), roles=roles, expires_in=3600)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def administrator(target: FuzzTarget) -> dict[str, str]:
    """An administrator who is also an auditor: every route runs its handler."""
    return _bearer(target, "fuzz-admin", (ADMIN_ROLE, AUDITOR_ROLE))


@pytest.fixture
def plain_user(target: FuzzTarget) -> dict[str, str]:
    """No roles in the token: the default roles apply (chat, yes; usage, audit, no)."""
    return _bearer(target, "fuzz-user", ())


@pytest.fixture
def live_schema(target: FuzzTarget) -> schemathesis.BaseSchema:
    """The schema as the running server publishes it, not as the code would build it."""
    schema = schemathesis.openapi.from_url(
        f"{target.base_url}/openapi.json", config=schemathesis.Config.from_dict(CONFIG)
    )
    schema.config.update(base_url=target.base_url)
    return schema


@pytest.fixture(autouse=True)
def _node_id_for_subtests(request: pytest.FixtureRequest) -> None:
    """schemathesis's lazy schema renames the test per operation through ``_nodeid``,
    which pytest 9 no longer sets on a test item; give it one to rename."""
    node = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid


schema = schemathesis.pytest.from_fixture("live_schema")


_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # Generated bodies are large and some operations filter much (multipart uploads);
    # a slow real server on a shared CI runner is not a finding.
    suppress_health_check=list(HealthCheck),
)


@schema.parametrize()
@_SETTINGS
def test_every_operation_answers_an_administrator_as_documented(
    case: schemathesis.Case, administrator: dict[str, str]
) -> None:
    case.call_and_validate(headers=administrator, checks=CHECKS)


@schema.parametrize()
@_SETTINGS
def test_every_operation_answers_a_plain_user_as_documented(
    case: schemathesis.Case, plain_user: dict[str, str]
) -> None:
    case.call_and_validate(headers=plain_user, checks=CHECKS)


def test_the_fuzzer_reaches_every_route(target: FuzzTarget) -> None:
    """The fuzz test above covers what the schema lists; this pins that the schema lists
    the API's routes (only the web page, its assets and the MCP endpoint are left out)."""
    document = httpx.get(f"{target.base_url}/openapi.json", timeout=30).json()
    paths = set(document["paths"])
    assert {
        "/v1/chat",
        "/v1/chat/stream",
        "/v1/chat/completions",
        "/v1/approvals/{approval_id}/stream",
        "/chat/stream",
        "/v1/jobs/ingest",
        "/v1/audit",
        "/v1/usage",
        "/v1/me/data",
    } <= paths
    assert not any(p == "/" or p.startswith(("/static", "/mcp")) for p in paths)
    schemes = document["components"]["securitySchemes"]
    assert {s["name"] for s in schemes.values() if s["type"] == "apiKey"} == {
        "api-key",
        "X-API-Key",
        "X-Lamina-User",
    }
