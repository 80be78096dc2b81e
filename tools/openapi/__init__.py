"""OpenAPI 3 documents as tools (``LAMINA_TOOLS__OPENAPI``).

The composition root calls :func:`load_openapi_tools` once per
:class:`~tools.settings.OpenApiSourceSettings` at start-up, registers the result
(an iterable of tools) like any tool source, and closes it at shutdown::

    loaded = await load_openapi_tools(source, settings.tools.http)
    stack.push_async_callback(loaded.aclose)
    extra.append(loaded)

Each operation becomes one tool named ``<source>-<operationId>`` (see
:mod:`tools.openapi.document` for the arguments schema), with risk from
``operation_risks`` (default read for GET/HEAD/OPTIONS, write otherwise). Its calls
go to ``base_url`` (default the document's first server) through the guarded HTTP
client (:mod:`tools.http`); only when ``trusted_private_network`` is set may that
host be on a private network. A document that cannot be used raises
:class:`OpenApiSourceError`, naming the source, so the service refuses to start
rather than run without the tools an operator configured.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpcore
import httpx

from tools.contracts import DEFAULT_TOOL_TIMEOUT_S
from tools.http import (
    GuardedHttpClient,
    GuardedHttpError,
    Resolver,
    UnsafeUrl,
    normalise_host,
)
from tools.openapi.auth import SourceAuth, TokenCredential
from tools.openapi.document import (
    InvalidDocument,
    Operation,
    ParsedDocument,
    SkippedOperation,
    read_document,
    tool_name,
)
from tools.openapi.tool import OpenApiTool, tool_spec
from tools.settings import HttpSettings, OpenApiSourceSettings

__all__ = [
    "OpenApiSourceError",
    "OpenApiTool",
    "OpenApiTools",
    "TokenCredential",
    "load_openapi_tools",
]

logger = logging.getLogger(__name__)

_DOCUMENT_ACCEPT = "application/json, application/yaml;q=0.9, text/yaml;q=0.9, */*;q=0.1"


class OpenApiSourceError(ValueError):
    """An OpenAPI source cannot be used; the message names the source and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"OpenAPI source {source!r}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(eq=False)
class OpenApiTools:
    """The tools of one OpenAPI source, and the HTTP client (and credential) they share.

    Iterating gives the tools, so it can be registered like any list of tools.
    :meth:`aclose` releases the connections (and a credential it created).
    """

    source: str
    tools: tuple[OpenApiTool, ...]
    skipped: tuple[SkippedOperation, ...]
    """Operations of the document that could not be offered, and why."""
    http: GuardedHttpClient
    close_credential: Callable[[], Awaitable[None]] | None = None

    def __iter__(self) -> Iterator[OpenApiTool]:
        return iter(self.tools)

    def __len__(self) -> int:
        return len(self.tools)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.close_credential is not None:
            await self.close_credential()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def load_openapi_tools(
    source: OpenApiSourceSettings,
    http: HttpSettings,
    *,
    credential: TokenCredential | None = None,
    resolver: Resolver | None = None,
    connector: httpcore.AsyncNetworkBackend | None = None,
) -> OpenApiTools:
    """Read ``source``'s document and make one tool per (selected) operation.

    Args:
        source: the source's settings.
        http: the guarded HTTP client's settings (allow-list, caps).
        credential: for ``auth: entra``, an async azure-identity credential; default a
            ``DefaultAzureCredential`` (environment, workload or managed identity),
            created here and closed by :meth:`OpenApiTools.aclose`.
        resolver, connector: for tests, see :class:`~tools.http.GuardedHttpClient`.

    Raises:
        OpenApiSourceError: the document cannot be read or is not valid OpenAPI 3;
            the base URL is missing or refused; ``operations`` or ``operation_risks``
            name an operation the document does not have (a typo must not leave a
            risky operation at its default risk); no operation is left to offer.
    """
    close_credential: Callable[[], Awaitable[None]] | None = None
    if source.auth == "entra" and credential is None:
        # Imported here: azure-identity costs start-up time only where it is used.
        from azure.identity.aio import DefaultAzureCredential

        default = DefaultAzureCredential()
        credential, close_credential = default, default.close
    client: GuardedHttpClient | None = None
    try:
        auth = SourceAuth(source, credential)
        raw, document_url = await _read(source, http, auth, resolver, connector)
        try:
            parsed = await asyncio.to_thread(
                functools.partial(
                    read_document, raw, document_url, reserved_headers=auth.header_names
                )
            )
        except InvalidDocument as exc:
            raise OpenApiSourceError(source.name, f"{source.spec}: {exc}") from None
        base_url = _base_url(source, parsed)
        trusted = (
            (normalise_host(httpx.URL(base_url).host),) if source.trusted_private_network else ()
        )
        client = GuardedHttpClient(
            http, trusted_hosts=trusted, resolver=resolver, connector=connector
        )
        await _check_base_url(source, base_url, client)
        tools = _tools(source, parsed, base_url, client, auth)
        logger.info(
            "OpenAPI source %r (%s): %d tools for %s",
            source.name,
            parsed.title,
            len(tools),
            base_url,
        )
        return OpenApiTools(
            source=source.name,
            tools=tools,
            skipped=parsed.skipped,
            http=client,
            close_credential=close_credential,
        )
    except BaseException:
        if client is not None:
            await client.aclose()
        if close_credential is not None:
            await close_credential()
        raise


async def _read(
    source: OpenApiSourceSettings,
    http: HttpSettings,
    auth: SourceAuth,
    resolver: Resolver | None,
    connector: httpcore.AsyncNetworkBackend | None,
) -> tuple[bytes, str | None]:
    """The document's bytes, and its URL (to resolve a relative server URL against)."""
    spec = source.spec.strip()
    if spec.lower().startswith(("http://", "https://")):
        try:
            host = normalise_host(httpx.URL(spec).host)
        except httpx.InvalidURL:
            raise OpenApiSourceError(source.name, f"{spec} is not a valid URL") from None
        trusted = (host,) if source.trusted_private_network else ()
        try:
            # The document is fetched with the source's credentials: APIs often
            # protect their description like the rest of them.
            credentials = await auth.headers()
        except Exception as exc:
            raise OpenApiSourceError(
                source.name, f"could not get credentials to fetch {spec}: {type(exc).__name__}"
            ) from exc
        async with GuardedHttpClient(
            http, trusted_hosts=trusted, resolver=resolver, connector=connector
        ) as client:
            try:
                response = await client.request(
                    "GET", spec, headers={"Accept": _DOCUMENT_ACCEPT}, credentials=credentials
                )
            except GuardedHttpError as exc:
                raise OpenApiSourceError(source.name, f"could not fetch {spec}: {exc}") from None
            except httpx.HTTPError as exc:
                raise OpenApiSourceError(
                    source.name, f"could not fetch {spec}: {type(exc).__name__} {exc}".rstrip()
                ) from None
        if not response.is_success:
            raise OpenApiSourceError(
                source.name,
                f"fetching {spec} answered {response.status_code} {response.reason_phrase}",
            )
        return response.content, response.url
    if "://" in spec:
        raise OpenApiSourceError(source.name, f"{spec}: give a file path or an http(s) URL")
    try:
        return await asyncio.to_thread(_read_file, spec), None
    except OSError as exc:
        raise OpenApiSourceError(
            source.name, f"cannot read {spec}: {exc.strerror or type(exc).__name__}"
        ) from None


def _read_file(spec: str) -> bytes:
    return Path(spec).expanduser().read_bytes()


def _base_url(source: OpenApiSourceSettings, parsed: ParsedDocument) -> str:
    base_url = source.base_url or parsed.server_url
    if not base_url:
        raise OpenApiSourceError(
            source.name, "the document names no absolute server URL; set base_url"
        )
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        raise OpenApiSourceError(source.name, f"the base URL {base_url!r} is not valid") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise OpenApiSourceError(source.name, f"the base URL {base_url!r} is not an http(s) URL")
    return base_url


async def _check_base_url(
    source: OpenApiSourceSettings, base_url: str, client: GuardedHttpClient
) -> None:
    """Refuse at start-up a base URL every call would be refused for."""
    try:
        await client.check_destination(base_url)
    except UnsafeUrl as exc:
        host = normalise_host(httpx.URL(base_url).host)
        hint = (
            "add it to LAMINA_TOOLS__HTTP__ALLOWED_HOSTS"
            if not client.policy.is_allowed(host)
            else "if it is an internal service, set trusted_private_network"
        )
        raise OpenApiSourceError(
            source.name, f"calls to {base_url} would be refused ({exc}); {hint}"
        ) from None
    except httpx.HTTPError as exc:
        # DNS may come back; the calls will try again and report their own failure.
        logger.warning("OpenAPI source %r: cannot check %s now: %s", source.name, base_url, exc)


def _tools(
    source: OpenApiSourceSettings,
    parsed: ParsedDocument,
    base_url: str,
    client: GuardedHttpClient,
    auth: SourceAuth,
) -> tuple[OpenApiTool, ...]:
    offered = {operation.key: operation for operation in parsed.operations}
    skipped = {item.key: item.reason for item in parsed.skipped}

    def unknown(keys: list[str]) -> list[str]:
        return [key for key in keys if key not in offered and key not in skipped]

    if missing := unknown(list(source.operation_risks)):
        raise OpenApiSourceError(
            source.name, f"operation_risks names operations it does not have: {missing}"
        )
    selected: list[Operation]
    if source.operations is None:
        selected = list(parsed.operations)
        for key, reason in skipped.items():
            logger.warning("OpenAPI source %r: operation %r skipped: %s", source.name, key, reason)
    else:
        if missing := unknown(source.operations):
            raise OpenApiSourceError(
                source.name, f"operations names operations it does not have: {missing}"
            )
        for key in source.operations:
            if key in skipped:
                raise OpenApiSourceError(
                    source.name, f"operation {key!r} cannot be offered: {skipped[key]}"
                )
        wanted = set(source.operations)
        selected = [operation for operation in parsed.operations if operation.key in wanted]
    if not selected:
        raise OpenApiSourceError(source.name, "the document has no operation to offer as a tool")

    tools: list[OpenApiTool] = []
    taken: set[str] = set()
    for operation in selected:
        try:
            name = tool_name(source.name, operation.key, taken)
        except InvalidDocument as exc:
            raise OpenApiSourceError(source.name, str(exc)) from None
        taken.add(name)
        spec = tool_spec(
            name,
            operation,
            risk=source.operation_risks.get(operation.key),
            roles=frozenset(source.roles),
            tenants=frozenset(source.tenants or ()),
            origin=f"openapi:{source.name}",
            timeout_s=source.timeout_s or DEFAULT_TOOL_TIMEOUT_S,
        )
        tools.append(
            OpenApiTool(
                spec,
                operation,
                base_url=base_url,
                http=client,
                auth=auth,
                timeout_s=source.timeout_s,
            )
        )
    return tuple(tools)
