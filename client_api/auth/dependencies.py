"""FastAPI dependencies: a request becomes a :class:`Principal` (or a 401), and a route
gets it only if the principal holds the route's permission (or a 403).

Routes declare what they need with an alias: ``principal: ChatCaller``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry.trace import Span

from client_api.auth.api_keys import looks_like_api_key
from client_api.auth.jwt import AuthenticationError, JwtValidator
from client_api.auth.permissions import Permission, PermissionDenied, PermissionPolicy
from client_api.edge.admission import admit
from client_api.edge.telemetry import AUTH_METHOD, TENANT_ID, RefusalReason, authentication_span
from client_api.problems import Problem
from client_api.settings import AuthSettings
from intelligence.contracts import Principal

log = logging.getLogger(__name__)

API_KEY_HEADERS = ("api-key", "X-API-Key")
"""Headers an API key may come in: Azure OpenAI's clients send ``api-key``."""

_bearer = HTTPBearer(
    auto_error=False, description="Entra ID (or any OpenID) access token, or a lam_ API key"
)
# Each header its own scheme name: FastAPI names a scheme after its class by default, and
# three ``APIKeyHeader`` would collapse into one scheme describing only the last header.
_api_key = APIKeyHeader(
    name="api-key", scheme_name="ApiKey", auto_error=False, description="A Lamina API key"
)
_x_api_key = APIKeyHeader(
    name="X-API-Key", scheme_name="XApiKey", auto_error=False, description="A Lamina API key"
)
_dev_user = APIKeyHeader(
    name="X-Lamina-User",
    scheme_name="DevUser",
    auto_error=False,
    description="Dev mode only (LAMINA_AUTH__MODE=dev): the caller's user id",
)

DEV_MODE_WARNING = (
    "LAMINA_AUTH__MODE=dev: identity is taken from X-Lamina-* request headers WITHOUT "
    "verification. Anyone who can reach this server can act as any user. Demo use only."
)
_INVALID_KEY = "The API key is not valid."


class ApiKeyAuthenticator(Protocol):
    """Resolves a presented API key to the principal it was issued to."""

    async def authenticate(self, presented: str) -> Principal | None:
        """The key's principal; ``None`` when the key is unknown, revoked or expired."""
        ...


class Authenticator:
    """Validates credentials according to the configured mode, and holds the permission
    policy routes are checked against. API keys work in both modes."""

    def __init__(
        self,
        settings: AuthSettings,
        validator: JwtValidator | None,
        *,
        api_keys: ApiKeyAuthenticator | None = None,
    ) -> None:
        self._settings = settings
        self._validator = validator
        self._api_keys = api_keys
        self.policy = PermissionPolicy.from_settings(settings)
        if settings.mode == "dev":
            log.warning(DEV_MODE_WARNING)

    async def authenticate(self, request: Request, bearer: str | None) -> Principal:
        with authentication_span(_unauthenticated) as span:
            principal = await self._authenticate(request, bearer, span)
            span.set_attribute(TENANT_ID, principal.tenant_id)
            return principal

    async def _authenticate(self, request: Request, bearer: str | None, span: Span) -> Principal:
        key = _presented_api_key(request, bearer)
        if key is not None:
            span.set_attribute(AUTH_METHOD, "api_key")
            return await self._api_key_principal(key)
        if self._settings.mode == "dev":
            span.set_attribute(AUTH_METHOD, "dev")
            return self._dev_principal(request)
        span.set_attribute(AUTH_METHOD, "jwt")
        if not bearer:
            raise AuthenticationError(
                "A bearer token or an API key is required."
                if self._api_keys is not None
                else "A bearer token is required."
            )
        assert self._validator is not None
        return await self._validator.principal(bearer)

    async def _api_key_principal(self, key: str) -> Principal:
        if self._api_keys is None:
            raise AuthenticationError("API keys are not accepted by this server.")
        principal = await self._api_keys.authenticate(key)
        if principal is None:
            raise AuthenticationError(_INVALID_KEY)
        # How the caller proved who they are is known here, whatever the key store says;
        # the permission policy grants no default roles to keys.
        if principal.auth_method != "api_key":
            principal = dataclasses.replace(principal, auth_method="api_key")
        return principal

    def _dev_principal(self, request: Request) -> Principal:
        user = request.headers.get("X-Lamina-User", "").strip()
        if not user:
            raise AuthenticationError("Dev mode: send the X-Lamina-User header.")
        return Principal(
            tenant_id=request.headers.get("X-Lamina-Tenant", "").strip()
            or self._settings.dev_tenant,
            user_id=user,
            groups=_csv(request.headers.get("X-Lamina-Groups")),
            roles=_csv(request.headers.get("X-Lamina-Roles")),
            auth_method="dev",
        )


def _unauthenticated(exc: Exception) -> RefusalReason | None:
    return RefusalReason.UNAUTHENTICATED if isinstance(exc, AuthenticationError) else None


def _presented_api_key(request: Request, bearer: str | None) -> str | None:
    """The API key the request carries, if any; two different credentials are refused
    rather than guessing which one the caller meant."""
    presented = {v.strip() for name in API_KEY_HEADERS if (v := request.headers.get(name))}
    presented.discard("")
    if bearer and looks_like_api_key(bearer):
        presented.add(bearer)
    elif bearer and presented:
        raise AuthenticationError("Send either a bearer token or an API key, not both.")
    if len(presented) > 1:
        raise AuthenticationError("Send one API key, not several.")
    return presented.pop() if presented else None


def _csv(value: str | None) -> frozenset[str]:
    return frozenset(v.strip() for v in (value or "").split(",") if v.strip())


def bearer_token(request: Request) -> str | None:
    """The bearer token of the ``Authorization`` header, read as ``HTTPBearer`` with
    ``auto_error=False`` reads it: ``None`` when the header is missing or empty, names
    another scheme, or carries no credentials."""
    scheme, _, credentials = (request.headers.get("Authorization") or "").partition(" ")
    credentials = credentials.strip()
    if not (scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _key: Annotated[str | None, Depends(_api_key)],
    _x_key: Annotated[str | None, Depends(_x_api_key)],
    _dev: Annotated[str | None, Depends(_dev_user)],
) -> Principal:
    """The authenticated caller, whatever it may do (routes want a permission alias)."""
    token = credentials.credentials if credentials else None
    return await _authenticator(request).authenticate(request, token)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(permission: Permission) -> Callable[[Request, Principal], Awaitable[Principal]]:
    """A dependency giving the caller only if it holds ``permission`` (403 otherwise) and
    is within its requests-per-minute limits (429 otherwise)."""

    async def authorized(request: Request, principal: CurrentPrincipal) -> Principal:
        return await _authorize(request, principal, permission)

    authorized.__name__ = f"require_{permission.name.lower()}"
    return authorized


def require_from_headers(permission: Permission) -> Callable[[Request], Awaitable[Principal]]:
    """``require(permission)`` as a single dependency that reads the credentials from the
    request itself: the same authentication, permission check and limits, refusals and
    problems, without resolving the security schemes and ``current_principal`` as
    dependencies of their own on every request (FastAPI's cost per dependency dominates a
    passthrough). FastAPI then no longer sees the schemes: a route using it declares them
    with ``openapi_extra=CREDENTIALS_OPENAPI``, so its OpenAPI operation is unchanged."""

    async def authorized(request: Request) -> Principal:
        principal = await _authenticator(request).authenticate(request, bearer_token(request))
        return await _authorize(request, principal, permission)

    authorized.__name__ = f"require_{permission.name.lower()}_from_headers"
    return authorized


CREDENTIALS_OPENAPI: dict[str, Any] = {
    "security": [{scheme.scheme_name: []} for scheme in (_bearer, _api_key, _x_api_key, _dev_user)]
}
"""The security requirements ``current_principal``'s schemes give an operation, in order."""


async def _authorize(request: Request, principal: Principal, permission: Permission) -> Principal:
    try:
        _authenticator(request).policy.check(principal, permission)
    except PermissionDenied as denied:
        log.info(
            "refused %s/%s (%s): %s",
            principal.tenant_id,
            principal.user_id,
            principal.auth_method,
            denied.message,
        )
        raise _forbidden(denied) from None
    # The edge gate: requests-per-minute (a no-op while no limit is configured).
    await admit(request, principal)
    return principal


def _forbidden(denied: PermissionDenied) -> Problem:
    if denied.required_scopes:
        scope = " ".join(denied.required_scopes)
        return Problem(
            403,
            "Forbidden",
            denied.message,
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            extra={"required_scopes": list(denied.required_scopes)},
        )
    assert denied.permission is not None
    return Problem(
        403, "Forbidden", denied.message, extra={"missing_permission": denied.permission.value}
    )


ChatCaller = Annotated[Principal, Depends(require(Permission.CHAT))]
"""A caller who may chat (POST /v1/chat, /v1/chat/stream)."""
ConversationsCaller = Annotated[Principal, Depends(require(Permission.CONVERSATIONS))]
"""A caller who may list, read and delete their own conversations."""
OpenAICaller = Annotated[Principal, Depends(require_from_headers(Permission.MODELS))]
"""A caller of the OpenAI-compatible /v1/chat/completions and /v1/models, in one
dependency (those routes declare ``openapi_extra=CREDENTIALS_OPENAPI``)."""
UsageAdmin = Annotated[Principal, Depends(require(Permission.USAGE_READ))]
"""A caller who may read the tenant's usage and cost."""
KeysAdmin = Annotated[Principal, Depends(require(Permission.KEYS_MANAGE))]
"""A caller who may manage API keys."""
