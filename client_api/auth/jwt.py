"""Bearer-token validation against OpenID Connect metadata and its JWKS.

RS256 only; issuer, audience and expiry are always checked. Metadata and keys
are cached and refreshed when a token names a key id we do not know yet (key
rotation), at most once per ``_REFRESH_FLOOR_S`` so a flood of forged kids
cannot hammer the identity provider.

A token that passed every check is remembered, by its exact text, until it
expires, for at most ``_VERIFIED_TTL_S`` and only while the key set that
verified it is current: a client sends the same token with every request, and
checking an RS256 signature and PyJWT's decoding cost more than the rest of a
gateway request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from client_api.settings import AuthSettings
from intelligence.contracts import Principal

log = logging.getLogger(__name__)

_ALGORITHMS = ["RS256"]
_REFRESH_FLOOR_S = 30.0
_VERIFIED_TTL_S = 300.0
_VERIFIED_MAX = 10_000


class AuthenticationError(Exception):
    """The request carries no valid credentials; the message is safe to return."""


class IdentityProviderUnavailable(Exception):
    """OpenID metadata or keys could not be fetched: fail closed (503, not 401)."""


@dataclass
class _Keys:
    issuer: str
    keys: dict[str, jwt.PyJWK]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    keys: _Keys
    until: float


class JwtValidator:
    def __init__(self, settings: AuthSettings, http: httpx.AsyncClient) -> None:
        if not settings.openid_config_url or not settings.audience:
            raise ValueError("openid_config_url and audience are required")
        self._config_url = settings.openid_config_url
        self._audience = settings.audience
        self._issuer = settings.issuer
        self._leeway = settings.leeway_s
        self._ttl = settings.metadata_ttl_s
        self._http = http
        self._keys: _Keys | None = None
        self._lock = asyncio.Lock()
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    async def principal(self, token: str) -> Principal:
        claims = await self.validate(token)
        return principal_from_claims(claims)

    async def validate(self, token: str) -> dict[str, Any]:
        remembered = self._remembered(token)
        if remembered is not None:
            return remembered
        claims = await self._validate(token)
        self._remember(token, claims)
        return claims

    def _remembered(self, token: str) -> dict[str, Any] | None:
        entry = self._verified.get(token)
        if entry is None:
            return None
        now = time.time()
        if entry.keys is not self._keys or now >= entry.until:
            del self._verified[token]
            return None
        self._verified.move_to_end(token)
        return entry.claims

    def _remember(self, token: str, claims: dict[str, Any]) -> None:
        if self._keys is None:
            return
        until = min(float(claims["exp"]) + self._leeway, time.time() + _VERIFIED_TTL_S)
        self._verified[token] = _Verified(claims, self._keys, until)
        if len(self._verified) > _VERIFIED_MAX:
            self._verified.popitem(last=False)

    async def _validate(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("The bearer token is malformed.") from None
        if header.get("alg") not in _ALGORITHMS:
            raise AuthenticationError("The token's signing algorithm is not accepted.")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationError("The token names no signing key.")
        keys = await self._key_set(kid)
        key = keys.keys.get(kid)
        if key is None:
            raise AuthenticationError("The token was signed by an unknown key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=_ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer or keys.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The token has expired.") from None
        except jwt.PyJWTError as exc:
            # Which check failed stays in the log: telling the caller would be an oracle.
            log.info("token refused: %s", exc)
            raise AuthenticationError("The token is not valid.") from None
        return claims

    async def _key_set(self, kid: str) -> _Keys:
        async with self._lock:
            now = time.monotonic()
            cached = self._keys
            stale = cached is None or now - cached.fetched_at > self._ttl
            unknown_kid = cached is not None and kid not in cached.keys
            if (
                cached is None
                or stale
                or (unknown_kid and now - cached.fetched_at > _REFRESH_FLOOR_S)
            ):
                try:
                    self._keys = await self._fetch()
                except IdentityProviderUnavailable:
                    if cached is None:
                        raise
                    # Keep accepting tokens signed with keys we already trust while the
                    # provider is down, and try again after the refresh floor, not per request.
                    log.warning("OpenID metadata refresh failed; using cached keys")
                    self._keys = _Keys(
                        cached.issuer, cached.keys, now - self._ttl + _REFRESH_FLOOR_S
                    )
            assert self._keys is not None
            return self._keys

    async def _fetch(self) -> _Keys:
        try:
            meta = (await self._http.get(self._config_url)).raise_for_status().json()
            issuer, jwks_uri = meta["issuer"], meta["jwks_uri"]
            if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
                raise ValueError("issuer and jwks_uri must be strings")
            jwks = (await self._http.get(jwks_uri)).raise_for_status().json()
            key_set = jwt.PyJWKSet.from_dict(jwks)
        except (httpx.HTTPError, KeyError, TypeError, ValueError, jwt.PyJWTError) as exc:
            raise IdentityProviderUnavailable(str(exc)) from exc
        keys = {k.key_id: k for k in key_set.keys if k.key_id}
        return _Keys(issuer=issuer, keys=keys, fetched_at=time.monotonic())


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    user = claims.get("oid") or claims.get("sub")
    tenant = claims.get("tid")
    if not isinstance(user, str) or not user:
        raise AuthenticationError("The token identifies no user (oid/sub).")
    if not isinstance(tenant, str) or not tenant:
        raise AuthenticationError("The token names no tenant (tid).")
    return Principal(
        tenant_id=tenant,
        user_id=user,
        groups=frozenset(_strings(claims.get("groups"))),
        roles=frozenset(_strings(claims.get("roles"))),
        name=claims.get("name") or claims.get("preferred_username"),
    )


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
