"""Outbound tokens: the bot's replies reach the Bot Connector with a client-credentials token.

:class:`BotTokenProvider` is the Agents SDK's token provider for the bot's one
connection. It asks Entra ID (``LAMINA_TEAMS__TOKEN_URL``, by default the endpoint of
``LAMINA_TEAMS__APP_TENANT_ID`` or of the ``botframework.com`` tenant) for a token for
``LAMINA_TEAMS__SCOPE`` with the bot's App ID and secret, through MSAL, off the event
loop, and keeps it until shortly before it expires.

MSAL accepts only an ``https`` authority, so the token URL must be https (tests run
their token endpoint with a local CA). Instance discovery is off: the authority is
the one configured, never looked up at ``login.microsoftonline.com``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from client_api.settings import TeamsSettings

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken
    from microsoft_agents.hosting.core.authorization import (
        AccessTokenProviderBase,
        AgentAuthConfiguration,
        Connections,
    )

log = logging.getLogger(__name__)

_TOKEN_TIMEOUT_S = 10.0
"""How long one call to the token endpoint may take."""

_TOKEN_PATH = "/oauth2/v2.0/token"
_REFRESH_MARGIN_S = 300.0
"""A token is replaced this long before it expires (or at half its life, if sooner)."""


class BotTokenError(Exception):
    """No token for the Bot Connector: the endpoint refused the credentials or is
    unreachable. The message names no secret."""


def token_endpoint(settings: TeamsSettings) -> str:
    """The OAuth token endpoint of the bot's tenant."""
    if settings.token_url:
        return settings.token_url
    tenant = settings.app_tenant_id or "botframework.com"
    return f"https://login.microsoftonline.com/{tenant}{_TOKEN_PATH}"


def entra_authority(token_url: str) -> str:
    """The Entra authority (``https://host/<tenant>``) whose token endpoint ``token_url`` is."""
    parts = urlsplit(token_url)
    if parts.scheme != "https" or not parts.hostname or not parts.path.endswith(_TOKEN_PATH):
        raise ValueError(
            f"LAMINA_TEAMS__TOKEN_URL must be an Entra v2 token endpoint, "
            f"https://<host>/<tenant>{_TOKEN_PATH}; got {token_url!r}"
        )
    path = parts.path.removesuffix(_TOKEN_PATH).rstrip("/")
    if not path:
        raise ValueError(f"LAMINA_TEAMS__TOKEN_URL names no tenant: {token_url!r}")
    return f"https://{parts.netloc}{path}"


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float
    expires_at: float


class BotTokenProvider:
    """The SDK's ``AccessTokenProviderBase`` for the bot's own client credentials.

    Every token is for ``LAMINA_TEAMS__SCOPE``, whatever scopes the SDK asks for: the SDK
    derives them from the inbound claims (an Entra-issued token would make it ask for a
    token for the *caller's* app), while the bot only ever talks to the Bot Connector.

    ``ca_bundle`` trusts another CA for the token endpoint (tests); ``REQUESTS_CA_BUNDLE``
    does the same from the environment.
    """

    def __init__(
        self,
        settings: TeamsSettings,
        configuration: AgentAuthConfiguration | None = None,
        *,
        ca_bundle: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Not checked here: with anonymous_dev the SDK builds this provider but never
        # asks it for a token; check_teams_settings refuses a registered bot without them.
        self._client_id = settings.app_id
        self._secret = settings.app_secret
        self._authority = entra_authority(token_endpoint(settings))
        self._scope = settings.scope
        self._tenant_id = settings.app_tenant_id
        self._configuration = configuration
        self._ca_bundle = ca_bundle
        self._clock = clock
        self._app: Any = None  # msal.ConfidentialClientApplication, built on first use
        self._token: _Token | None = None
        self._lock = asyncio.Lock()

    @property
    def configuration(self) -> AgentAuthConfiguration:
        """The SDK configuration of the connection (built from settings when none was given)."""
        if self._configuration is None:
            from microsoft_agents.hosting.core.authorization import AgentAuthConfiguration

            self._configuration = AgentAuthConfiguration(
                client_id=self._client_id,
                tenant_id=self._tenant_id,
                scopes=[self._scope],
            )
        return self._configuration

    async def get_access_token(
        self, resource_url: str, scopes: list[str], force_refresh: bool = False
    ) -> str:
        """A token for the Bot Connector (``resource_url`` and ``scopes`` are not used:
        see the class docstring). Raises :class:`BotTokenError`."""
        if scopes and scopes != [self._scope]:
            log.debug(
                "token for %s asked with scopes %s; using %s", resource_url, scopes, self._scope
            )
        cached = self._token
        if not force_refresh and cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        async with self._lock:
            cached = self._token
            # Another caller may have refreshed it while this one waited for the lock.
            if not force_refresh and cached is not None and self._clock() < cached.refresh_at:
                return cached.value
            try:
                # MSAL blocks in a worker thread; a token endpoint that never answers must
                # not hold the lock (and every reply behind it) for good.
                self._token = await asyncio.wait_for(
                    asyncio.to_thread(self._acquire, force_refresh), _TOKEN_TIMEOUT_S + 5
                )
            except TimeoutError:
                raise BotTokenError("The bot's token endpoint did not answer in time.") from None
            return self._token.value

    def _acquire(self, force_refresh: bool) -> _Token:
        import msal
        import requests

        if not self._client_id or self._secret is None:
            raise BotTokenError("The bot has no App ID and secret to reply with.")
        started = self._clock()
        try:
            if self._app is None:
                # Construction fetches the tenant's OpenID metadata: it is I/O, kept here
                # off the event loop, and retried on the next call if it fails.
                self._app = msal.ConfidentialClientApplication(
                    self._client_id,
                    client_credential=self._secret.get_secret_value(),
                    authority=self._authority,
                    instance_discovery=False,
                    http_client=_Session(self._ca_bundle) if self._ca_bundle else None,
                    timeout=_TOKEN_TIMEOUT_S,
                )
            if force_refresh:
                self._app.remove_tokens_for_client()
            result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self._scope])
        except (requests.RequestException, ValueError) as exc:
            log.warning("token endpoint of %s unreachable: %s", self._authority, exc)
            raise BotTokenError("The bot's token endpoint could not be reached.") from None
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            log.warning(
                "token endpoint refused the bot's credentials: %s: %s",
                result.get("error"),
                result.get("error_description"),
            )
            raise BotTokenError(
                f"The bot's token endpoint refused its credentials ({result.get('error')})."
            )
        lifetime = float(result.get("expires_in") or 0)
        expires_at = started + lifetime
        return _Token(
            value=token,
            refresh_at=expires_at - min(_REFRESH_MARGIN_S, lifetime / 2),
            expires_at=expires_at,
        )

    def get_token_credential(self) -> _BotTokenCredential:
        """An ``AsyncTokenCredential`` over this provider (for SDK clients that take one)."""
        return _BotTokenCredential(self)

    async def acquire_token_on_behalf_of(self, scopes: list[str], user_assertion: str) -> str:
        raise NotImplementedError(
            "On-behalf-of user tokens (SDK user authorization / SSO) are not used by Lamina's "
            "Teams bot: it acts with its own client credentials only"
        )

    async def get_agentic_application_token(
        self, tenant_id: str, agent_app_instance_id: str
    ) -> str | None:
        raise NotImplementedError(_NO_AGENTIC)

    async def get_agentic_instance_token(
        self, tenant_id: str, agent_app_instance_id: str
    ) -> tuple[str, str]:
        raise NotImplementedError(_NO_AGENTIC)

    async def get_agentic_user_token(
        self,
        tenant_id: str,
        agent_app_instance_id: str,
        agentic_user_id: str,
        scopes: list[str],
    ) -> str | None:
        raise NotImplementedError(_NO_AGENTIC)


_NO_AGENTIC = (
    "Agentic identities (Entra agent IDs) are not supported by Lamina's Teams bot: it is a "
    "classic bot registration with an App ID and secret"
)


class _BotTokenCredential:
    """``azure.core``'s ``AsyncTokenCredential`` shape over a :class:`BotTokenProvider`."""

    def __init__(self, provider: BotTokenProvider) -> None:
        self._provider = provider

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        from azure.core.credentials import AccessToken

        value = await self._provider.get_access_token("", list(scopes))
        token = self._provider._token
        expires_on = int(token.expires_at) if token is not None else int(time.time())
        return AccessToken(value, expires_on)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> _BotTokenCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        pass


class _Session:
    """The HTTP client MSAL takes, trusting ``ca_bundle``: per request, since requests
    lets ``REQUESTS_CA_BUNDLE`` override a session's own ``verify``."""

    def __init__(self, ca_bundle: str) -> None:
        import requests

        self._session = requests.Session()
        self._ca_bundle = ca_bundle

    def get(self, url: str, **kwargs: Any) -> Any:
        return self._session.get(url, verify=self._ca_bundle, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self._session.post(url, verify=self._ca_bundle, **kwargs)

    def close(self) -> None:
        self._session.close()


def provider_factory(
    settings: TeamsSettings, *, ca_bundle: str | None = None
) -> Callable[[AgentAuthConfiguration], AccessTokenProviderBase]:
    """What the SDK's ``ConnectionManager`` calls to build each connection's provider."""

    def build(configuration: AgentAuthConfiguration) -> AccessTokenProviderBase:
        return BotTokenProvider(settings, configuration, ca_bundle=ca_bundle)

    return build


def connection_manager(settings: TeamsSettings, *, ca_bundle: str | None = None) -> Connections:
    """The SDK's connection manager with the bot's one connection (``SERVICE_CONNECTION``)."""
    from microsoft_agents.hosting.core.authorization import (
        AgentAuthConfiguration,
        ConnectionManager,
    )

    configuration = AgentAuthConfiguration(
        client_id=settings.app_id,
        tenant_id=settings.app_tenant_id,
        scopes=[settings.scope],
    )
    return ConnectionManager(
        provider_factory(settings, ca_bundle=ca_bundle),
        connections_configurations={"SERVICE_CONNECTION": configuration},
    )
