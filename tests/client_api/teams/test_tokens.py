"""The bot's outbound token provider: real MSAL against a loopback Entra token endpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import SecretStr

from client_api.settings import TeamsSettings
from client_api.teams.tokens import (
    BotTokenError,
    BotTokenProvider,
    connection_manager,
    entra_authority,
    token_endpoint,
)
from tests.support.bot_framework import (
    APP_ID,
    APP_SECRET,
    BOT_TENANT,
    CONNECTOR_SCOPE,
    EntraTenant,
    teams_settings,
)

SERVICE_URL = "https://smba.trafficmanager.net/amer/"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def settings_for(tenant: EntraTenant, **overrides: Any) -> TeamsSettings:
    return TeamsSettings(**teams_settings(tenant=tenant, **overrides))


def provider_for(tenant: EntraTenant, clock: Clock, **overrides: Any) -> BotTokenProvider:
    return BotTokenProvider(
        settings_for(tenant, **overrides), ca_bundle=tenant.ca_file, clock=clock
    )


async def test_token_comes_from_the_endpoint_with_the_bots_credentials(
    tenant: EntraTenant,
) -> None:
    provider = provider_for(tenant, Clock())
    token = await provider.get_access_token(SERVICE_URL, ["https://api.botframework.com/.default"])
    assert token == tenant.issued[0]
    [request] = tenant.token_requests
    assert request.grant_type == "client_credentials"
    assert (request.client_id, request.client_secret) == (APP_ID, APP_SECRET)
    assert set((request.scope or "").split()) >= {CONNECTOR_SCOPE}


async def test_token_is_cached_until_shortly_before_it_expires(tenant: EntraTenant) -> None:
    clock = Clock()
    tenant.expires_in = 120  # below MSAL's own 5-minute cache floor: only ours caches it
    provider = provider_for(tenant, clock)
    first = await provider.get_access_token(SERVICE_URL, [])
    concurrent = await asyncio.gather(
        *(provider.get_access_token(SERVICE_URL, []) for _ in range(5))
    )
    clock.now += 59  # refreshed at half its life when it lives less than 10 minutes
    assert await provider.get_access_token(SERVICE_URL, []) == first
    assert set(concurrent) == {first}
    assert len(tenant.token_requests) == 1
    clock.now += 2
    second = await provider.get_access_token(SERVICE_URL, [])
    assert second != first
    assert tenant.issued == [first, second]


async def test_force_refresh_fetches_a_new_token(tenant: EntraTenant) -> None:
    provider = provider_for(tenant, Clock())
    first = await provider.get_access_token(SERVICE_URL, [])
    second = await provider.get_access_token(SERVICE_URL, [], force_refresh=True)
    assert second != first
    assert len(tenant.token_requests) == 2


async def test_configured_scope_wins_over_the_sdks(tenant: EntraTenant) -> None:
    scope = "https://api.botframework.us/.default"
    provider = provider_for(tenant, Clock(), scope=scope)
    # An Entra-issued inbound token makes the SDK ask for the caller's app scope.
    await provider.get_access_token(SERVICE_URL, ["11111111-2222-3333-4444-555555555555/.default"])
    assert scope in (tenant.token_requests[0].scope or "").split()


async def test_refused_credentials_raise_a_clear_error(tenant: EntraTenant) -> None:
    provider = provider_for(tenant, Clock(), app_secret=SecretStr("wrong"))
    with pytest.raises(BotTokenError, match="invalid_client") as caught:
        await provider.get_access_token(SERVICE_URL, [])
    assert "wrong" not in str(caught.value)


async def test_unreachable_endpoint_raises(tenant: EntraTenant) -> None:
    # Not trusting the endpoint's CA is as good as not reaching it.
    provider = BotTokenProvider(settings_for(tenant), clock=Clock())
    with pytest.raises(BotTokenError, match="could not be reached"):
        await provider.get_access_token(SERVICE_URL, [])


async def test_the_sdks_connection_manager_uses_the_provider(tenant: EntraTenant) -> None:
    from microsoft_agents.hosting.core.authorization import ClaimsIdentity

    manager = connection_manager(settings_for(tenant), ca_bundle=tenant.ca_file)
    identity = ClaimsIdentity({"aud": APP_ID, "iss": "https://api.botframework.com"})
    provider = manager.get_token_provider(identity, SERVICE_URL)
    assert isinstance(provider, BotTokenProvider)
    assert provider.configuration.CLIENT_ID == APP_ID
    assert await provider.get_access_token(SERVICE_URL, identity.get_token_scope())
    credential = provider.get_token_credential()
    assert (await credential.get_token(CONNECTOR_SCOPE)).token == tenant.issued[0]
    with pytest.raises(NotImplementedError, match="Agentic"):
        await provider.get_agentic_instance_token(BOT_TENANT, "instance")


def test_token_url_defaults_to_the_bots_tenant() -> None:
    assert token_endpoint(TeamsSettings(app_tenant_id="t1")) == (
        "https://login.microsoftonline.com/t1/oauth2/v2.0/token"
    )
    assert token_endpoint(TeamsSettings()) == (
        "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
    )
    assert entra_authority(token_endpoint(TeamsSettings())) == (
        "https://login.microsoftonline.com/botframework.com"
    )
