"""The Teams app manifest template renders to a manifest that names the bot, for every
placeholder it uses, and the Azure Bot template points Teams at the bot endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

INFRA = Path(__file__).resolve().parents[2] / "infra"
VALUES = {
    "BOT_APP_ID": "6f1c0a52-0000-4000-8000-00000000b07a",
    "ORGANISATION": "Contoso",
    "APP_DOMAIN": "lamina.contoso.example",
}


def test_the_manifest_template_renders_to_a_bot_manifest() -> None:
    text = (INFRA / "teams" / "manifest.template.json").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(VALUES)
    # As `envsubst '${BOT_APP_ID} ${ORGANISATION} ${APP_DOMAIN}'` does: those names only.
    manifest = json.loads(re.sub(r"\$\{(\w+)\}", lambda m: VALUES[m.group(1)], text))
    assert manifest["id"] == VALUES["BOT_APP_ID"]
    [bot] = manifest["bots"]
    assert bot["botId"] == VALUES["BOT_APP_ID"]
    assert set(bot["scopes"]) == {"personal", "team", "groupChat"}
    assert manifest["validDomains"] == [VALUES["APP_DOMAIN"]]
    assert manifest["manifestVersion"] in manifest["$schema"]
    assert len(manifest["name"]["short"]) <= 30
    assert len(manifest["description"]["short"]) <= 80


def test_the_bot_template_enables_the_teams_channel_on_the_messages_endpoint() -> None:
    bicep = (INFRA / "bot.bicep").read_text()
    assert "Microsoft.BotService/botServices@" in bicep
    assert "channelName: 'MsTeamsChannel'" in bicep
    for parameter in ("name", "endpoint", "appId", "appTenantId"):
        assert re.search(rf"^param {parameter} string", bicep, re.MULTILINE), parameter
    assert "/api/messages" in bicep
