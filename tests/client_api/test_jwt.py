"""The bearer-token validator against a real OpenID/JWKS server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import pytest

from client_api.auth.jwt import AuthenticationError, IdentityProviderUnavailable, JwtValidator
from client_api.settings import AuthSettings
from tests.support.identity import (
    AUDIENCE,
    IdentityProvider,
    SigningKey,
    running_identity_provider,
)


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with running_identity_provider() as provider:
        yield provider


@pytest.fixture
async def validator(idp: IdentityProvider) -> AsyncIterator[JwtValidator]:
    async with httpx.AsyncClient() as http:
        yield JwtValidator(
            AuthSettings(openid_config_url=idp.config_url, audience=AUDIENCE, leeway_s=5), http
        )


async def test_valid_token_gives_the_principal(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    token = idp.token("alice", groups=("hr", "employees"), roles=("employee",))
    principal = await validator.principal(token)
    assert principal.user_id == "alice"
    assert principal.tenant_id == "contoso"
    assert principal.groups == {"hr", "employees"}
    assert principal.roles == {"employee"}


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"expires_in": -120}, "expired"),
        ({"audience": "api://someone-else"}, "not valid"),
        ({"issuer": "https://evil.example/v2.0"}, "not valid"),
        ({"key": SigningKey(kid="key-1")}, "not valid"),  # right kid, wrong key: bad signature
        ({"key": SigningKey(kid="rogue")}, "unknown key"),
    ],
)
async def test_bad_tokens_are_refused(
    idp: IdentityProvider, validator: JwtValidator, kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(AuthenticationError, match=reason):
        await validator.validate(idp.token("alice", **kwargs))  # type: ignore[arg-type]


async def test_other_algorithms_are_refused(validator: JwtValidator) -> None:
    forged = jwt.encode({"sub": "alice"}, "s" * 32, algorithm="HS256", headers={"kid": "key-1"})
    with pytest.raises(AuthenticationError, match="algorithm"):
        await validator.validate(forged)
    unsigned = jwt.encode({"sub": "alice"}, None, algorithm="none")
    with pytest.raises(AuthenticationError, match="algorithm"):
        await validator.validate(unsigned)


async def test_garbage_is_refused(validator: JwtValidator) -> None:
    with pytest.raises(AuthenticationError, match="malformed"):
        await validator.validate("not.a.jwt")


async def test_a_token_without_tenant_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    with pytest.raises(AuthenticationError, match="tenant"):
        await validator.principal(idp.token("alice", tenant=""))


async def test_rotated_key_is_fetched_on_unknown_kid(
    idp: IdentityProvider, validator: JwtValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await validator.validate(idp.token("alice"))
    assert idp.jwks_requests == 1
    new_key = SigningKey(kid="key-2")
    idp.keys.append(new_key)
    # Within the refresh floor an unknown kid does not trigger a fetch...
    with pytest.raises(AuthenticationError, match="unknown key"):
        await validator.validate(idp.token("alice", key=new_key))
    assert idp.jwks_requests == 1
    # ...after it, the new key is fetched once and accepted.
    monkeypatch.setattr("client_api.auth.jwt._REFRESH_FLOOR_S", 0.0)
    assert (await validator.validate(idp.token("alice", key=new_key)))["sub"] == "alice"
    assert idp.jwks_requests == 2


async def test_unreachable_identity_provider_fails_closed() -> None:
    async with httpx.AsyncClient() as http:
        validator = JwtValidator(
            AuthSettings(openid_config_url="http://127.0.0.1:9/.well-known/x", audience="a"), http
        )
        idp = IdentityProvider(base_url="http://127.0.0.1:9")
        with pytest.raises(IdentityProviderUnavailable):
            await validator.validate(idp.token("alice"))


async def test_refusal_does_not_say_which_check_failed(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    for token in (idp.token("a", audience="api://x"), idp.token("a", issuer="https://x/v2.0")):
        with pytest.raises(AuthenticationError) as caught:
            await validator.validate(token)
        assert str(caught.value) == "The token is not valid."


async def test_cached_keys_keep_working_while_the_provider_is_down(
    idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with httpx.AsyncClient() as http:
        validator = JwtValidator(
            AuthSettings(openid_config_url=idp.config_url, audience=AUDIENCE, metadata_ttl_s=10),
            http,
        )
        await validator.validate(idp.token("alice"))
        # The cache goes stale and the provider stops answering.
        monkeypatch.setattr(validator, "_ttl", -1)
        validator._config_url = "http://127.0.0.1:9/.well-known/openid-configuration"
        assert (await validator.validate(idp.token("alice")))["sub"] == "alice"
