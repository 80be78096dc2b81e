"""The guarded HTTP client: the one way a tool fetches a URL.

Every request, and every redirect hop, passes two checks:

1. **The URL** (:class:`GuardedTransport`): only ``http``/``https``; no user name or
   password in it; the host on the allow-list when one is configured
   (``HttpSettings.allowed_hosts``); a host written as an IP address, in any
   spelling the C resolver accepts (``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``,
   ``127.1``, ``[::ffff:127.0.0.1]``), must be a public address.
2. **The addresses** (:class:`GuardedNetworkBackend`), when a connection is opened:
   the host is resolved once, *every* address it resolves to must be public, and
   the socket is opened to one of exactly those addresses. Checking and connecting
   use the same answer, so DNS rebinding between the two cannot swap in another
   address; TLS still verifies the certificate for the host name.

Trusted hosts (an operator's explicit ``trusted_private_network``) may resolve to
private addresses; that trust covers only those exact host names, so a redirect
from one of them to any other private host is refused all the same.

Refusals raise :class:`UnsafeUrl`, oversized responses :class:`ResponseTooLarge`;
both are :class:`GuardedHttpError`, whose message is safe to show a user or a model
(it names the host but never the internal address it resolved to, which goes to the
log). They subclass ``httpx.RequestError``, so httpx-based code (such as MCP's
streamable-HTTP client) treats them as a failed request. Tool adapters turn them
into :class:`~tools.contracts.ToolExecutionFailed` with ``str(error)`` as message.

Use :class:`GuardedHttpClient` for plain request/response calls (redirects,
credential stripping, size and time caps handled here) or
:func:`guarded_httpx_client` where a library wants an ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json as jsonlib
import logging
import re
import socket
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpcore
import httpx

from tools.settings import HttpSettings

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Iterable[str]]]
"""``async (host, port) -> addresses``: the IP addresses (as text) a host name resolves to."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEMES = frozenset({"http", "https"})
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix: the address stands for the IPv4 address in its last 32 bits."""
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
_IPV4_LITERAL = re.compile(r"[0-9a-fx.]+")
"""What ``inet_aton`` might read as an IPv4 address (decimal, octal, hex, short forms)."""


# --- errors ----------------------------------------------------------------------


class GuardedHttpError(httpx.RequestError):
    """A request the guarded client refused or cut short. ``str(error)`` is safe to show."""


class UnsafeUrl(GuardedHttpError):
    """The URL, or an address its host resolves to, is not allowed."""


class ResponseTooLarge(GuardedHttpError):
    """The response is longer than ``HttpSettings.max_response_bytes``."""


class TooManyRedirects(GuardedHttpError):
    """More than ``HttpSettings.max_redirects`` redirects."""


class RequestTimedOut(GuardedHttpError):
    """No complete response within ``HttpSettings.timeout_s`` (redirects included)."""


# --- addresses and hosts ---------------------------------------------------------


def is_public_address(address: IpAddress) -> bool:
    """Whether ``address`` is a globally reachable unicast address.

    ``ipaddress.is_global`` alone is not enough: it calls multicast global and, in
    some Python versions, misses addresses that embed an IPv4 address
    (``::ffff:127.0.0.1``, 6to4 ``2002:7f00:1::``, NAT64 ``64:ff9b::7f00:1``), so
    those are unwrapped and the embedded address is judged instead.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
    )


def ip_literal(host: str) -> IpAddress | None:
    """The address ``host`` spells, if it is an IP literal in any form, else ``None``.

    IPv4 follows ``inet_aton``, the rule the system resolver applies, so
    ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1`` and ``127.1`` all read as
    127.0.0.1. An IPv6 zone (``fe80::1%eth0``) is ignored.
    """
    text = host.strip("[]").lower()
    text = text.split("%", 1)[0]  # an IPv6 zone id, percent-encoded or not
    if text.endswith("."):
        text = text[:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _IPV4_LITERAL.fullmatch(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def normalise_host(host: str) -> str:
    """A host as the checks compare it: lower case, no trailing dot, IPs canonical."""
    host = host.strip().lower().strip("[]").rstrip(".")
    literal = ip_literal(host)
    return str(literal) if literal is not None else host


def _host_of(url: httpx.URL) -> str:
    return normalise_host(url.raw_host.decode("ascii"))


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Which hosts may be reached: the allow-list and the trusted private hosts."""

    allowed: tuple[str, ...] | None
    """Exact hosts and ``*.suffix`` patterns; ``None`` means any public host."""
    trusted: frozenset[str]
    """Hosts that may resolve to private addresses (and are allowed by name)."""

    @classmethod
    def build(cls, allowed_hosts: Iterable[str] | None, trusted_hosts: Iterable[str]) -> HostPolicy:
        allowed: tuple[str, ...] | None = None
        if allowed_hosts is not None:
            patterns = []
            for raw in allowed_hosts:
                pattern = raw.strip().lower().rstrip(".")
                body = pattern[2:] if pattern.startswith("*.") else pattern
                if not body or "*" in body or "/" in body:
                    raise ValueError(
                        f"allowed host {raw!r}: use a host name ('api.example.com') "
                        "or a wildcard for its subdomains ('*.example.com')"
                    )
                patterns.append(pattern if pattern.startswith("*.") else normalise_host(pattern))
            allowed = tuple(patterns)
        trusted = frozenset(normalise_host(host) for host in trusted_hosts if host.strip())
        return cls(allowed=allowed, trusted=trusted)

    def is_trusted(self, host: str) -> bool:
        return host in self.trusted

    def is_allowed(self, host: str) -> bool:
        if self.allowed is None or host in self.trusted:
            return True
        for pattern in self.allowed:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False

    def check_url(self, url: httpx.URL) -> None:
        """Raise :class:`UnsafeUrl` unless ``url`` may be requested (before any lookup)."""
        if url.scheme not in _SCHEMES:
            raise UnsafeUrl("only http and https URLs may be fetched")
        if url.userinfo:
            raise UnsafeUrl("URLs with a user name or password are not allowed")
        host = _host_of(url)
        if not host:
            raise UnsafeUrl("the URL has no host")
        if self.is_trusted(host):
            return
        if not self.is_allowed(host):
            raise UnsafeUrl(f"{host} is not on the list of allowed hosts")
        literal = ip_literal(host)
        if literal is not None and not is_public_address(literal):
            logger.warning("refused a URL whose host is the non-public address %s", literal)
            raise UnsafeUrl("the URL's host is not a public address")


# --- connecting only to checked addresses -----------------------------------------


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for ``host`` (without blocking the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to checked addresses of a host.

    httpcore calls :meth:`connect_tcp` with the URL's host whenever it needs a new
    connection. The host is resolved here, once; every address is checked, and the
    connection goes to one of those same addresses (pinned), so the address that was
    checked is the address that is used. Pooled connections stay keyed by host name,
    and TLS verifies the certificate for the host name.
    """

    def __init__(
        self,
        policy: HostPolicy,
        *,
        resolver: Resolver | None = None,
        connector: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolve = resolver or system_resolver
        self._connector = connector or httpcore.AnyIOBackend()

    async def checked_addresses(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` to connect to, or :class:`UnsafeUrl` if any is refused."""
        name = normalise_host(host)
        literal = ip_literal(name)
        if literal is not None:
            addresses: list[IpAddress] = [literal]
        else:
            try:
                answers = await self._resolve(name, port)
            except OSError:
                raise httpcore.ConnectError(f"could not resolve {name}") from None
            try:
                addresses = [ipaddress.ip_address(answer.split("%", 1)[0]) for answer in answers]
            except ValueError:
                raise httpcore.ConnectError(f"could not resolve {name}") from None
            if not addresses:
                raise httpcore.ConnectError(f"could not resolve {name}")
        trusted = self._policy.is_trusted(name)
        for address in addresses:
            # A trusted host may be private, but never a wildcard or group address.
            allowed = (
                not (address.is_unspecified or address.is_multicast)
                if trusted
                else is_public_address(address)
            )
            if not allowed:
                # Refuse if any answer is private: an attacker's DNS may mix one public
                # address with a private one, hoping the connection picks the latter.
                logger.warning(
                    "refused %s: it resolves to the non-public address %s", name, address
                )
                raise UnsafeUrl(f"{name} resolves to a non-public address")
        return [str(address) for address in addresses]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.checked_addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._connector.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # addresses is never empty
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeUrl("Unix sockets may not be used")

    async def sleep(self, seconds: float) -> None:
        await self._connector.sleep(seconds)


# --- the httpx transport -----------------------------------------------------------

# Most specific first: httpx code expects its own exception types from a transport.
_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_type, httpx_type in _HTTPCORE_TO_HTTPX:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc)) from exc
        raise


def _too_large(limit: int) -> ResponseTooLarge:
    return ResponseTooLarge(f"the response is larger than the {limit:,} bytes allowed")


class _CappedStream(httpx.AsyncByteStream):
    """A response body that fails once more than ``limit`` bytes have arrived."""

    def __init__(self, inner: AsyncIterable[bytes], limit: int | None) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        with _httpx_errors():
            async for chunk in self._inner:
                received += len(chunk)
                if self._limit is not None and received > self._limit:
                    raise _too_large(self._limit)
                yield chunk

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            with _httpx_errors():
                await close()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that checks every request's URL and every connection's
    addresses (see the module docstring) and caps each response's size on the wire.

    Args:
        policy: allow-list and trusted hosts.
        max_response_bytes: longer bodies fail with :class:`ResponseTooLarge`
            (``None``: no cap, e.g. for a long-lived event stream).
        resolver: how host names are resolved; default the system resolver.
        connector: what opens the checked connections; default httpcore's AnyIO backend.
    """

    def __init__(
        self,
        policy: HostPolicy,
        *,
        max_response_bytes: int | None,
        resolver: Resolver | None = None,
        connector: httpcore.AsyncNetworkBackend | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits()
        self._policy = policy
        self._max_response_bytes = max_response_bytes
        self.backend = GuardedNetworkBackend(policy, resolver=resolver, connector=connector)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=self.backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._policy.check_url(request.url)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        limit = self._max_response_bytes
        if limit is not None and request.method != "HEAD" and _declared_length(response) > limit:
            # Refuse before reading: the server says the body is too long.
            with _httpx_errors():
                await response.aclose()
            raise _too_large(limit)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_CappedStream(response.stream, limit),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        with _httpx_errors():
            await self._pool.aclose()


def _declared_length(response: httpcore.Response) -> int:
    for name, value in response.headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def guarded_httpx_client(
    settings: HttpSettings,
    *,
    trusted_hosts: Iterable[str] = (),
    headers: Mapping[str, str] | None = None,
    timeout: httpx.Timeout | float | None = None,
    auth: httpx.Auth | None = None,
    follow_redirects: bool = False,
    cap_response_size: bool = True,
    resolver: Resolver | None = None,
    connector: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose every request goes through :class:`GuardedTransport`.

    For libraries that take an httpx client or factory (MCP's streamable-HTTP client:
    ``functools.partial(guarded_httpx_client, settings, trusted_hosts=...)`` matches its
    ``(headers, timeout, auth)`` factory). Redirects, if followed, pass the same checks
    hop by hop (at most ``settings.max_redirects``); httpx drops ``Authorization`` when
    one leaves the origin. ``timeout`` defaults to ``settings.timeout_s`` per operation;
    ``cap_response_size=False`` lifts the size cap for long-lived streams. Environment
    proxies and ``.netrc`` are ignored: a proxy would hide where a request really goes.
    """
    transport = GuardedTransport(
        HostPolicy.build(settings.allowed_hosts, trusted_hosts),
        max_response_bytes=settings.max_response_bytes if cap_response_size else None,
        resolver=resolver,
        connector=connector,
    )
    return httpx.AsyncClient(
        transport=transport,
        headers=dict(headers) if headers is not None else None,
        timeout=settings.timeout_s if timeout is None else timeout,
        auth=auth,
        follow_redirects=follow_redirects,
        max_redirects=settings.max_redirects,
        trust_env=False,
    )


# --- the request/response client ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardedResponse:
    """A complete response: the body is read, within the size cap."""

    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    content: bytes
    url: str
    """The final URL, after redirects."""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def media_type(self) -> str:
        """``application/json`` for ``application/json; charset=utf-8``; ``""`` if none."""
        return str(self.headers.get("content-type", "")).split(";", 1)[0].strip().lower()

    @property
    def is_json(self) -> bool:
        media = self.media_type
        return media == "application/json" or media.endswith("+json")

    def text(self) -> str:
        charset = "utf-8"
        for part in str(self.headers.get("content-type", "")).split(";")[1:]:
            key, _, value = part.partition("=")
            if key.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


def _redirect_method(method: str, status: int) -> str:
    """The method of the next hop, as browsers (and httpx) do it."""
    if status in (302, 303) and method != "HEAD":
        return "GET"
    if status == 301 and method == "POST":
        return "GET"
    return method


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, _host_of(url), url.port or default)


class GuardedHttpClient:
    """Request/response HTTP for tools, with every guard applied (see the module docstring).

    Redirects are followed here, hop by hop, each checked like the first request, at
    most ``settings.max_redirects``. ``credentials`` (e.g. ``Authorization`` or an API
    key header) go only to the original origin: once a redirect leaves it, they and
    any ``Authorization``/``Cookie`` header are dropped. The whole exchange, redirects
    included, must finish within ``settings.timeout_s``; the body (decoded) within
    ``settings.max_response_bytes``.

    Args:
        settings: the caps and the allow-list.
        trusted_hosts: hosts an operator allowed on a private network; only these
            exact names may resolve to private addresses.
        resolver: how host names are resolved; default the system resolver.
        connector: what opens the checked connections; default httpcore's AnyIO backend.
    """

    def __init__(
        self,
        settings: HttpSettings,
        *,
        trusted_hosts: Iterable[str] = (),
        resolver: Resolver | None = None,
        connector: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._settings = settings
        self.policy = HostPolicy.build(settings.allowed_hosts, trusted_hosts)
        self._transport = transport = GuardedTransport(
            self.policy,
            max_response_bytes=settings.max_response_bytes,
            resolver=resolver,
            connector=connector,
        )
        # The overall deadline is ours (asyncio.timeout), so httpx's per-operation
        # timeouts only need to be no tighter than it.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=settings.timeout_s,
            follow_redirects=False,
            trust_env=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check_destination(self, url: str | httpx.URL) -> None:
        """Check ``url`` as a request would, resolving its host, without connecting:
        :class:`UnsafeUrl` if it would be refused, ``httpx.ConnectError`` if its host
        cannot be resolved now. For start-up checks of configured URLs."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            raise UnsafeUrl("the URL is not valid") from None
        self.policy.check_url(target)
        port = target.port or (443 if target.scheme == "https" else 80)
        with _httpx_errors():
            await self._transport.backend.checked_addresses(_host_of(target), port)

    async def request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        credentials: Mapping[str, str] | None = None,
        params: httpx.QueryParams | Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
    ) -> GuardedResponse:
        """Send one request, follow its redirects, and return the complete response.

        Raises :class:`UnsafeUrl`, :class:`ResponseTooLarge`, :class:`TooManyRedirects`,
        :class:`RequestTimedOut`, or ``httpx.TransportError`` (e.g. connection refused).
        """
        merged = httpx.Headers(headers)
        merged.update(credentials or {})  # case-insensitive: a credential wins over a header
        try:
            first = self._client.build_request(
                method,
                url,
                headers=merged,
                params=params,
                json=json,
                content=content,
            )
        except httpx.InvalidURL:
            raise UnsafeUrl("the URL is not valid") from None
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                return await self._follow(first, credentials or {})
        except (TimeoutError, httpx.TimeoutException):
            # Our deadline, or httpx's per-operation one (never longer): the same to a caller.
            raise RequestTimedOut(
                f"no complete answer within {self._settings.timeout_s:g} s"
            ) from None

    async def _follow(
        self, request: httpx.Request, credentials: Mapping[str, str]
    ) -> GuardedResponse:
        origin = _origin(request.url)
        left_origin = False
        for hop in range(self._settings.max_redirects + 1):
            response = await self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code not in _REDIRECT_CODES or not location:
                    body = await self._read(response)
                    return GuardedResponse(
                        status_code=response.status_code,
                        reason_phrase=response.reason_phrase,
                        headers=response.headers,
                        content=body,
                        url=str(request.url),
                    )
                if hop == self._settings.max_redirects:
                    raise TooManyRedirects(f"more than {self._settings.max_redirects} redirects")
                try:
                    target = request.url.join(location)
                except httpx.InvalidURL:
                    raise UnsafeUrl("the server redirected to an invalid URL") from None
                left_origin = left_origin or _origin(target) != origin
                request = self._next_hop(
                    request, response.status_code, target, credentials, left_origin
                )
            finally:
                await response.aclose()
        raise AssertionError("unreachable: the loop returns or raises")

    def _next_hop(
        self,
        request: httpx.Request,
        status: int,
        target: httpx.URL,
        credentials: Mapping[str, str],
        left_origin: bool,
    ) -> httpx.Request:
        method = _redirect_method(request.method, status)
        headers = httpx.Headers(request.headers)
        del headers["host"]  # recomputed for the new URL
        if left_origin:
            for name in (*_CREDENTIAL_HEADERS, *credentials):
                headers.pop(name, None)
        keep_body = method == request.method and status in (307, 308)
        if not keep_body:
            for name in ("content-length", "content-type", "transfer-encoding"):
                headers.pop(name, None)
        return self._client.build_request(
            method,
            target,
            headers=headers,
            content=request.content if keep_body else None,
        )

    async def _read(self, response: httpx.Response) -> bytes:
        # Counted after decoding, too: a small compressed body can inflate enormously.
        limit = self._settings.max_response_bytes
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)
