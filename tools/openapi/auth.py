"""Credentials an OpenAPI source's calls carry: an API key, a bearer token, or an
Entra ID token (client credentials through azure-identity)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from tools.settings import OpenApiSourceSettings

TOKEN_REFRESH_MARGIN_S = 300.0
"""Renew an Entra token this long before it expires, so none expires in flight."""


class AccessTokenLike(Protocol):
    """What ``azure.core.credentials.AccessToken`` offers."""

    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> int: ...


class TokenCredential(Protocol):
    """An async azure-identity credential (``azure.identity.aio.*``), or a test double."""

    async def get_token(self, *scopes: str) -> AccessTokenLike: ...


class EntraTokens:
    """Tokens for one scope, fetched once and reused until shortly before they expire."""

    def __init__(self, credential: TokenCredential, scope: str) -> None:
        self._credential = credential
        self._scope = scope
        self._token: AccessTokenLike | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> str | None:
        token = self._token
        if token is not None and token.expires_on - TOKEN_REFRESH_MARGIN_S > time.time():
            return token.token
        return None

    async def token(self) -> str:
        cached = self._fresh()
        if cached is not None:
            return cached
        # One request for a new token, however many calls are waiting for it.
        async with self._lock:
            cached = self._fresh()
            if cached is None:
                self._token = await self._credential.get_token(self._scope)
                cached = self._token.token
            return cached


class SourceAuth:
    """The credential headers of one source's requests (see ``OpenApiSourceSettings.auth``)."""

    def __init__(
        self, settings: OpenApiSourceSettings, credential: TokenCredential | None = None
    ) -> None:
        self._static: dict[str, str] = {}
        self._entra: EntraTokens | None = None
        if settings.auth == "api_key" and settings.api_key is not None:
            self._static[settings.api_key_header] = settings.api_key.get_secret_value()
        elif settings.auth == "bearer" and settings.bearer_token is not None:
            self._static["Authorization"] = f"Bearer {settings.bearer_token.get_secret_value()}"
        elif settings.auth == "entra" and settings.entra_scope is not None:
            if credential is None:
                raise ValueError("auth 'entra' needs a credential")
            self._entra = EntraTokens(credential, settings.entra_scope)

    @property
    def header_names(self) -> frozenset[str]:
        """The headers the credentials occupy (lower case)."""
        names = {name.lower() for name in self._static}
        return frozenset(names | ({"authorization"} if self._entra is not None else set()))

    async def headers(self) -> dict[str, str]:
        if self._entra is None:
            return dict(self._static)
        return {**self._static, "Authorization": f"Bearer {await self._entra.token()}"}
