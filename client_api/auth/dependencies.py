"""The FastAPI dependency that turns a request into a :class:`Principal` (or a 401)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from client_api.auth.jwt import AuthenticationError, JwtValidator
from client_api.settings import AuthSettings
from intelligence.contracts import Principal

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="Entra ID (or any OpenID) access token")
_dev_user = APIKeyHeader(
    name="X-Lamina-User",
    auto_error=False,
    description="Dev mode only (LAMINA_AUTH__MODE=dev): the caller's user id",
)

DEV_MODE_WARNING = (
    "LAMINA_AUTH__MODE=dev: identity is taken from X-Lamina-* request headers WITHOUT "
    "verification. Anyone who can reach this server can act as any user. Demo use only."
)


class Authenticator:
    """Validates credentials according to the configured mode."""

    def __init__(self, settings: AuthSettings, validator: JwtValidator | None) -> None:
        self._settings = settings
        self._validator = validator
        if settings.mode == "dev":
            log.warning(DEV_MODE_WARNING)

    async def authenticate(self, request: Request, bearer: str | None) -> Principal:
        if self._settings.mode == "dev":
            return self._dev_principal(request)
        if not bearer:
            raise AuthenticationError("A bearer token is required.")
        assert self._validator is not None
        return await self._validator.principal(bearer)

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
        )


def _csv(value: str | None) -> frozenset[str]:
    return frozenset(v.strip() for v in (value or "").split(",") if v.strip())


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _dev: Annotated[str | None, Depends(_dev_user)],
) -> Principal:
    authenticator: Authenticator = request.app.state.authenticator
    token = credentials.credentials if credentials else None
    return await authenticator.authenticate(request, token)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
