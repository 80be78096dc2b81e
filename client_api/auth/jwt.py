"""Bearer-token validation against OpenID Connect metadata and its JWKS (Entra ID).

RS256 only. Signature, audience (any of the configured ones), ``exp`` (required),
``nbf`` (when present), issuer and tenant are always checked, with a small
leeway for clock skew. Metadata and keys are cached and refreshed when a token
names a key id we do not know yet (key rotation), at most once per
``_REFRESH_FLOOR_S`` so a flood of forged kids cannot hammer the identity provider.

Tenants: Entra signs the tokens of every tenant with the same keys, so a valid
signature says nothing about *whose* token it is. A token is accepted only if
its ``tid`` is allowed (``LAMINA_AUTH__ALLOWED_TENANTS``, by default only the
tenant the configured issuer names) and its ``iss`` is one of the accepted
issuer forms for that very tenant (``{tenantid}`` in a form stands for the
``tid``; a form without it must name the token's tenant itself). Multi-tenant
metadata (``{tenantid}`` in its issuer) without an allow-list accepts nobody.

A token that passed every check is remembered, by its exact text, until it
expires, for at most ``_VERIFIED_TTL_S`` and only while the key set that
verified it is current: a client sends the same token with every request, and
checking an RS256 signature and PyJWT's decoding cost more than the rest of a
gateway request.

Refusals are deliberately vague to the caller ("The token is not valid."); the
check that failed goes to the log.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from client_api.auth.groups import AzureCredentialGraphToken, GraphGroupResolver, GroupResolver
from client_api.auth.openid_keys import IdentityProviderUnavailable as IdentityProviderUnavailable
from client_api.auth.openid_keys import OpenIdKeys, OpenIdKeySet
from client_api.settings import AuthSettings
from intelligence.contracts import Principal

log = logging.getLogger(__name__)

_ALGORITHMS = ["RS256"]
_REFRESH_FLOOR_S = 30.0
_VERIFIED_TTL_S = 300.0
_VERIFIED_MAX = 10_000
TENANT_PLACEHOLDER = "{tenantid}"
_NOT_VALID = "The token is not valid."


class AuthenticationError(Exception):
    """The request carries no valid credentials; the message is safe to return."""


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """Which issuers and tenants a token may come from."""

    issuers: tuple[str, ...]
    """Accepted ``iss`` forms; ``{tenantid}`` stands for the token's ``tid``."""
    tenants: frozenset[str] | None
    """Allowed ``tid`` values, lower case; ``None`` when no tenant can be (misconfigured)."""

    @classmethod
    def build(cls, settings: AuthSettings, metadata_issuer: str) -> TenantPolicy:
        home_issuer = settings.issuer or metadata_issuer
        issuers = tuple(settings.issuers) or (home_issuer,)
        if settings.allowed_tenants:
            return cls(issuers, frozenset(t.strip().lower() for t in settings.allowed_tenants))
        home = issuer_tenant(home_issuer)
        if home is None:
            log.error(
                "The issuer %r names no tenant (multi-tenant metadata): every token is refused "
                "until LAMINA_AUTH__ALLOWED_TENANTS lists the tenants to accept",
                home_issuer,
            )
        return cls(issuers, frozenset({home}) if home is not None else None)

    def refusal(self, tenant_id: str, issuer: object) -> str | None:
        """Why a token of ``tenant_id`` issued by ``issuer`` is refused; ``None`` if it is not."""
        tid = tenant_id.lower()
        if self.tenants is None:
            return "no tenant is allowed (LAMINA_AUTH__ALLOWED_TENANTS is empty)"
        if tid not in self.tenants:
            return f"tenant {tenant_id!r} is not allowed"
        for form in self.issuers:
            if TENANT_PLACEHOLDER in form:
                if issuer == form.replace(TENANT_PLACEHOLDER, tenant_id):
                    return None
            elif issuer == form and issuer_tenant(form) in (tid, None):
                # A fixed issuer must name this token's tenant: Entra's issuer and tid
                # always agree, so a token where they differ is not one of its own.
                return None
        return f"issuer {issuer!r} is not accepted for tenant {tenant_id!r}"


def issuer_tenant(issuer: str) -> str | None:
    """The tenant an Entra issuer names (the first path segment), lower case; ``None`` if
    it names none: no path, or the multi-tenant ``{tenantid}`` placeholder."""
    segments = [s for s in urlsplit(issuer).path.split("/") if s]
    if not segments or "{" in segments[0]:
        return None
    return segments[0].lower()


@dataclass(frozen=True, slots=True)
class _Keys:
    openid: OpenIdKeys
    tenants: TenantPolicy


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    keys: _Keys
    until: float


class JwtValidator:
    """Validates Entra ID (or any OpenID) access tokens and turns them into principals.

    ``groups`` resolves the memberships of tokens whose ``groups`` claim overflowed;
    by default Microsoft Graph with ``DefaultAzureCredential`` (created only when
    the first such token arrives). Call :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        settings: AuthSettings,
        http: httpx.AsyncClient,
        *,
        groups: GroupResolver | None = None,
    ) -> None:
        audiences = settings.accepted_audiences()
        if not settings.openid_config_url or not audiences:
            raise ValueError("openid_config_url and audience (or audiences) are required")
        self._settings = settings
        self._openid = OpenIdKeySet(
            settings.openid_config_url,
            http,
            ttl_s=settings.metadata_ttl_s,
            refresh_floor_s=_REFRESH_FLOOR_S,
        )
        self._audiences = audiences
        self._leeway = settings.leeway_s
        self._keys: _Keys | None = None
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._graph_token: AzureCredentialGraphToken | None = None
        if groups is None:
            self._graph_token = AzureCredentialGraphToken()
            groups = GraphGroupResolver.from_settings(settings, http, self._graph_token)
        self._groups = groups

    async def aclose(self) -> None:
        if self._graph_token is not None:
            await self._graph_token.aclose()

    async def principal(self, token: str) -> Principal:
        """The caller the token names, with every group (from Graph on overage).

        Raises :class:`AuthenticationError`, :class:`IdentityProviderUnavailable`
        or :class:`~client_api.auth.groups.GroupsUnavailable`.
        """
        claims = await self.validate(token)
        principal = principal_from_claims(claims)
        if has_group_overage(claims):
            oid = claims.get("oid")
            if not isinstance(oid, str) or not oid:
                log.info("token refused: group overage without an oid to look groups up by")
                raise AuthenticationError("The token identifies no user (oid).")
            groups = await self._groups.groups(principal.tenant_id, oid)
            principal = replace(principal, groups=groups)
        return principal

    async def validate(self, token: str) -> dict[str, Any]:
        """The token's claims once every check passed; raises :class:`AuthenticationError`."""
        remembered = self._remembered(token)
        if remembered is not None:
            return remembered
        claims, keys = await self._validate(token)
        self._remember(token, claims, keys)
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

    def _remember(self, token: str, claims: dict[str, Any], keys: _Keys) -> None:
        until = min(float(claims["exp"]) + self._leeway, time.time() + _VERIFIED_TTL_S)
        self._verified[token] = _Verified(claims, keys, until)
        if len(self._verified) > _VERIFIED_MAX:
            self._verified.popitem(last=False)

    async def _validate(self, token: str) -> tuple[dict[str, Any], _Keys]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("The bearer token is malformed.") from None
        # Checked before any key is touched: "none", and HS256 keyed with our public
        # key (algorithm confusion), never reach a verifier.
        if header.get("alg") not in _ALGORITHMS:
            log.info("token refused: algorithm %r", header.get("alg"))
            raise AuthenticationError("The token's signing algorithm is not accepted.")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationError("The token names no signing key.")
        keys = await self._key_set(kid)
        key = keys.openid.keys.get(kid)
        if key is None:
            raise AuthenticationError("The token was signed by an unknown key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=_ALGORITHMS,
                audience=self._audiences,
                leeway=self._leeway,
                options={
                    "require": ["exp", "iss", "aud"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The token has expired.") from None
        except jwt.PyJWTError as exc:
            # Which check failed stays in the log: telling the caller would be an oracle.
            log.info("token refused: %s", exc)
            raise AuthenticationError(_NOT_VALID) from None
        tenant = claims.get("tid")
        if not isinstance(tenant, str) or not tenant:
            raise AuthenticationError("The token names no tenant (tid).")
        refusal = keys.tenants.refusal(tenant, claims.get("iss"))
        if refusal is not None:
            log.info("token refused: %s", refusal)
            raise AuthenticationError(_NOT_VALID)
        return claims, keys

    async def _key_set(self, kid: str) -> _Keys:
        openid = await self._openid.for_kid(kid)
        keys = self._keys
        if keys is None or keys.openid is not openid:
            # A new key set (or issuer) ends what was remembered under the old one.
            keys = self._keys = _Keys(openid, TenantPolicy.build(self._settings, openid.issuer))
        return keys


def has_group_overage(claims: dict[str, Any]) -> bool:
    """Entra left the groups out because there were too many (``hasgroups`` in implicit-flow
    tokens, ``_claim_names.groups`` in the others)."""
    claim_names = claims.get("_claim_names")
    return claims.get("hasgroups") is True or (
        isinstance(claim_names, dict) and "groups" in claim_names
    )


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a validated token names (groups as the token carries them)."""
    user = claims.get("oid") or claims.get("sub")
    tenant = claims.get("tid")
    if not isinstance(user, str) or not user:
        raise AuthenticationError("The token identifies no user (oid/sub).")
    if not isinstance(tenant, str) or not tenant:
        raise AuthenticationError("The token names no tenant (tid).")
    scope = claims.get("scp")
    # An app-only token acts for no user; Entra marks it (idtyp) and gives it no scp.
    app_only = claims.get("idtyp") == "app"
    name = claims.get("name") or claims.get("preferred_username")
    return Principal(
        tenant_id=tenant,
        user_id=user,
        groups=frozenset(_strings(claims.get("groups"))),
        roles=frozenset(_strings(claims.get("roles"))),
        name=name if isinstance(name, str) else None,
        scopes=frozenset(scope.split()) if isinstance(scope, str) and not app_only else frozenset(),
        auth_method="jwt",
    )


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
