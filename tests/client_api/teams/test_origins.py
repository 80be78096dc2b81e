"""Where an activity may come from: the Teams channel, a Bot Connector host the bot
replies to, and a tenant the bot serves (its own, without an allow-list)."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.client_api.teams.conftest import TeamsApp


def test_another_tenants_user_is_told_they_are_not_served(teams_app: TeamsApp) -> None:
    # No LAMINA_AUTH__ALLOWED_TENANTS: the bot serves its own tenant only.
    activity = teams_app.activity("When does the cafeteria open?", tenant="fabrikam")
    conversation = activity["conversation"]["id"]
    assert teams_app.post(activity).status_code == 202
    replies = teams_app.final_reply(conversation)
    assert [c.body.get("text") for c in replies] == [
        "Your organisation is not served by this assistant."
    ]
    assert "When does the cafeteria open?" not in teams_app.questions()


def test_a_service_url_off_the_allow_list_is_refused(teams_app: TeamsApp) -> None:
    # The connector itself, reached under a host name that is not on the list; the
    # channel's token names exactly this service URL.
    port = urlsplit(teams_app.connector.base_url).port
    activity = teams_app.activity("Hello?") | {"serviceUrl": f"http://localhost:{port}/"}
    response = teams_app.post(activity)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "service URL" in response.json()["detail"]
    assert teams_app.calls_of(activity["conversation"]["id"]) == []


def test_an_activity_from_another_channel_is_refused(teams_app: TeamsApp) -> None:
    activity = teams_app.activity("Hello?", channelId="webchat")
    response = teams_app.post(activity)
    assert response.status_code == 401
    assert "Teams only" in response.json()["detail"]
    assert teams_app.calls_of(activity["conversation"]["id"]) == []
