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

from client_api.settings import TeamsSettings
from client_api.teams.auth import (
    BotFrameworkTokenValidator,
    TeamsAuthError,
    check_teams_settings,
    claims_identity,
)
from tests.support.bot_framework import (
    APP_ID,
    BOT_TENANT,
    BotFrameworkChannel,
    EntraTenant,
    teams_settings,
)
from tests.support.identity import SigningKey, forge

SERVICE_URL = "https://smba.trafficmanager.net/amer/"


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
) -> TeamsAuthError:
    with pytest.raises(TeamsAuthError) as caught:
        await validator.validate(authorization, service_url)
    return caught.value


# --- accepted ------------------------------------------------------------------------------


async def test_channel_token_gives_its_claims(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    claims = await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL)
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
    assert await validator.validate(token, SERVICE_URL)


async def test_skew_within_the_leeway_is_accepted(
    channel: BotFrameworkChannel, validator: BotFrameworkTokenValidator
) -> None:
    # Default leeway: 300 s either side.
    late = channel.authorization(SERVICE_URL, expires_in=-200)
    early = channel.authorization(SERVICE_URL, not_before_in=200)
    assert await validator.validate(late, SERVICE_URL)
    assert await validator.validate(early, SERVICE_URL)


async def test_entra_issued_tokens_of_the_bots_tenant_are_accepted(
    channel: BotFrameworkChannel, tenant: EntraTenant, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_tenant_id=BOT_TENANT, token_url=tenant.token_url), http
    )
    for version in (1, 2):
        claims = await validator.validate(f"Bearer {tenant.token(version=version)}", SERVICE_URL)
        assert claims["tid"] == BOT_TENANT
    # The channel's tokens stay accepted next to them.
    assert await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL)
    # An Entra token that names a service URL must name this one.
    wrong = tenant.token("https://evil.example/")
    assert "service URL" in str(await refused(validator, f"Bearer {wrong}"))


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
    await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL)
    await validator.validate(channel.authorization(SERVICE_URL), SERVICE_URL)
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
    assert await validator.validate(token, SERVICE_URL)
    assert await validator.validate(token, SERVICE_URL)
    assert channel.jwks_requests == 2


# --- settings and identities ---------------------------------------------------------------


def test_anonymous_dev_is_refused_next_to_a_secret() -> None:
    with pytest.raises(ValueError, match="ANONYMOUS_DEV"):
        check_teams_settings(
            TeamsSettings(anonymous_dev=True, app_id=APP_ID, app_secret=SecretStr("s"))
        )


def test_a_registered_bot_needs_app_id_and_secret() -> None:
    with pytest.raises(ValueError, match="APP_ID"):
        check_teams_settings(TeamsSettings(enabled=True, app_secret=SecretStr("s")))
    with pytest.raises(ValueError, match="APP_SECRET"):
        check_teams_settings(TeamsSettings(enabled=True, app_id=APP_ID))
    with pytest.raises(ValueError, match="TOKEN_URL"):
        check_teams_settings(
            TeamsSettings(
                app_id=APP_ID, app_secret=SecretStr("s"), token_url="http://127.0.0.1/t/token"
            )
        )
    check_teams_settings(TeamsSettings(app_id=APP_ID, app_secret=SecretStr("s")))
    check_teams_settings(TeamsSettings(anonymous_dev=True))


async def test_anonymous_dev_lets_a_request_without_token_through(
    channel: BotFrameworkChannel, http: httpx.AsyncClient
) -> None:
    validator = BotFrameworkTokenValidator(
        settings_for(channel, app_id=None, app_secret=None, anonymous_dev=True), http
    )
    claims = await validator.validate(None, SERVICE_URL)
    assert claims == {}
    assert claims_identity(claims).allow_anonymous
    # A token still has to be a valid one.
    await refused(validator, channel.authorization(SERVICE_URL))


def test_a_validator_needs_the_app_id(
    channel: BotFrameworkChannel, http: httpx.AsyncClient
) -> None:
    with pytest.raises(ValueError, match="APP_ID"):
        BotFrameworkTokenValidator(settings_for(channel, app_id=None), http)
