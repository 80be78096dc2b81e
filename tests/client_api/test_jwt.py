"""The bearer-token validator against a real OpenID/JWKS server on loopback.

Every token is signed with a test RSA key (or forged by hand) and checked by the
real validator, which fetches metadata and keys over HTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest

from client_api.auth.jwt import (
    AuthenticationError,
    IdentityProviderUnavailable,
    JwtValidator,
    issuer_tenant,
    principal_from_claims,
)
from client_api.settings import (
    AuthSettings,
    LaminaSettings,
    SettingsError,
    require_serving_settings,
)
from tests.support.identity import (
    AUDIENCE,
    CLIENT_ID,
    TENANT,
    V1_ISSUER,
    IdentityProvider,
    SigningKey,
    b64url,
    b64url_decode,
    forge,
    running_identity_provider,
)

NOT_VALID = "The token is not valid."


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with running_identity_provider() as provider:
        yield provider


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def validator_for(idp: IdentityProvider, http: httpx.AsyncClient, **settings: Any) -> JwtValidator:
    values: dict[str, Any] = {
        "openid_config_url": idp.config_url,
        "audience": AUDIENCE,
        "leeway_s": 5,
        **settings,
    }
    return JwtValidator(AuthSettings(**values), http)


@pytest.fixture
def validator(idp: IdentityProvider, http: httpx.AsyncClient) -> JwtValidator:
    return validator_for(idp, http)


async def refused(validator: JwtValidator, token: str) -> str:
    """The message a refused token gets (fails the test if it is accepted)."""
    with pytest.raises(AuthenticationError) as caught:
        await validator.validate(token)
    return str(caught.value)


# --- the accepted token ----------------------------------------------------------------


async def test_valid_token_gives_the_principal(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    token = idp.token(
        "alice",
        groups=("hr", "employees"),
        roles=("employee",),
        scopes=("access_as_user", "chat"),
        extra={"name": "Alice"},
    )
    principal = await validator.principal(token)
    assert principal.user_id == "alice"
    assert principal.tenant_id == TENANT
    assert principal.groups == {"hr", "employees"}
    assert principal.roles == {"employee"}
    assert principal.scopes == {"access_as_user", "chat"}
    assert principal.name == "Alice"
    assert principal.auth_method == "jwt"


async def test_an_app_only_token_has_roles_and_no_scopes(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    principal = await validator.principal(idp.token("daemon", app_only=True, roles=("Jobs",)))
    assert principal.scopes == frozenset()
    assert principal.roles == {"Jobs"}
    # idtyp says app-only even if a scp slipped in: it acts for no user.
    mixed = idp.token("daemon", app_only=True, extra={"scp": "access_as_user"})
    assert (await validator.principal(mixed)).scopes == frozenset()


def test_the_user_is_the_oid_and_falls_back_to_sub() -> None:
    claims = {"oid": "object-id", "sub": "pairwise", "tid": TENANT}
    assert principal_from_claims(claims).user_id == "object-id"
    assert principal_from_claims({"sub": "pairwise", "tid": TENANT}).user_id == "pairwise"
    with pytest.raises(AuthenticationError, match="identifies no user"):
        principal_from_claims({"tid": TENANT})


async def test_a_not_before_within_the_leeway_is_accepted(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    # The caller's clock runs a moment ahead of ours: that is what the leeway is for.
    token = idp.token("alice", extra={"nbf": int(time.time()) + 2})
    assert (await validator.validate(token))["oid"] == "alice"


# --- the negative suite: one forgery or mistake each -------------------------------------


async def test_alg_none_is_refused(idp: IdentityProvider, validator: JwtValidator) -> None:
    unsigned = forge({"alg": "none", "typ": "JWT", "kid": "key-1"}, idp.claims("mallory"))
    assert "algorithm" in await refused(validator, unsigned)


async def test_hs256_keyed_with_the_rsa_public_key_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    # Key confusion: the public key is public, so an attacker can HMAC with its PEM
    # bytes; a verifier that let the token pick the algorithm would accept this.
    pem = idp.keys[0].public_pem()
    forged = forge({"alg": "HS256", "typ": "JWT", "kid": "key-1"}, idp.claims("mallory"), pem)
    assert "algorithm" in await refused(validator, forged)


async def test_wrong_audience_is_refused(idp: IdentityProvider, validator: JwtValidator) -> None:
    assert await refused(validator, idp.token("alice", audience="api://someone-else")) == NOT_VALID


async def test_wrong_issuer_is_refused(idp: IdentityProvider, validator: JwtValidator) -> None:
    token = idp.token("alice", issuer="https://evil.example/contoso/v2.0")
    assert await refused(validator, token) == NOT_VALID


async def test_a_token_of_another_tenant_is_refused(
    idp: IdentityProvider, http: httpx.AsyncClient
) -> None:
    # Entra signs every tenant's tokens with the same keys: the signature is fine, the
    # issuer is genuinely fabrikam's, and it must still not pass in contoso's deployment,
    # also when the v1/v2 issuer forms are configured with the {tenantid} placeholder.
    token = idp.token("bob", tenant="fabrikam")
    assert await refused(validator_for(idp, http), token) == NOT_VALID
    templated = validator_for(idp, http, issuers=[idp.v2_issuer_template, V1_ISSUER])
    assert await refused(templated, token) == NOT_VALID
    assert await refused(templated, idp.token("bob", tenant="fabrikam", version=1)) == NOT_VALID


async def test_an_issuer_and_tenant_that_disagree_are_refused(
    idp: IdentityProvider, http: httpx.AsyncClient
) -> None:
    # Both tenants are allowed, but this token's issuer is contoso's and its tid fabrikam.
    validator = validator_for(idp, http, allowed_tenants=[TENANT, "fabrikam"])
    mixed = idp.token("bob", tenant="fabrikam", issuer=idp.issuer_for(TENANT))
    assert await refused(validator, mixed) == NOT_VALID
    templated = validator_for(
        idp, http, allowed_tenants=[TENANT, "fabrikam"], issuers=[idp.v2_issuer_template]
    )
    assert await refused(templated, mixed) == NOT_VALID


async def test_expired_token_is_refused(idp: IdentityProvider, validator: JwtValidator) -> None:
    assert "expired" in await refused(validator, idp.token("alice", expires_in=-120))


async def test_a_token_not_yet_valid_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    token = idp.token("alice", extra={"nbf": int(time.time()) + 120})  # leeway is 5 s
    assert await refused(validator, token) == NOT_VALID


async def test_a_token_without_exp_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    assert await refused(validator, idp.token("alice", omit=("exp",))) == NOT_VALID


async def test_an_unknown_kid_is_refused(idp: IdentityProvider, validator: JwtValidator) -> None:
    assert "unknown key" in await refused(
        validator, idp.token("alice", key=SigningKey(kid="rogue"))
    )


async def test_the_right_kid_with_the_wrong_key_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    impostor = SigningKey(kid="key-1")
    assert await refused(validator, idp.token("alice", key=impostor)) == NOT_VALID


async def test_a_tampered_payload_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    header, payload, signature = idp.token("mallory", roles=()).split(".")
    claims = json.loads(b64url_decode(payload))
    claims["roles"] = ["Lamina.Admin"]
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert await refused(validator, tampered) == NOT_VALID


async def test_other_signing_algorithms_are_refused(validator: JwtValidator) -> None:
    forged = jwt.encode({"sub": "alice"}, "s" * 32, algorithm="HS256", headers={"kid": "key-1"})
    assert "algorithm" in await refused(validator, forged)


async def test_garbage_is_refused(validator: JwtValidator) -> None:
    assert "malformed" in await refused(validator, "not.a.jwt")


async def test_a_token_without_tenant_is_refused(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    assert "tenant" in await refused(validator, idp.token("alice", omit=("tid",)))


async def test_refusal_does_not_say_which_check_failed(
    idp: IdentityProvider, validator: JwtValidator, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = {
        "audience": idp.token("a", audience="api://x"),
        "issuer": idp.token("a", issuer="https://x/contoso/v2.0"),
        "tenant": idp.token("a", tenant="fabrikam"),
        "nbf": idp.token("a", extra={"nbf": int(time.time()) + 600}),
        "exp": idp.token("a", omit=("exp",)),
    }
    caplog.set_level("INFO", logger="client_api.auth.jwt")
    for check, token in tokens.items():
        caplog.clear()
        assert await refused(validator, token) == NOT_VALID
        # ...while the operator's log says which check it was.
        assert check in caplog.text.lower()


# --- issuers, audiences and tenants that are configured ----------------------------------


async def test_v1_and_v2_issuer_forms_are_accepted_when_configured(
    idp: IdentityProvider, http: httpx.AsyncClient
) -> None:
    validator = validator_for(
        idp,
        http,
        audience=None,
        audiences=[AUDIENCE, CLIENT_ID],
        issuers=[V1_ISSUER, idp.v2_issuer_template],
    )
    # Entra v1 tokens: sts.windows.net issuer, the App ID URI as audience;
    # v2 tokens: login.microsoftonline.com-style issuer, the client id as audience.
    v1 = idp.token("alice", version=1, audience=AUDIENCE)
    v2 = idp.token("alice", version=2, audience=CLIENT_ID)
    assert (await validator.validate(v1))["iss"] == f"https://sts.windows.net/{TENANT}/"
    assert (await validator.validate(v2))["iss"] == idp.issuer_for(TENANT)


async def test_only_the_metadata_issuer_is_accepted_by_default(
    idp: IdentityProvider, validator: JwtValidator
) -> None:
    assert (await validator.validate(idp.token("alice")))["tid"] == TENANT
    assert await refused(validator, idp.token("alice", version=1)) == NOT_VALID


async def test_an_allowed_second_tenant_is_accepted(http: httpx.AsyncClient) -> None:
    with running_identity_provider(multi_tenant=True) as idp:
        validator = validator_for(idp, http, allowed_tenants=[TENANT, "Fabrikam"])
        principal = await validator.principal(idp.token("bob", tenant="fabrikam"))
        assert principal.tenant_id == "fabrikam"
        assert (await validator.principal(idp.token("alice"))).tenant_id == TENANT
        assert await refused(validator, idp.token("eve", tenant="northwind")) == NOT_VALID


async def test_an_allowed_second_tenant_with_single_tenant_metadata_needs_the_template(
    idp: IdentityProvider, http: httpx.AsyncClient
) -> None:
    token = idp.token("bob", tenant="fabrikam")
    fixed_issuer = validator_for(idp, http, allowed_tenants=[TENANT, "fabrikam"])
    assert await refused(fixed_issuer, token) == NOT_VALID
    templated = validator_for(
        idp, http, allowed_tenants=[TENANT, "fabrikam"], issuers=[idp.v2_issuer_template]
    )
    assert (await templated.validate(token))["tid"] == "fabrikam"


async def test_multi_tenant_metadata_without_an_allow_list_accepts_nobody(
    http: httpx.AsyncClient,
) -> None:
    with running_identity_provider(multi_tenant=True) as idp:
        validator = validator_for(idp, http)
        for tenant in (TENANT, "fabrikam"):
            assert await refused(validator, idp.token("bob", tenant=tenant)) == NOT_VALID


def test_the_tenant_an_issuer_names() -> None:
    assert issuer_tenant("https://sts.windows.net/72F988BF-86f1/") == "72f988bf-86f1"
    assert issuer_tenant("https://login.microsoftonline.com/abc/v2.0") == "abc"
    assert issuer_tenant("https://login.microsoftonline.com/{tenantid}/v2.0") is None
    assert issuer_tenant("https://accounts.example.com") is None


def test_serving_settings_insist_on_an_allow_list_for_multi_tenant_metadata() -> None:
    multi = "https://login.microsoftonline.com/organizations/v2.0/.well-known/openid-configuration"
    auth: dict[str, Any] = {"openid_config_url": multi, "audiences": [CLIENT_ID]}
    with pytest.raises(SettingsError, match="LAMINA_AUTH__ALLOWED_TENANTS"):
        require_serving_settings(LaminaSettings(auth=auth))
    require_serving_settings(LaminaSettings(auth={**auth, "allowed_tenants": ["a-tenant"]}))
    with pytest.raises(SettingsError, match="LAMINA_AUTH__ALLOWED_TENANTS"):
        require_serving_settings(
            LaminaSettings(
                auth={
                    **auth,
                    "openid_config_url": "https://x/.well-known/o",
                    "issuer": "https://x/{tenantid}/v2.0",
                }
            )
        )


# --- keys, caching and the identity provider's availability ------------------------------


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
    monkeypatch.setattr(validator._openid, "_floor", 0.0)
    assert (await validator.validate(idp.token("alice", key=new_key)))["sub"] == "alice"
    assert idp.jwks_requests == 2


async def test_a_verified_token_is_remembered_until_the_keys_change(
    idp: IdentityProvider, validator: JwtValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = idp.token("alice")
    first = await validator.validate(token)
    assert await validator.validate(token) is first  # the fast path: no second decode
    # Another token finds the key set stale and has it fetched again: what the old set
    # verified is checked afresh.
    monkeypatch.setattr(validator._openid, "_ttl", -1)
    await validator.validate(idp.token("bob"))
    again = await validator.validate(token)
    assert again == first and again is not first


async def test_unreachable_identity_provider_fails_closed(http: httpx.AsyncClient) -> None:
    validator = JwtValidator(
        AuthSettings(openid_config_url="http://127.0.0.1:9/.well-known/x", audience="a"), http
    )
    idp = IdentityProvider(base_url="http://127.0.0.1:9")
    with pytest.raises(IdentityProviderUnavailable):
        await validator.validate(idp.token("alice"))


async def test_cached_keys_keep_working_while_the_provider_is_down(
    idp: IdentityProvider, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    validator = validator_for(idp, http, metadata_ttl_s=10)
    await validator.validate(idp.token("alice"))
    # The cache goes stale and the provider stops answering.
    monkeypatch.setattr(validator._openid, "_ttl", -1)
    validator._config_url = "http://127.0.0.1:9/.well-known/openid-configuration"
    assert (await validator.validate(idp.token("alice")))["sub"] == "alice"
    # The tenant rules survive the failed refresh: another tenant is still refused.
    assert await refused(validator, idp.token("bob", tenant="fabrikam")) == NOT_VALID
