"""The Bot Framework token validator against real OpenID/JWKS servers on loopback.

Tokens are signed with test RSA keys (or forged by hand) and checked by the real
validator, which fetches the channel's (and the bot tenant's) metadata and keys over HTTP.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from client_api.settings import AuthSettings, TeamsSettings
from client_api.teams.auth import (
    BotFrameworkTokenValidator,
    TeamsAuthError,
    check_teams_settings,
    claims_identity,
    service_url_allowed,
)
from tests.support.bot_framework import (
    APP_ID,
    BOT_TENANT,
    CHANNEL_APP_ID,
    BotFrameworkChannel,
    EntraTenant,
    teams_settings,
)
from tests.support.identity import SigningKey, forge

SERVICE_URL = "https://smba.trafficmanager.net/amer/"
TEAMS = "msteams"


@pytest.fixture
async def http(tenant: EntraTenant) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=tenant.ca_file)
    ) as client:
        yield client


def settings_for(channel: BotFrameworkChannel, **overrides: Any) -> TeamsSettings:
    return TeamsSettings(**teams_settings(channel, **overrides))


@pytest.fixture
def validator(channel: BotFrameworkChannel, http: httpx.AsyncClient) -> BotFrameworkTokenValidator:
    return BotFrameworkTokenValidator(settings_for(channel), http)


async def refused(
    validator: BotFrameworkTokenValidator,
    authorization: str | None,
    service_url: str | None = SERVICE_URL,
    channel_id: str | None = TEAMS,
) -> TeamsAuthError:
    with pytest.raises(TeamsAuthError) as caught:
        await validator.validate(authorization, service_url, channel_id)
    return caught.value


# --- accepted ------------------------------------------------------------------------------


async def test_channel_token_gives_its_claims(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    claims = await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL, TEAMS)
    assert claims["aud"] == APP_ID
    assert claims["iss"] == "https://api.botframework.com"
    identity = claims_identity(claims)
    assert identity.get_app_id() == APP_ID
    assert identity.get_claim_value("serviceurl") == SERVICE_URL
    assert not identity.allow_anonymous


async def test_service_url_compares_without_case_or_trailing_slash(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    token = channel.authorization("https://SMBA.trafficmanager.net/amer")
    assert await validator.validate(token, SERVICE_URL, TEAMS)


async def test_skew_within_the_leeway_is_accepted(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    # Default leeway: 300 s either side.
    late = channel.authorization(SERVICE_URL, expires_in=-200)
    early = channel.authorization(SERVICE_URL, not_before_in=200)
    assert await validator.validate(late, SERVICE_URL, TEAMS)
    assert await validator.validate(early, SERVICE_URL, TEAMS)


async def test_entra_issued_tokens_of_the_bots_tenant_are_accepted(
    channel: BotFrameworkChannel, tenant: EntraTenant, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_tenant_id=BOT_TENANT, token_url=tenant.token_url), http
    )
    for version in (1, 2):
        claims = await validator.validate(
            f"Bearer {tenant.token(version=version)}", SERVICE_URL, TEAMS
        )
        assert claims["tid"] == BOT_TENANT
    # The channel's tokens stay accepted next to them.
    assert await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL, TEAMS)
    # An Entra token that names a service URL must name this one.
    wrong = tenant.token("https://evil.example/")
    assert "service URL" in str(await refused(validator, f"Bearer {wrong}"))


@pytest.mark.parametrize("version", [1, 2])
async def test_entra_issued_tokens_of_another_application_are_refused(
    channel: BotFrameworkChannel, tenant: EntraTenant, http: httpx.AsyncClient, version: int
) -> None:
    # Any application of the tenant can get a token for the bot's App ID; only the
    # channel's callers (LAMINA_TEAMS__CHANNEL_APP_IDS) may post activities with one.
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_tenant_id=BOT_TENANT, token_url=tenant.token_url), http
    )
    token = tenant.token(SERVICE_URL, version=version, caller="another-app-of-the-tenant")
    error = await refused(validator, f"Bearer {token}")
    assert str(error) == "The token is not valid."
    assert "another-app-of-the-tenant" in error.reason
    # Without any listed caller, no Entra-issued token is accepted.
    closed = BotFrameworkTokenValidator(
        settings_for(
            channel, app_tenant_id=BOT_TENANT, token_url=tenant.token_url, channel_app_ids=[]
        ),
        http,
    )
    listed = tenant.token(SERVICE_URL, version=version, caller=CHANNEL_APP_ID)
    assert await validator.validate(f"Bearer {listed}", SERVICE_URL, TEAMS)
    await refused(closed, f"Bearer {listed}")


async def test_entra_issued_tokens_are_refused_for_a_multi_tenant_bot(
    tenant: EntraTenant, validator: BotFrameworkTokenValidator
) -> None:
    error = await refused(validator, f"Bearer {tenant.token()}")
    assert "issuer" in error.reason


# --- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "   "])
async def test_missing_header_is_refused(
    validator: BotFrameworkTokenValidator, authorization: str | None
) -> None:
    assert "no bearer token" in str(await refused(validator, authorization))


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "token", "Bearer not-a-jwt"]
)
async def test_malformed_header_is_refused(
    validator: BotFrameworkTokenValidator, authorization: str
) -> None:
    await refused(validator, authorization)


async def test_wrong_audience_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    error = await refused(validator, channel.authorization(SERVICE_URL, app_id="another-bot"))
    assert str(error) == "The token is not valid."
    assert "audience" in error.reason.lower()


async def test_wrong_issuer_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    token = channel.authorization(SERVICE_URL, issuer="https://api.botframework.evil")
    assert "issuer" in (await refused(validator, token)).reason


async def test_other_tenants_entra_issuer_is_refused(
    channel: BotFrameworkChannel, tenant: EntraTenant, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_tenant_id="another-tenant", token_url=tenant.token_url), http
    )
    assert "issuer" in (await refused(validator, f"Bearer {tenant.token()}")).reason


async def test_wrong_key_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    # Signed by a key that claims the channel's key id but is not the published one.
    impostor = SigningKey(kid=channel.keys[0].kid)
    error = await refused(validator, f"Bearer {channel.token(SERVICE_URL, key=impostor)}")
    assert "signature" in error.reason.lower()


async def test_expired_token_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    error = await refused(validator, channel.authorization(SERVICE_URL, expires_in=-301))
    assert "expired" in str(error)


async def test_not_yet_valid_beyond_the_leeway_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    error = await refused(validator, channel.authorization(SERVICE_URL, not_before_in=400))
    assert "not valid yet" in str(error)


async def test_smaller_leeway_is_honoured(
    channel: BotFrameworkChannel, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(settings_for(channel, leeway_s=10), http)
    await refused(validator, channel.authorization(SERVICE_URL, expires_in=-60))


async def test_unsigned_token_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    forged = forge({"alg": "none", "kid": "bf-key-1"}, channel.claims(SERVICE_URL), None)
    assert "algorithm" in str(await refused(validator, f"Bearer {forged}"))


async def test_hs256_keyed_with_the_public_key_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    pem = channel.keys[0].public_pem()
    forged = forge({"alg": "HS256", "kid": "bf-key-1"}, channel.claims(SERVICE_URL), pem)
    assert "algorithm" in str(await refused(validator, f"Bearer {forged}"))


@pytest.mark.parametrize("service_url", ["https://evil.example/amer/", None])
async def test_service_url_mismatch_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator, service_url: str | None
) -> None:
    error = await refused(validator, channel.authorization(SERVICE_URL), service_url)
    assert "service URL" in str(error)


async def test_token_without_serviceurl_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    token = channel.authorization(SERVICE_URL, omit=("serviceurl",))
    assert "service URL" in str(await refused(validator, token))


# --- keys ----------------------------------------------------------------------------------


async def test_keys_are_cached_and_refetched_once_on_rotation(
    channel: BotFrameworkChannel,
    validator: BotFrameworkTokenValidator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL, TEAMS)
    await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL, TEAMS)
    assert channel.jwks_requests == 1
    # The channel rotates: the new key is published, then used.
    rotated = SigningKey(kid="bf-key-2")
    channel.keys = [rotated]
    token = f"Bearer {channel.token(SERVICE_URL, key=rotated)}"
    # Within the refresh floor (30 s after the last fetch) an unknown kid fetches nothing...
    error = await refused(validator, token)
    assert "unknown signing key" in error.reason
    assert channel.jwks_requests == 1
    # ...after it, the keys are fetched once and the new one is accepted.
    monkeypatch.setattr(validator._channel_keys, "_floor", 0.0)
    assert await validator.validate(token, SERVICE_URL, TEAMS)
    assert await validator.validate(token, SERVICE_URL, TEAMS)
    assert channel.jwks_requests == 2


# --- settings and identities ---------------------------------------------------------------


DEV = AuthSettings(mode="dev", allowed_tenants=["contoso"])
JWT = AuthSettings(mode="jwt", allowed_tenants=["contoso"])


def test_anonymous_dev_is_refused_next_to_a_secret() -> None:
    with pytest.raises(ValueError, match="ANONYMOUS_DEV"):
        check_teams_settings(
            TeamsSettings(anonymous_dev=True, app_id=APP_ID, app_secret=SecretStr("s")), DEV
        )


def test_anonymous_dev_is_refused_outside_dev_mode() -> None:
    with pytest.raises(ValueError, match="LAMINA_AUTH__MODE=dev"):
        check_teams_settings(TeamsSettings(anonymous_dev=True), JWT)
    check_teams_settings(TeamsSettings(anonymous_dev=True), DEV)


def test_a_multi_tenant_bot_needs_a_tenant_allow_list() -> None:
    bot = {"app_id": APP_ID, "app_secret": SecretStr("s")}
    with pytest.raises(ValueError, match="LAMINA_AUTH__ALLOWED_TENANTS"):
        check_teams_settings(TeamsSettings(**bot), AuthSettings())
    with pytest.raises(ValueError, match="LAMINA_AUTH__ALLOWED_TENANTS"):
        check_teams_settings(TeamsSettings(anonymous_dev=True), AuthSettings(mode="dev"))
    # The bot's own tenant, or the allow-list, is served.
    check_teams_settings(TeamsSettings(**bot, app_tenant_id=BOT_TENANT), AuthSettings())
    check_teams_settings(TeamsSettings(**bot), JWT)


def test_a_registered_bot_needs_app_id_and_secret() -> None:
    with pytest.raises(ValueError, match="APP_ID"):
        check_teams_settings(TeamsSettings(enabled=True, app_secret=SecretStr("s")), JWT)
    with pytest.raises(ValueError, match="APP_SECRET"):
        check_teams_settings(TeamsSettings(enabled=True, app_id=APP_ID), JWT)
    with pytest.raises(ValueError, match="TOKEN_URL"):
        check_teams_settings(
            TeamsSettings(
                app_id=APP_ID, app_secret=SecretStr("s"), token_url="http://127.0.0.1/t/token"
            ),
            JWT,
        )
    check_teams_settings(TeamsSettings(app_id=APP_ID, app_secret=SecretStr("s")), JWT)


async def test_anonymous_dev_lets_a_request_without_token_through(
    channel: BotFrameworkChannel, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_id=None, app_secret=None, anonymous_dev=True), http
    )
    claims = await validator.validate(None, SERVICE_URL, TEAMS)
    assert claims == {}
    assert claims_identity(claims).allow_anonymous
    # The Emulator: its own channel, a service URL on localhost.
    assert await validator.validate(None, "http://localhost:50123/", "emulator") == {}
    # A token still has to be a valid one.
    await refused(validator, channel.authorization(SERVICE_URL))


# --- service URL and channel ----------------------------------------------------------------


@pytest.mark.parametrize(
    "service_url",
    [
        "https://evil.example/amer/",
        "http://smba.trafficmanager.net/amer/",  # plain http to a Teams host
        "https://smba.trafficmanager.net.evil.example/amer/",
        "https://smba.trafficmanager.net@evil.example/amer/",
        "https://127.0.0.2/",
    ],
)
async def test_an_unlisted_service_url_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator, service_url: str
) -> None:
    # The token names this very service URL: only the host allow-list stops the bot from
    # sending its connector token there.
    error = await refused(validator, channel.authorization(service_url), service_url)
    assert "service URL" in str(error)
    assert "SERVICE_URL_HOSTS" in error.reason


def test_service_url_hosts_match_https_hosts_and_subdomains() -> None:
    hosts = ["smba.trafficmanager.net", "*.example.com", "http://127.0.0.1"]
    assert service_url_allowed("https://smba.trafficmanager.net/emea/", hosts)
    assert service_url_allowed("https://SMBA.TrafficManager.net:443/emea/", hosts)
    assert service_url_allowed("https://bots.example.com/", hosts)
    assert not service_url_allowed("https://example.com/", hosts)
    assert not service_url_allowed("https://badexample.com/", hosts)
    assert not service_url_allowed("http://bots.example.com/", hosts)
    assert service_url_allowed("http://127.0.0.1:5123/", hosts)
    assert not service_url_allowed("ftp://smba.trafficmanager.net/", hosts)
    assert not service_url_allowed("https://smba.trafficmanager.net:bad/", hosts)
    assert not service_url_allowed("", hosts)


@pytest.mark.parametrize("channel_id", ["emulator", "webchat", "directline", None])
async def test_a_channel_other_than_teams_is_refused(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator, channel_id: str | None
) -> None:
    error = await refused(validator, channel.authorization(SERVICE_URL), channel_id=channel_id)
    assert "Teams only" in str(error)
    # A Teams sub-channel is Teams.
    token = channel.authorization(SERVICE_URL)
    assert await validator.validate(token, SERVICE_URL, "msteams:COPILOT")


def test_a_validator_needs_the_app_id(
    channel: BotFrameworkChannel, http: httpx.AsyncClient
) -> None:
    with pytest.raises(ValueError, match="APP_ID"):
        BotFrameworkTokenValidator(settings_for(channel, app_id=None), http)
