"""Signing keys published through OpenID Connect metadata (``jwks_uri``), cached.

Shared by every bearer-token validator at the edge (Entra ID for the API, the Bot
Framework channel for Teams). The key set is fetched once, kept for ``ttl_s``, and
fetched again early when a token names a key id we do not know yet (key rotation),
at most once per ``refresh_floor_s`` so a flood of forged kids cannot hammer the
identity provider. While the provider is down, keys already trusted stay in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import jwt

log = logging.getLogger(__name__)


class IdentityProviderUnavailable(Exception):
    """OpenID metadata or keys could not be fetched: fail closed (503, not 401)."""


@dataclass(frozen=True, slots=True)
class OpenIdKeys:
    """One fetched key set; a new object after every successful fetch, so a caller
    can tell (by identity) whether what it derived from a key set is still current."""

    issuer: str
    """The ``issuer`` the metadata publishes."""
    keys: Mapping[str, jwt.PyJWK]
    """Signing keys by ``kid``."""


class OpenIdKeySet:
    """The current :class:`OpenIdKeys` of one OpenID metadata document."""

    def __init__(
        self,
        config_url: str,
        http: httpx.AsyncClient,
        *,
        ttl_s: float,
        refresh_floor_s: float = 30.0,
    ) -> None:
        self._config_url = config_url
        self._http = http
        self._ttl = ttl_s
        self._floor = refresh_floor_s
        self._current: OpenIdKeys | None = None
        self._fetched_at = 0.0
        self._attempted_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def current(self) -> OpenIdKeys | None:
        """The key set in use, without fetching; ``None`` before the first fetch."""
        return self._current

    async def for_kid(self, kid: str) -> OpenIdKeys:
        """The key set to verify a token signed with ``kid``: the cached one while it is
        fresh and knows ``kid``, else a newly fetched one (it may still lack ``kid``).

        Raises :class:`IdentityProviderUnavailable` when nothing has ever been fetched.
        """
        async with self._lock:
            now = time.monotonic()
            cached = self._current
            if (
                cached is None
                or now - self._fetched_at > self._ttl
                or (kid not in cached.keys and now - self._attempted_at > self._floor)
            ):
                self._attempted_at = now
                try:
                    self._current = await self._fetch()
                    self._fetched_at = now
                except IdentityProviderUnavailable:
                    if cached is None:
                        raise
                    # Keep the keys we already trust while the provider is down, and try
                    # again after the refresh floor, not on every request.
                    log.warning("OpenID metadata refresh failed; using cached keys")
                    self._fetched_at = now - self._ttl + self._floor
            assert self._current is not None
            return self._current

    async def _fetch(self) -> OpenIdKeys:
        try:
            meta = (await self._http.get(self._config_url)).raise_for_status().json()
            issuer, jwks_uri = meta["issuer"], meta["jwks_uri"]
            if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
                raise ValueError("issuer and jwks_uri must be strings")
            jwks = (await self._http.get(jwks_uri)).raise_for_status().json()
            key_set = jwt.PyJWKSet.from_dict(jwks)
        except (httpx.HTTPError, KeyError, TypeError, ValueError, jwt.PyJWTError) as exc:
            raise IdentityProviderUnavailable(str(exc)) from exc
        return OpenIdKeys(issuer=issuer, keys={k.key_id: k for k in key_set.keys if k.key_id})
