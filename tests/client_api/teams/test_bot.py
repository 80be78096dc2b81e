"""POST /api/messages on a real Lamina app: a Teams-shaped activity signed like the Bot
Framework channel's, a real group resolver against a fake Graph, the extractive answerer
over a corpus of two groups' documents, and replies recorded by a fake Bot Connector
that holds a token from the bot's (fake) Entra tenant."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client_api.app import create_app
from client_api.composition import build_knowledge
from client_api.settings import LaminaSettings
from tests.support.bot_framework import (
    APP_ID,
    TEAMS_TENANT,
    BotConnector,
    ServedBot,
    citations,
    running_bot_connector,
    running_channel,
    running_entra_tenant,
    stream_info,
    teams_settings,
)
from tests.support.graph import FakeGraph, StaticGraphToken, running_graph
from tests.support.processes import app_in_thread

ALPHA_FACT = "The Aurora launch passphrase is violet-harbor-42."
BETA_FACT = "The Project Falcon budget is 4.2 million euros, approved by the board in March."
PUBLIC_FACT = "The cafeteria on floor three opens at 7:30 every weekday."
ACL = f"""
tenant: {TEAMS_TENANT}
rules:
  - match: "alpha/**"
    groups: [alpha]
  - match: "beta/**"
    groups: [beta]
  - match: "shared/**"
    public: true
"""


@dataclass
class GatedConnector(BotConnector):
    """A Bot Connector that holds every call until ``gate`` is set: a reply that
    arrives only after the test opened it was posted after the channel got its answer."""

    gate: threading.Event = field(default_factory=threading.Event)

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        self.gate.wait(timeout=30)
        return super().handle(method, path, headers, body)


@dataclass
class Bot(ServedBot[GatedConnector]):
    graph: FakeGraph


def _ingest(data: Path, root: Path) -> None:
    for folder, name, text in [
        ("alpha", "aurora.md", f"# Aurora\n\n## Launch\n\n{ALPHA_FACT}\n"),
        ("beta", "falcon.md", f"# Falcon budget\n\n## Budget\n\n{BETA_FACT}\n"),
        ("shared", "facilities.md", f"# Facilities\n\n## Cafeteria\n\n{PUBLIC_FACT}\n"),
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(text)
    (root / "acl.yaml").write_text(ACL)

    async def ingest() -> None:
        index, ingestor, _ = build_knowledge(LaminaSettings(data_dir=data))
        await index.open()
        try:
            report = await ingestor.ingest(root)
            assert report.files_indexed == 3
        finally:
            await index.close()

    asyncio.run(ingest())


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    data = tmp_path_factory.mktemp("data")
    _ingest(data, tmp_path_factory.mktemp("corpus"))
    with (
        running_channel() as channel,
        running_entra_tenant() as tenant,
        running_bot_connector(GatedConnector()) as connector,
        running_graph(ana=["alpha"], ben=["beta"]) as graph,
        pytest.MonkeyPatch.context() as env,
    ):
        # MSAL (through requests) trusts the fake tenant's own CA.
        env.setenv("REQUESTS_CA_BUNDLE", tenant.ca_file)
        settings = LaminaSettings(
            data_dir=data,
            log_level="WARNING",
            auth={
                "mode": "jwt",
                "openid_config_url": "http://127.0.0.1:9/unused",
                "audience": "api://lamina",
                "graph_base_url": graph.base_url,
            },
            teams=teams_settings(channel, tenant, stream_interval_s=0.5),
        )
        app = create_app(settings, graph_token=StaticGraphToken())
        with app_in_thread(app) as base:
            yield Bot(base, channel, tenant, connector, data, graph)


@pytest.fixture(autouse=True)
def _open_connector(bot: Bot) -> None:
    bot.connector.gate.set()


def test_the_channel_gets_its_answer_before_the_reply_is_posted(bot: Bot) -> None:
    bot.connector.gate.clear()
    activity = bot.activity("When does the cafeteria open?")
    started = time.perf_counter()
    response = bot.post(activity)
    ack_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 202
    # The connector holds every call until the gate opens: nothing could be posted yet,
    # so the channel's request was answered without waiting for the turn.
    assert bot.calls_of(activity["conversation"]["id"]) == []
    bot.connector.gate.set()
    calls = bot.final_reply(activity["conversation"]["id"])
    print(f"\nTeams ack latency: {ack_ms:.1f} ms")
    assert "7:30" in calls[-1].body["text"]


def test_a_personal_chat_streams_with_citations_and_the_bots_token(bot: Bot) -> None:
    activity = bot.activity("When does the cafeteria open?")
    assert bot.post(activity).status_code == 202
    calls = bot.final_reply(activity["conversation"]["id"])

    issued = {f"Bearer {token}" for token in bot.tenant.issued}
    assert issued and all(c.authorization in issued for c in calls)
    assert all(c.activity_id == activity["id"] for c in calls)  # threaded under the question

    first, final = calls[0], calls[-1]
    assert first.body["type"] == "typing"
    assert stream_info(first) == {
        "type": "streaminfo",
        "streamType": "informative",
        "streamSequence": 1,
    }
    updates = calls[1:-1]
    assert all(c.body["type"] == "typing" for c in updates)
    sequences = [stream_info(c)["streamSequence"] for c in calls[:-1]]  # type: ignore[index]
    assert sequences == list(range(1, len(calls)))
    stream_ids = {(stream_info(c) or {}).get("streamId") for c in calls[1:]}
    assert len(stream_ids) == 1 and None not in stream_ids
    info = stream_info(final)
    assert final.body["type"] == "message"
    assert info is not None and info["streamType"] == "final" and "streamSequence" not in info
    assert "7:30" in final.body["text"]
    claims = citations(final)
    assert 1 <= len(claims) <= 20
    for claim in claims:
        assert claim["@type"] == "Claim"
        assert f"[{claim['position']}]" in final.body["text"]
        appearance = claim["appearance"]
        assert len(appearance["name"]) <= 80 and len(appearance["abstract"]) <= 160


def test_a_group_chat_gets_one_message_without_the_mentions(bot: Bot) -> None:
    activity = bot.activity(
        "<at>Lamina</at> when does the <at>Ben</at> cafeteria open?",
        kind="groupChat",
        conversation="19:group-chat@thread.v2",
        entities=[
            {
                "type": "mention",
                "text": "<at>Lamina</at>",
                "mentioned": {"id": f"28:{APP_ID}", "name": "Lamina"},
            },
            {
                "type": "mention",
                "text": "<at>Ben</at>",
                "mentioned": {"id": "29:ben", "name": "Ben"},
            },
        ],
    )
    assert bot.post(activity).status_code == 202
    calls = bot.final_reply(activity["conversation"]["id"])
    assert [c.body["type"] for c in calls] == ["message"]
    assert stream_info(calls[0]) is None
    assert "7:30" in calls[0].body["text"]
    assert citations(calls[0])
    assert "when does the cafeteria open?" in bot.questions()
    assert not any("<at>" in q for q in bot.questions())


def test_a_user_sees_only_what_their_groups_may_read(bot: Bot) -> None:
    ana = bot.activity("What is the Project Falcon budget?", user="ana")
    ben = bot.activity("What is the Project Falcon budget?", user="ben")
    assert bot.post(ana).status_code == 202
    assert bot.post(ben).status_code == 202
    ana_calls = bot.final_reply(ana["conversation"]["id"])
    ben_calls = bot.final_reply(ben["conversation"]["id"])
    assert "4.2 million" not in json.dumps([c.body for c in ana_calls])
    assert "4.2 million" in ben_calls[-1].body["text"]


def test_an_activity_delivered_twice_is_answered_once(bot: Bot) -> None:
    activity = bot.activity("What is the Aurora launch passphrase?", kind="groupChat")
    conversation = activity["conversation"]["id"]
    assert bot.post(activity).status_code == 202
    first = bot.final_reply(conversation)
    assert "violet-harbor-42" in first[-1].body["text"]
    assert bot.post(activity).status_code == 202  # the channel retried
    # A later activity in the same conversation is answered, and only it adds a reply.
    follow_up = {**activity, "id": f"{activity['id']}9", "text": "When does the cafeteria open?"}
    assert bot.post(follow_up).status_code == 202
    deadline = time.monotonic() + 30
    while len(bot.calls_of(conversation)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = bot.calls_of(conversation)
    assert [c.activity_id for c in calls] == [activity["id"], follow_up["id"]]
    assert bot.questions().count("What is the Aurora launch passphrase?") == 1


def test_a_request_without_the_channels_token_is_refused(bot: Bot) -> None:
    activity = bot.activity("When does the cafeteria open?")
    response = bot.post_as(activity, None)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")


def test_a_message_without_an_id_is_refused(bot: Bot) -> None:
    activity = bot.activity("When does the cafeteria open?")
    del activity["id"]
    response = bot.post(activity)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


def test_a_chat_whose_lamina_conversation_was_deleted_starts_a_new_one(bot: Bot) -> None:
    import sqlite3

    first = bot.activity("When does the cafeteria open?", kind="groupChat")
    conversation = first["conversation"]["id"]
    assert bot.post(first).status_code == 202
    bot.final_reply(conversation)
    # The user deletes the conversation (or retention purges it).
    with sqlite3.connect(bot.data / "conversations.db") as db:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("DELETE FROM conversations")
    follow_up = {**first, "id": f"{first['id']}7", "text": "What is the Aurora passphrase?"}
    assert bot.post(follow_up).status_code == 202
    deadline = time.monotonic() + 30
    while len(bot.calls_of(conversation)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = bot.calls_of(conversation)[-1].body["text"]
    assert "No such conversation" not in answer and "violet-harbor-42" in answer
