"""A corpus with disjoint access rules, ingested by the real CLI, served by a real process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_api.app import create_app
from client_api.settings import load_settings
from inferencing.simulator import SimulatorServer
from tests.support.identity import AUDIENCE, IdentityProvider, running_identity_provider
from tests.support.processes import (
    app_in_thread,
    free_port,
    lamina_env,
    lamina_process,
    run_lamina,
)
from tests.support.simulator import simulated_inferencing

ALPHA_SECRET = "The Aurora launch passphrase is violet-harbor-42."
BETA_SECRET = "The Project Falcon budget is 4.2 million euros, approved by the board in March."
PUBLIC_FACT = "The cafeteria on floor three opens at 7:30 every weekday."

ACL = """
tenant: contoso
rules:
  - match: "alpha/**"
    groups: [alpha]
  - match: "beta/**"
    groups: [beta]
    users: [cfo]
  - match: "shared/**"
    public: true
"""


@dataclass
class Deployment:
    base_url: str
    idp: IdentityProvider
    ingest_output: str

    def headers(self, user: str, *groups: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.idp.token(user, groups=groups)}"}


def write_corpus(root: Path) -> None:
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    (root / "shared").mkdir()
    (root / "acl.yaml").write_text(ACL)
    (root / "alpha" / "aurora.md").write_text(
        f"# Aurora\n\n## Launch\n\n{ALPHA_SECRET} Keep it within the launch team.\n"
    )
    (root / "beta" / "falcon-budget.txt").write_text(
        f"Falcon budget memo\n\n{BETA_SECRET} Spending is tracked monthly by finance.\n"
    )
    (root / "shared" / "facilities.md").write_text(
        f"# Facilities\n\n## Cafeteria\n\n{PUBLIC_FACT}\n"
    )
    (root / "shared" / "broken.pdf").write_bytes(b"%PDF-1.7\n this is not really a pdf")


@contextmanager
def served_in_model_mode(
    simulator: SimulatorServer, tmp_path_factory: pytest.TempPathFactory, **settings: Any
) -> Iterator[str]:
    """The corpus ingested by the real CLI, then served in-process by uvicorn with dev
    sign-in and the simulator as the model (``settings`` added); yields the base URL."""
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus)
    data = tmp_path_factory.mktemp("data")
    ingest = run_lamina("ingest", str(corpus), env=lamina_env(LAMINA_DATA_DIR=str(data)))
    assert ingest.returncode == 0, ingest.stderr
    served = load_settings(
        data_dir=data,
        auth={"mode": "dev"},
        inferencing=simulated_inferencing(simulator),
        **settings,
    )
    with app_in_thread(create_app(served)) as url:
        yield url


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus)
    data = tmp_path_factory.mktemp("data")
    with running_identity_provider() as idp:
        env = lamina_env(
            LAMINA_DATA_DIR=str(data),
            LAMINA_AUTH__OPENID_CONFIG_URL=idp.config_url,
            LAMINA_AUTH__AUDIENCE=AUDIENCE,
        )
        ingest = run_lamina("ingest", str(corpus), env=env)
        assert ingest.returncode == 0, ingest.stderr + ingest.stdout
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{base}/readyz"):
            yield Deployment(base, idp, ingest.stdout)


@pytest.fixture
def client(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    """An OpenAI-compatible simulator on loopback, one per test module (its script and
    recorded calls are that module's)."""
    with SimulatorServer() as sim:
        yield sim
