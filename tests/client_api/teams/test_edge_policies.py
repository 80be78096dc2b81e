"""The edge's policies on the Teams path, and failures on the reply path, on a real app:
requests per minute, caps and the token budget refuse a Teams message with a reply the
user can read; each turn has its own correlation id; a Bot Connector or token endpoint
that fails is logged with it and the bot keeps serving; identity metadata that cannot
be fetched is a 503."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client_api.app import create_app
from client_api.settings import LaminaSettings
from tests.support.bot_framework import (
    APP_SECRET,
    TEAMS_TENANT,
    BotConnector,
    ServedBot,
    running_bot_connector,
    running_channel,
    running_entra_tenant,
    teams_settings,
)
from tests.support.processes import app_in_thread

FRUGAL = "frugal"
"""A tenant whose users have a daily token quota of nothing."""
MAX_PROMPT_TOKENS = 40
REQUESTS_PER_MINUTE = 2


@dataclass
class SwitchableConnector(BotConnector):
    """A Bot Connector that answers 502 to every call while ``down``."""

    down: bool = False

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        if self.down:
            return 502, {"error": {"code": "ServiceError", "message": "upstream failed"}}
        return super().handle(method, path, headers, body)


@dataclass
class Bot(ServedBot[SwitchableConnector]):
    def reply(self, conversation: str) -> str:
        """The text of the conversation's (first) message, once it has arrived."""
        calls = self.final_reply(conversation)
        return str(next(c for c in calls if c.body["type"] == "message").body["text"])

    def audited_correlation_ids(self) -> list[str]:
        with sqlite3.connect(self.data / "audit.db") as db:
            query = "SELECT correlation_id FROM audit_log WHERE event = 'chat.turn'"
            return [r[0] for r in db.execute(query)]


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    data = tmp_path_factory.mktemp("data")
    # Tokens that live no time: every turn asks the token endpoint again, so that a
    # credential the endpoint stops accepting fails the next reply.
    with (
        running_channel() as channel,
        running_entra_tenant(expires_in=0) as tenant,
        running_bot_connector(SwitchableConnector()) as connector,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("REQUESTS_CA_BUNDLE", tenant.ca_file)
        settings = LaminaSettings(
            data_dir=data,
            log_level="WARNING",
            auth={"mode": "dev", "allowed_tenants": [TEAMS_TENANT, FRUGAL]},
            caps={"max_prompt_tokens": MAX_PROMPT_TOKENS},
            limits={
                "user_requests_per_minute": REQUESTS_PER_MINUTE,
                "tenants": {FRUGAL: {"user_tokens_per_day": 0}},
            },
            teams=teams_settings(channel, tenant),
        )
        with app_in_thread(create_app(settings)) as base:
            yield Bot(base, channel, tenant, connector, data)


@pytest.fixture(autouse=True)
def _healthy(bot: Bot) -> Iterator[None]:
    yield
    bot.connector.down = False
    bot.tenant.client_secret = APP_SECRET


def _activity(
    bot: Bot, text: str, *, user: str | None = None, tenant: str = TEAMS_TENANT
) -> dict[str, Any]:
    user = user or f"user-{uuid.uuid4().hex[:8]}"  # a fresh requests-per-minute window
    return bot.activity(text, user=user, kind="groupChat", tenant=tenant)


def _ask(bot: Bot, activity: dict[str, Any]) -> str:
    assert bot.post(activity).status_code == 202
    return bot.reply(activity["conversation"]["id"])


def _turn_id(caplog: pytest.LogCaptureFixture, activity: dict[str, Any]) -> str:
    """The correlation id the bot gave the activity's turn (it logs it as the turn starts)."""
    pattern = re.compile(rf"^Teams turn ([0-9a-f]{{32}}): activity {activity['id']} ")
    for record in caplog.records:
        found = pattern.match(record.getMessage())
        if found:
            return found.group(1)
    raise AssertionError(f"no turn logged for activity {activity['id']}")


def _wait_for_log(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"nothing logged with {needle!r}: {caplog.text}")


def test_a_message_over_the_prompt_cap_is_refused_with_a_reply(bot: Bot) -> None:
    question = "Please tell me everything about the cafeteria opening hours. " * 12
    reply = _ask(bot, _activity(bot, question))
    match = re.fullmatch(
        r"That message is too long \(([\d,]+) tokens; the limit is (\d+)\)\. Please shorten it\.",
        reply,
    )
    assert match, reply
    assert int(match.group(1).replace(",", "")) > MAX_PROMPT_TOKENS
    assert int(match.group(2)) == MAX_PROMPT_TOKENS
    assert question.strip() not in bot.questions()  # refused before anything was stored


def test_a_user_over_the_requests_per_minute_limit_is_told_when_to_come_back(bot: Bot) -> None:
    replies = [_ask(bot, _activity(bot, "When does it open?", user="rita")) for _ in range(3)]
    assert not any("too many" in r for r in replies[:REQUESTS_PER_MINUTE])
    assert re.fullmatch(r"You've sent too many messages; try again in \d+ s\.", replies[-1])


def test_a_used_up_token_quota_is_explained(bot: Bot) -> None:
    reply = _ask(bot, _activity(bot, "When does it open?", tenant=FRUGAL))
    assert "daily token quota" in reply and "used up" in reply
    assert "resets at" in reply


def test_each_turn_has_its_own_correlation_id_down_to_the_audit_log(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client_api.teams.adapter")
    first, second = _activity(bot, "When does it open?"), _activity(bot, "Who runs it?")
    _ask(bot, first)
    _ask(bot, second)
    ids = _turn_id(caplog, first), _turn_id(caplog, second)
    assert ids[0] != ids[1]
    deadline = time.monotonic() + 10
    while not set(ids) <= set(bot.audited_correlation_ids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(ids) <= set(bot.audited_correlation_ids())


def test_a_failing_bot_connector_is_logged_with_the_turn_and_the_bot_keeps_serving(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client_api.teams.adapter")
    bot.connector.down = True
    activity = _activity(bot, "When does it open?")
    assert bot.post(activity).status_code == 202
    cid = _wait_for_log(caplog, "could not tell the user")
    turn = _turn_id(caplog, activity)
    assert any(turn in line and "502" in line for line in cid)
    bot.connector.down = False
    assert _ask(bot, _activity(bot, "When does it open?"))


def test_a_refused_bot_token_is_logged_with_the_turn_and_the_bot_keeps_serving(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client_api.teams.adapter")
    bot.tenant.client_secret = "rotated-away"
    activity = _activity(bot, "When does it open?")
    assert bot.post(activity).status_code == 202
    lines = _wait_for_log(caplog, "no token to reply with")
    turn = _turn_id(caplog, activity)
    assert any(turn in line and "refused its credentials" in line for line in lines)
    assert bot.calls_of(activity["conversation"]["id"]) == []
    bot.tenant.client_secret = APP_SECRET
    assert _ask(bot, _activity(bot, "When does it open?"))


def test_channel_metadata_that_cannot_be_fetched_is_a_503(tmp_path: Path, bot: Bot) -> None:
    settings = LaminaSettings(
        data_dir=tmp_path,
        log_level="WARNING",
        auth={"mode": "dev"},
        teams=teams_settings(
            bot.channel,
            bot.tenant,
            openid_config_url="http://127.0.0.1:9/v1/.well-known/openidconfiguration",
        ),
    )
    with app_in_thread(create_app(settings)) as base:
        another = ServedBot(base, bot.channel, bot.tenant, bot.connector, tmp_path)
        response = another.post(_activity(bot, "When does it open?"))
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["Retry-After"]
