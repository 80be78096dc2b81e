"""The Teams conversation map names users and their conversations: it is exported and
erased with the rest of a person's data, and the composition root lists it."""

from __future__ import annotations

from pathlib import Path

from client_api.composition import build_services
from client_api.settings import LaminaSettings
from client_api.teams.conversations import ConversationLink, PostedReply, TeamsConversationMap
from intelligence.contracts import Principal
from tests.support.lifecycle import opened

ANA = Principal("contoso", "ana")
BEN = Principal("contoso", "ben")


async def test_a_users_links_and_replies_are_exported_and_erased_alone(tmp_path: Path) -> None:
    async with opened(TeamsConversationMap(tmp_path / "teams.db")) as teams:
        for user, conversation in (("ana", "c-ana"), ("ben", "c-ben")):
            await teams.link("contoso", "19:chat", user, ConversationLink(conversation, "a1"))
            await teams.remember_reply(
                "contoso", "19:chat", [f"m-{user}"], PostedReply(conversation, f"r-{user}")
            )

        assert await teams.export_user(ANA) == [
            {"teams_conversation_id": "19:chat", "conversation_id": "c-ana"}
        ]
        assert await teams.erase_user(ANA) == 2  # one link, one reply
        assert await teams.export_user(ANA) == []
        assert await teams.find("contoso", "19:chat", "ana") is None
        assert await teams.reply_of("contoso", "19:chat", "m-ana") is None
        # Ben's are untouched.
        assert await teams.find("contoso", "19:chat", "ben") is not None
        assert await teams.reply_of("contoso", "19:chat", "m-ben") == PostedReply("c-ben", "r-ben")


async def test_with_teams_on_the_map_is_one_of_the_personal_data_holders(tmp_path: Path) -> None:
    settings = LaminaSettings(data_dir=tmp_path, log_level="WARNING", teams={"enabled": True})
    services = await build_services(settings)
    try:
        assert "teams" in services.personal_data.holders
        assert services.teams_conversations is not None
    finally:
        await services.aclose()
    off = await build_services(LaminaSettings(data_dir=tmp_path / "off", log_level="WARNING"))
    try:
        assert "teams" not in off.personal_data.holders
    finally:
        await off.aclose()
