"""Group memberships for tokens whose ``groups`` claim overflowed.

Entra ID puts at most about 200 group ids in a token (fewer in some flows);
beyond that it leaves the claim out and marks the overage instead
(``hasgroups: true``, or ``_claim_names`` naming ``groups``). Groups decide what
a caller may retrieve, so such a caller's groups are read from Microsoft Graph,
cached for a while per (tenant, user), and when they cannot be read the request
is refused (:class:`GroupsUnavailable`, a 503): an empty group set would quietly
hide documents, a guessed one could show the wrong ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import httpx
from cachetools import TTLCache

if TYPE_CHECKING:
    from azure.identity.aio import DefaultAzureCredential

    from client_api.settings import AuthSettings

log = logging.getLogger(__name__)

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
_CACHE_SIZE = 10_000
# 999 ids a page (Graph's maximum) times 100 pages is far beyond any real membership;
# the bound stops a misbehaving server from keeping a request busy forever.
_MAX_PAGES = 100


class GroupsUnavailable(Exception):
    """The caller's group memberships could not be read: fail closed (503, not an empty set)."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class GroupResolver(Protocol):
    """Where the groups of a caller whose token could not carry them all come from."""

    async def groups(self, tenant_id: str, user_id: str) -> frozenset[str]:
        """The ids of every group ``user_id`` belongs to, directly or through other groups.

        Raises :class:`GroupsUnavailable` when they cannot be read.
        """
        ...


class GraphTokenProvider(Protocol):
    """An access token for Microsoft Graph in a tenant (the app's own, not the caller's)."""

    async def token(self, tenant_id: str) -> str: ...


class AzureCredentialGraphToken:
    """Graph tokens from ``DefaultAzureCredential`` (managed identity in Azure, the
    developer's sign-in elsewhere). The app needs the ``GroupMember.Read.All``
    application permission, consented in every tenant it serves."""

    def __init__(self) -> None:
        self._credential: DefaultAzureCredential | None = None

    async def token(self, tenant_id: str) -> str:
        # Imported here: azure-identity is slow to import and only overage tokens need it.
        from azure.core.exceptions import AzureError
        from azure.identity.aio import DefaultAzureCredential

        if self._credential is None:
            # Any tenant may be asked for: only tenants the validator allowed get here.
            self._credential = DefaultAzureCredential(additionally_allowed_tenants=["*"])
        try:
            access = await self._credential.get_token(GRAPH_SCOPE, tenant_id=tenant_id)
        except AzureError as exc:
            raise GroupsUnavailable(f"no Graph token for tenant {tenant_id}: {exc}") from exc
        return access.token

    async def aclose(self) -> None:
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


class GraphGroupResolver:
    """Transitive group memberships from Microsoft Graph, cached per (tenant, user).

    Concurrent requests of one user share one Graph call: a client's first burst
    would otherwise multiply the calls, and Graph throttles per app.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        token_provider: GraphTokenProvider,
        *,
        base_url: str = "https://graph.microsoft.com",
        cache_ttl_s: float = 300.0,
        cache_size: int = _CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._token_provider = token_provider
        self._base = httpx.URL(base_url.rstrip("/") + "/")
        self._cache: TTLCache[tuple[str, str], frozenset[str]] = TTLCache(
            maxsize=cache_size, ttl=cache_ttl_s, timer=clock
        )
        self._inflight: dict[tuple[str, str], asyncio.Future[frozenset[str]]] = {}

    @classmethod
    def from_settings(
        cls, settings: AuthSettings, http: httpx.AsyncClient, token_provider: GraphTokenProvider
    ) -> GraphGroupResolver:
        return cls(
            http,
            token_provider,
            base_url=settings.graph_base_url,
            cache_ttl_s=settings.group_cache_ttl_s,
        )

    async def groups(self, tenant_id: str, user_id: str) -> frozenset[str]:
        key = (tenant_id, user_id)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch(tenant_id, user_id))
            self._inflight[key] = fetch
            fetch.add_done_callback(partial(self._settled, key))
        # shield: one caller hanging up must not cancel the fetch the others wait for.
        return await asyncio.shield(fetch)

    def _settled(self, key: tuple[str, str], fetch: asyncio.Future[frozenset[str]]) -> None:
        self._inflight.pop(key, None)
        if fetch.cancelled():
            return
        if fetch.exception() is None:  # also marks a failure as seen when no one waits
            self._cache[key] = fetch.result()

    async def _fetch(self, tenant_id: str, user_id: str) -> frozenset[str]:
        token = await self._token_provider.token(tenant_id)
        headers = {"Authorization": f"Bearer {token}"}
        url: httpx.URL | None = self._base.join(
            f"v1.0/users/{quote(user_id, safe='')}/transitiveMemberOf/microsoft.graph.group"
            "?$select=id&$top=999"
        )
        groups: set[str] = set()
        pages = 0
        while url is not None:
            if pages == _MAX_PAGES:
                raise GroupsUnavailable(f"more than {_MAX_PAGES} pages of groups")
            page = await self._page(url, headers)
            pages += 1
            groups.update(_group_ids(page.get("value")))
            url = self._next_link(page.get("@odata.nextLink"))
        log.debug("resolved %d groups of %s/%s from Graph", len(groups), tenant_id, user_id)
        return frozenset(groups)

    async def _page(self, url: httpx.URL, headers: dict[str, str]) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise GroupsUnavailable(f"Graph unreachable: {exc!r}") from exc
        if response.status_code != 200:
            # Not the URL: its path names the user, and the error is recorded in spans.
            raise GroupsUnavailable(
                f"Graph answered {response.status_code} to a group look-up",
                retry_after_s=_retry_after(response),
            )
        try:
            page = response.json()
        except ValueError as exc:
            raise GroupsUnavailable("Graph answered with something other than JSON") from exc
        if not isinstance(page, dict):
            raise GroupsUnavailable("Graph answered with an unexpected shape")
        return page

    def _next_link(self, link: object) -> httpx.URL | None:
        if link is None:
            return None
        if not isinstance(link, str):
            raise GroupsUnavailable("Graph sent a next link that is not a string")
        url = httpx.URL(link)
        # The next page is fetched with our Graph token: never send it anywhere else.
        base = self._base
        if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
            raise GroupsUnavailable(f"Graph's next link leaves {self._base.host}: {url.host}")
        return url


def _group_ids(value: object) -> list[str]:
    if not isinstance(value, list):
        raise GroupsUnavailable("Graph's page has no list of groups")
    return [
        item["id"] for item in value if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
