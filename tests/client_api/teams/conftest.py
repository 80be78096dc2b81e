"""A real Lamina app serving the Teams bot, its model the scripted simulator (so a turn
can be made to call a tool), a high-risk plugin installed through its entry point, and
the Bot Framework around it as fakes on loopback (tests/support/bot_framework.py); and
the channel and the bot's tenant alone, for the tests of the parts."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client_api.app import create_app
from client_api.settings import LaminaSettings
from inferencing.simulator import SimulatorServer
from tests.support.bot_framework import (
    BotConnector,
    BotFrameworkChannel,
    ConnectorCall,
    EntraTenant,
    ServedBot,
    running_bot_connector,
    running_channel,
    running_entra_tenant,
    teams_settings,
)
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing
from tools.contracts import RiskLevel
from tools.plugins import tool

CLOSED: list[str] = []
"""Every run of :func:`close_ticket`, in this process."""


@tool(risk=RiskLevel.HIGH, roles={"Lamina.User"})
def close_ticket(ticket: str) -> dict[str, str]:
    """Close a support ticket. This cannot be undone."""
    CLOSED.append(ticket)
    return {"closed": ticket}


def _install_plugin(root: Path) -> None:
    """A distribution whose ``lamina.tools`` entry point names :func:`close_ticket`."""
    dist = root / "ticket_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ticket-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[lamina.tools]\ntickets = {__name__}:close_ticket\n")


@dataclass
class TeamsApp(ServedBot[BotConnector]):
    simulator: SimulatorServer

    def numbered_calls_of(self, conversation: str) -> list[tuple[str, ConnectorCall]]:
        """The conversation's connector calls, each with the id the connector answered."""
        with self.connector._lock:
            return [
                (f"activity-{n}", c)
                for n, c in enumerate(self.connector.calls, start=1)
                if c.conversation_id == conversation
            ]

    def wait_for(
        self, conversation: str, found: Callable[[ConnectorCall], bool]
    ) -> tuple[str, ConnectorCall]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            hit = next(((i, c) for i, c in self.numbered_calls_of(conversation) if found(c)), None)
            if hit is not None:
                return hit
            time.sleep(0.05)
        raise AssertionError(
            f"nothing of the kind in {conversation}: {self.numbered_calls_of(conversation)}"
        )

    def conversation_messages(self, conversation_id: str) -> list[tuple[str, str, str]]:
        """(id, role, status) of a Lamina conversation's messages, oldest first."""
        with sqlite3.connect(self.data / "conversations.db") as db:
            return list(
                db.execute(
                    "SELECT id, role, status FROM messages WHERE conversation_id = ? ORDER BY seq",
                    (conversation_id,),
                )
            )

    def audit(self, event: str) -> list[tuple[str, str, str]]:
        """(tenant, user, data) of the audit records of ``event``."""
        with sqlite3.connect(self.data / "audit.db") as db:
            return list(
                db.execute(
                    "SELECT tenant_id, user_id, data FROM audit_log WHERE event = ?", (event,)
                )
            )


@pytest.fixture
def channel() -> Iterator[BotFrameworkChannel]:
    with running_channel() as running:
        yield running


@pytest.fixture
def tenant() -> Iterator[EntraTenant]:
    with running_entra_tenant() as running:
        yield running


@pytest.fixture(scope="module")
def teams_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamsApp]:
    data = tmp_path_factory.mktemp("data")
    plugin = tmp_path_factory.mktemp("plugin")
    _install_plugin(plugin)
    with (
        running_channel() as channel,
        running_entra_tenant() as tenant,
        running_bot_connector(BotConnector()) as connector,
        SimulatorServer() as simulator,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("REQUESTS_CA_BUNDLE", tenant.ca_file)
        env.syspath_prepend(str(plugin))  # the entry point is discovered at start-up
        settings = LaminaSettings(
            data_dir=data,
            log_level="WARNING",
            auth={"mode": "dev"},
            inferencing=simulated_inferencing(simulator),
            intelligence={"planner": "model"},
            tools={"approvals": {"approver_roles": ["ops.lead"]}},
            teams=teams_settings(channel, tenant, stream_interval_s=0.5),
        )
        app = create_app(settings)
        with app_in_thread(app) as base:
            yield TeamsApp(base, channel, tenant, connector, data, simulator)
