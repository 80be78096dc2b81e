"""Inbound requests from the Bot Framework channel: the bearer token on ``POST /api/messages``.

The channel signs a JWT with keys it publishes through OpenID metadata
(``LAMINA_TEAMS__OPENID_CONFIG_URL``, the Bot Framework's by default). A request is
accepted only if that token is RS256-signed by a published key, issued by an accepted
issuer, addressed to this bot (``aud`` = the App ID), within its lifetime (with
``LAMINA_TEAMS__LEEWAY_S`` of clock skew), and names the activity's ``serviceUrl``, so
a token captured for one service endpoint cannot send the bot's replies elsewhere.

The bot sends its own connector token to the activity's ``serviceUrl``, so that URL
must also be an https URL on one of ``LAMINA_TEAMS__SERVICE_URL_HOSTS`` (Teams' Bot
Connector hosts by default), and the activity must come from the ``msteams`` channel.

A single-tenant bot (``LAMINA_TEAMS__APP_TENANT_ID``) also receives tokens issued by
Entra ID for its tenant (``https://sts.windows.net/<tid>/`` and
``https://login.microsoftonline.com/<tid>/v2.0``); those are signed with Entra's keys,
fetched from the tenant's metadata at the bot's authority (see
:func:`client_api.teams.tokens.entra_authority`). Any application of the tenant can get
such a token for the bot's App ID, so one is accepted only from a caller (``azp``, v1
``appid``) listed in ``LAMINA_TEAMS__CHANNEL_APP_IDS``.

``anonymous_dev`` (the Bot Framework Emulator on one machine) lets a request without a
token through as anonymous, from any channel and to any service URL (its replies carry
no token); :func:`check_teams_settings` refuses it next to a secret and outside
``LAMINA_AUTH__MODE=dev``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import jwt

from client_api.auth.openid_keys import OpenIdKeySet
from client_api.settings import AuthSettings, TeamsSettings
from client_api.teams.tokens import entra_authority, token_endpoint

if TYPE_CHECKING:
    from microsoft_agents.hosting.core.authorization import ClaimsIdentity

log = logging.getLogger(__name__)

_ALGORITHMS = ["RS256"]
_METADATA_TTL_S = 3600.0
_REFRESH_FLOOR_S = 30.0
_NOT_VALID = "The token is not valid."
SERVICE_URL_CLAIM = "serviceurl"
TEAMS_CHANNEL_ID = "msteams"


class TeamsAuthError(Exception):
    """The request is not from the Bot Framework channel for this bot (401).

    The message is safe to return to the caller; :attr:`reason` (for the log) says
    which check failed.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def entra_issuers(tenant_id: str) -> tuple[str, str]:
    """The issuers of Entra ID tokens for ``tenant_id`` (v1 and v2 forms)."""
    return (
        f"https://sts.windows.net/{tenant_id}/",
        f"https://login.microsoftonline.com/{tenant_id}/v2.0",
    )


class BotFrameworkTokenValidator:
    """Checks the ``Authorization`` header of a Bot Framework request.

    Metadata and keys are cached for an hour and fetched again early when a token
    names an unknown key (rotation). An unreachable metadata endpoint with nothing
    cached raises :class:`~client_api.auth.openid_keys.IdentityProviderUnavailable`
    (a 503, not a 401).
    """

    def __init__(self, settings: TeamsSettings, http: httpx.AsyncClient) -> None:
        if not settings.app_id and not settings.anonymous_dev:
            raise ValueError("LAMINA_TEAMS__APP_ID is required to authenticate the channel")
        self._app_id = settings.app_id
        self._anonymous = settings.anonymous_dev
        self._leeway = settings.leeway_s
        self._callers = frozenset(settings.channel_app_ids)
        self._service_hosts = tuple(h.strip().lower() for h in settings.service_url_hosts)
        self._channel_issuers = frozenset(i.lower() for i in settings.issuers)
        self._channel_keys = OpenIdKeySet(
            settings.openid_config_url,
            http,
            ttl_s=_METADATA_TTL_S,
            refresh_floor_s=_REFRESH_FLOOR_S,
        )
        self._entra_issuers: frozenset[str] = frozenset()
        self._entra_keys: OpenIdKeySet | None = None
        if settings.app_tenant_id:
            self._entra_issuers = frozenset(
                i.lower() for i in entra_issuers(settings.app_tenant_id)
            )
            self._entra_keys = OpenIdKeySet(
                f"{entra_authority(token_endpoint(settings))}/v2.0/.well-known/openid-configuration",
                http,
                ttl_s=_METADATA_TTL_S,
                refresh_floor_s=_REFRESH_FLOOR_S,
            )

    async def validate(
        self,
        authorization: str | None,
        service_url: str | None,
        channel_id: str | None,
    ) -> dict[str, Any]:
        """The verified claims of the request's token; raises :class:`TeamsAuthError`.

        ``service_url`` and ``channel_id`` are the activity's ``serviceUrl`` and
        ``channelId``. With ``anonymous_dev`` a request without a token yields empty
        claims (see :func:`claims_identity`).
        """
        if not authorization or not authorization.strip():
            if self._anonymous:
                return {}
            raise TeamsAuthError("The request carries no bearer token.")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise TeamsAuthError("The Authorization header is not a bearer token.")
        if self._app_id is None:
            raise TeamsAuthError(_NOT_VALID, reason="a token arrived but no app id is configured")
        claims = await self._verify(token, self._app_id)
        self._check_caller(claims)
        self._check_service_url(claims, service_url)
        self._check_service_host(service_url or "")
        # A sub-channel ("msteams:<product>") is still Teams.
        if (channel_id or "").split(":", 1)[0] != TEAMS_CHANNEL_ID and not self._anonymous:
            raise TeamsAuthError(
                "This bot serves Microsoft Teams only.", reason=f"channelId {channel_id!r}"
            )
        return claims

    async def _verify(self, token: str, app_id: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TeamsAuthError("The bearer token is malformed.") from None
        # Checked before any key is touched: "none", and HS256 keyed with a public key
        # (algorithm confusion), never reach a verifier.
        if header.get("alg") not in _ALGORITHMS:
            raise TeamsAuthError(
                "The token's signing algorithm is not accepted.",
                reason=f"algorithm {header.get('alg')!r}",
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TeamsAuthError("The token names no signing key.")
        # The unverified issuer only picks whose keys to verify with; the issuer is
        # checked again below on the verified claims.
        key_set = self._key_set_for(unverified.get("iss"))
        keys = await key_set.for_kid(kid)
        key = keys.keys.get(kid)
        if key is None:
            raise TeamsAuthError(_NOT_VALID, reason=f"unknown signing key {kid!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=_ALGORITHMS,
                audience=app_id,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise TeamsAuthError("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise TeamsAuthError("The token is not valid yet.") from None
        except jwt.PyJWTError as exc:
            # Which check failed stays in the log: telling the caller would be an oracle.
            raise TeamsAuthError(_NOT_VALID, reason=str(exc)) from None
        if self._key_set_for(claims.get("iss")) is not key_set:
            raise TeamsAuthError(_NOT_VALID, reason="issuer changed under verification")
        return claims

    def _key_set_for(self, issuer: object) -> OpenIdKeySet:
        iss = issuer.lower() if isinstance(issuer, str) else None
        if iss in self._channel_issuers:
            return self._channel_keys
        if iss in self._entra_issuers and self._entra_keys is not None:
            return self._entra_keys
        raise TeamsAuthError(_NOT_VALID, reason=f"issuer {issuer!r} is not accepted")

    def _entra_issued(self, claims: dict[str, Any]) -> bool:
        return str(claims.get("iss", "")).lower() in self._entra_issuers

    def _check_caller(self, claims: dict[str, Any]) -> None:
        if not self._entra_issued(claims):
            return
        # v2 tokens name the calling application in azp, v1 tokens in appid.
        caller = claims.get("azp") if claims.get("ver") == "2.0" else claims.get("appid")
        if not isinstance(caller, str) or caller not in self._callers:
            raise TeamsAuthError(
                _NOT_VALID, reason=f"Entra-issued token from caller {caller!r}, not a channel"
            )

    def _check_service_host(self, service_url: str) -> None:
        if not service_url_allowed(service_url, self._service_hosts):
            raise TeamsAuthError(
                "The activity's service URL is not one this bot replies to.",
                reason=f"serviceUrl {service_url!r} is not on LAMINA_TEAMS__SERVICE_URL_HOSTS",
            )

    def _check_service_url(self, claims: dict[str, Any], service_url: str | None) -> None:
        claimed = claims.get(SERVICE_URL_CLAIM)
        if claimed is None and self._entra_issued(claims):
            # Entra-issued tokens of a single-tenant bot carry no serviceurl claim.
            return
        if not isinstance(claimed, str) or _url_key(claimed) != _url_key(service_url or ""):
            raise TeamsAuthError(
                "The token was not issued for this activity's service URL.",
                reason=f"serviceurl claim {claimed!r} != activity serviceUrl {service_url!r}",
            )


def _url_key(url: str) -> str:
    return url.strip().rstrip("/").lower()


def service_url_allowed(url: str, hosts: tuple[str, ...] | list[str]) -> bool:
    """Whether ``url`` is an https URL on one of ``hosts`` (``*.example.com`` matching its
    subdomains); an entry ``http://host`` also allows plain http to that host."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        _ = parts.port  # a malformed port raises
    except ValueError:
        return False
    if not host:
        return False
    for entry in hosts:
        entry = entry.strip().lower()
        schemes = {"https"}
        if entry.startswith("http://"):
            schemes, entry = {"http", "https"}, entry.removeprefix("http://").rstrip("/")
        if parts.scheme not in schemes:
            continue
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def claims_identity(claims: dict[str, Any]) -> ClaimsIdentity:
    """The SDK's identity for the verified ``claims``; empty claims (``anonymous_dev``)
    give the anonymous identity, whose replies the SDK sends without a token."""
    if not claims:
        return anonymous_identity()
    from microsoft_agents.hosting.core.authorization import ClaimsIdentity

    return ClaimsIdentity(claims=dict(claims), authentication_type="Bearer")


def anonymous_identity() -> ClaimsIdentity:
    """The identity of an unauthenticated request (``anonymous_dev`` only)."""
    from microsoft_agents.hosting.core.authorization import ClaimsIdentity

    return ClaimsIdentity(claims={}, authentication_type="anonymous")


def served_tenants(settings: TeamsSettings, auth: AuthSettings) -> frozenset[str]:
    """The tenants whose users the bot answers: ``LAMINA_AUTH__ALLOWED_TENANTS``, or else
    the bot's own tenant (empty for a multi-tenant bot, which
    :func:`check_teams_settings` refuses without an allow-list)."""
    if auth.allowed_tenants:
        return frozenset(auth.allowed_tenants)
    return frozenset({settings.app_tenant_id}) if settings.app_tenant_id else frozenset()


def check_teams_settings(settings: TeamsSettings, auth: AuthSettings) -> None:
    """Refuse, at start-up, a Teams configuration that cannot work or is unsafe."""
    if settings.anonymous_dev and settings.app_secret is not None:
        raise ValueError(
            "LAMINA_TEAMS__ANONYMOUS_DEV accepts unauthenticated requests and must not be "
            "combined with LAMINA_TEAMS__APP_SECRET (a registered bot): unset one of them"
        )
    if settings.anonymous_dev and auth.mode != "dev":
        raise ValueError(
            "LAMINA_TEAMS__ANONYMOUS_DEV accepts unauthenticated requests and is allowed only "
            "with LAMINA_AUTH__MODE=dev"
        )
    if not served_tenants(settings, auth):
        raise ValueError(
            "A multi-tenant bot (no LAMINA_TEAMS__APP_TENANT_ID) would answer users of any "
            "Entra tenant: list the tenants it serves in LAMINA_AUTH__ALLOWED_TENANTS"
        )
    if settings.anonymous_dev:
        return
    if not settings.app_id:
        raise ValueError(
            "LAMINA_TEAMS__APP_ID is required (the bot's Microsoft App ID) unless "
            "LAMINA_TEAMS__ANONYMOUS_DEV is set"
        )
    if settings.app_secret is None or not settings.app_secret.get_secret_value():
        raise ValueError(
            "LAMINA_TEAMS__APP_SECRET is required: replies go through the Bot Connector "
            "with a client-credentials token"
        )
    entra_authority(token_endpoint(settings))
