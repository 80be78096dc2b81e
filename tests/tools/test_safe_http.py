"""The guarded HTTP client against a real server on loopback.

The server listens on 127.0.0.1, which the guard refuses, so tests reach it in two
ways that keep the refusals honest: as a *trusted* host (``trusted.test``, resolved
to 127.0.0.1 and named in ``trusted_hosts``), or as a "public" host whose checked
address a :class:`LoopbackConnector` routes to loopback. Refusals are exercised
through resolution (``intranet.test`` -> 10.0.0.5 ...) and through URL literals.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from tests.support.network import PUBLIC_IP, FakeResolver, LoopbackConnector
from tests.support.processes import app_in_thread
from tools.http import (
    GuardedHttpClient,
    RequestTimedOut,
    ResponseTooLarge,
    TooManyRedirects,
    UnsafeUrl,
    guarded_httpx_client,
    ip_literal,
    is_public_address,
)
from tools.settings import HttpSettings

RESOLVER_ANSWERS = {
    "trusted.test": ["127.0.0.1"],
    "trusted2.test": ["127.0.0.1"],
    "public.test": [PUBLIC_IP],
    "intranet.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "rebind.test": ["8.8.8.8", "127.0.0.1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "sixtofour.test": ["2002:7f00:1::1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
    "cgnat.test": ["100.64.0.7"],
    "localhost": ["127.0.0.1", "::1"],
    "a.example.test": [PUBLIC_IP],
    "b.a.example.test": [PUBLIC_IP],
    "example.test": [PUBLIC_IP],
    "evil-example.test": [PUBLIC_IP],
    "api.partner.test": [PUBLIC_IP],
    "other.test": [PUBLIC_IP],
}
TRUSTED = ("trusted.test", "trusted2.test")


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ok": True}

    @app.api_route("/echo", methods=["GET", "POST"])
    async def echo(request: Request) -> dict[str, object]:
        return {
            "method": request.method,
            "headers": dict(request.headers),
            "body": (await request.body()).decode(),
        }

    @app.api_route("/redirect", methods=["GET", "POST"])
    def redirect(to: str, status: int = 302) -> Response:
        return RedirectResponse(to, status_code=status)

    @app.get("/chain/{hops}")
    def chain(hops: int) -> Response:
        if hops > 0:
            return RedirectResponse(f"/chain/{hops - 1}")
        return JSONResponse({"done": True})

    @app.get("/bytes/{size}")
    def sized(size: int) -> Response:
        return Response(b"x" * size, media_type="application/octet-stream")

    @app.get("/stream/{size}")
    def streamed(size: int) -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            for start in range(0, size, 512):
                yield b"x" * min(512, size - start)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.get("/gzip/{size}")
    def compressed(size: int) -> Response:
        body = gzip.compress(b"0" * size)
        return Response(body, headers={"Content-Encoding": "gzip"}, media_type="text/plain")

    @app.get("/slow")
    def slow() -> StreamingResponse:
        async def trickle() -> AsyncIterator[bytes]:
            for _ in range(100):  # ends by itself; Starlette stops it when the client goes
                yield b"."
                await asyncio.sleep(0.1)

        return StreamingResponse(trickle(), media_type="text/plain")

    @app.get("/slow-redirect/{hops}")
    async def slow_redirect(hops: int) -> Response:
        await asyncio.sleep(0.4)
        if hops > 0:
            return RedirectResponse(f"/slow-redirect/{hops - 1}")
        return JSONResponse({"done": True})

    return app


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with app_in_thread(make_app()) as base:
        yield httpx.URL(base).port or 80


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(RESOLVER_ANSWERS)


@pytest.fixture
def connector() -> LoopbackConnector:
    return LoopbackConnector()


def client(
    resolver: FakeResolver,
    connector: LoopbackConnector | None = None,
    *,
    real_connections: bool = False,
    trusted: tuple[str, ...] = TRUSTED,
    **settings: object,
) -> GuardedHttpClient:
    """A guarded client whose connections all land on loopback, whatever the code under
    test decides: a refusal that failed must not send a packet to a private address.
    ``real_connections`` only where every answer of the resolver is loopback anyway."""
    if not real_connections and connector is None:
        connector = LoopbackConnector()
    return GuardedHttpClient(
        HttpSettings.model_validate(settings),
        trusted_hosts=trusted,
        resolver=resolver,
        connector=connector,
    )


# --- which addresses are public ------------------------------------------------------

NON_PUBLIC = [
    "127.0.0.1",
    "127.255.0.1",
    "10.0.0.5",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "192.0.2.1",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::7f00:1",  # IPv4-compatible
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",  # site-local
    "ff02::1",
    "ff0e::1",  # global-scope multicast is still not a unicast destination
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "2002:a00:5::1",  # 6to4 around 10.0.0.5
    "64:ff9b::7f00:1",  # NAT64 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "64:ff9b:1::1",  # local-use NAT64
    "2001:db8::1",
    "2001::1",  # Teredo
]
PUBLIC = ["8.8.8.8", "1.1.1.1", PUBLIC_IP, "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_accepted(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001",
     "127.1", "0x7f.1", "127.0.0.1.", "[::ffff:127.0.0.1]", "::ffff:7f00:1"],
)  # fmt: skip
def test_every_spelling_of_loopback_reads_as_an_address(host: str) -> None:
    literal = ip_literal(host)
    assert literal is not None
    assert not is_public_address(literal)


@pytest.mark.parametrize("host", ["example.com", "0x7f.example", "1.2.3.4.5", "08.0.0.1", ""])
def test_names_are_not_literals(host: str) -> None:
    assert ip_literal(host) is None


# --- refusals ------------------------------------------------------------------------

LITERAL_URLS = [
    "http://127.0.0.1:{port}/echo",
    "http://2130706433:{port}/echo",
    "http://0x7f000001:{port}/echo",
    "http://0x7f.0.0.1:{port}/echo",
    "http://0177.0.0.1:{port}/echo",
    "http://017700000001:{port}/echo",
    "http://127.1:{port}/echo",
    "http://[::1]:{port}/echo",
    "http://[::ffff:127.0.0.1]:{port}/echo",
    "http://[::ffff:7f00:1]:{port}/echo",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://10.0.0.5/",
    "http://0/",
]


@pytest.mark.parametrize("template", LITERAL_URLS)
async def test_private_address_literals_are_refused_without_lookup(
    template: str, port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with client(resolver, connector) as http:
        with pytest.raises(UnsafeUrl):
            await http.request("GET", template.format(port=port))
    assert resolver.calls == []
    assert connector.connected == []


@pytest.mark.parametrize(
    ("host", "_why"),
    [
        ("intranet.test", "private"),
        ("metadata.test", "link-local metadata service"),
        ("rebind.test", "one public answer, one loopback"),
        ("mapped.test", "IPv4-mapped IPv6 loopback"),
        ("sixtofour.test", "6to4 around loopback"),
        ("nat64.test", "NAT64 around the metadata address"),
        ("cgnat.test", "carrier-grade NAT"),
        ("localhost", "loopback"),
    ],
)
async def test_names_resolving_to_private_addresses_are_refused(
    host: str, _why: str, port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with client(resolver, connector) as http:
        with pytest.raises(UnsafeUrl) as refused:
            await http.request("GET", f"http://{host}:{port}/echo")
    assert resolver.calls == [host]
    assert connector.connected == [], "no connection to any answer once one is refused"
    message = str(refused.value)
    assert host in message and "non-public" in message
    for address in RESOLVER_ANSWERS[host]:
        assert address not in message, "the internal address stays in the log"


async def test_the_system_resolver_is_checked_too(port: int) -> None:
    async with GuardedHttpClient(HttpSettings()) as http:
        with pytest.raises(UnsafeUrl, match="non-public"):
            await http.request("GET", f"http://localhost:{port}/echo")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://trusted.test/file",
        "file:///etc/passwd",
        "gopher://trusted.test:70/",
        "http://user:secret@trusted.test:{port}/echo",
        "http://trusted.test@public.test:{port}/echo",
    ],
)
async def test_other_schemes_and_credentials_in_urls_are_refused(
    url: str, port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with client(resolver, connector) as http:
        with pytest.raises(UnsafeUrl):
            await http.request("GET", url.format(port=port))
    assert connector.connected == []


# --- what is allowed, and where the connection really goes ------------------------


async def test_a_trusted_host_on_loopback_is_reached(port: int) -> None:
    resolver = FakeResolver({"trusted.test": ["127.0.0.1"]})
    async with client(resolver, real_connections=True) as http:
        response = await http.request("GET", f"http://trusted.test:{port}/echo")
    assert response.status_code == 200
    assert response.json()["headers"]["host"] == f"trusted.test:{port}"
    assert resolver.calls == ["trusted.test"]


async def test_the_connection_goes_to_the_address_that_was_checked(
    port: int, connector: LoopbackConnector
) -> None:
    # A rebinding DNS server: a public answer first, loopback on any later lookup.
    resolver = FakeResolver({"public.test": [[PUBLIC_IP], ["127.0.0.1"]]})
    async with client(resolver, connector, trusted=()) as http:
        response = await http.request("GET", f"http://public.test:{port}/echo")
    assert response.json()["headers"]["host"] == f"public.test:{port}"
    assert resolver.calls == ["public.test"], "one lookup: the checked answer is the one used"
    assert connector.connected == [(PUBLIC_IP, port)]

    async with client(resolver, connector, trusted=()) as http:
        with pytest.raises(UnsafeUrl):
            await http.request("GET", f"http://public.test:{port}/echo")
    assert connector.connected == [(PUBLIC_IP, port)]


async def test_the_allow_list_admits_exact_hosts_and_subdomains_only(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    allowed = ["*.example.test", "API.Partner.test"]
    async with client(resolver, connector, trusted=(), allowed_hosts=allowed) as http:
        for host in ("a.example.test", "b.a.example.test", "api.partner.test"):
            response = await http.request("GET", f"http://{host}:{port}/echo")
            assert response.status_code == 200
        for host in ("example.test", "evil-example.test", "other.test"):
            with pytest.raises(UnsafeUrl, match="not on the list of allowed hosts"):
                await http.request("GET", f"http://{host}:{port}/echo")
        with pytest.raises(UnsafeUrl, match="not on the list of allowed hosts"):
            await http.request(
                "GET", f"http://a.example.test:{port}/redirect?to=http://other.test:{port}/echo"
            )
    assert {host for host, _ in connector.connected} == {PUBLIC_IP}
    assert "other.test" not in resolver.calls


def test_a_malformed_allow_list_entry_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"\*\.example\.com"):
        GuardedHttpClient(HttpSettings(allowed_hosts=["api.*.example.com"]))


# --- redirects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/echo",
        "http://[::ffff:127.0.0.1]:{port}/echo",
        "http://2130706433:{port}/echo",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.test/latest/meta-data/",
        "http://intranet.test:{port}/echo",
        "http://localhost:{port}/echo",
        "file:///etc/passwd",
    ],
)
async def test_a_redirect_from_a_trusted_host_to_another_private_one_is_refused(
    target: str, port: int, resolver: FakeResolver
) -> None:
    url = httpx.URL(f"http://trusted.test:{port}/redirect", params={"to": target.format(port=port)})
    async with client(resolver) as http:
        with pytest.raises(UnsafeUrl):
            await http.request("GET", url)


async def test_a_redirect_chain_within_the_trusted_host_is_followed(
    port: int, resolver: FakeResolver
) -> None:
    async with client(resolver, max_redirects=3) as http:
        response = await http.request("GET", f"http://trusted.test:{port}/chain/3")
    assert response.status_code == 200
    assert response.json() == {"done": True}
    assert response.url == f"http://trusted.test:{port}/chain/0"


async def test_more_redirects_than_allowed_are_refused(port: int, resolver: FakeResolver) -> None:
    async with client(resolver, max_redirects=2) as http:
        assert (await http.request("GET", f"http://trusted.test:{port}/chain/2")).status_code == 200
        with pytest.raises(TooManyRedirects):
            await http.request("GET", f"http://trusted.test:{port}/chain/3")
    async with client(resolver, max_redirects=0) as http:
        with pytest.raises(TooManyRedirects):
            await http.request("GET", f"http://trusted.test:{port}/chain/1")


async def test_credentials_stay_with_their_origin(port: int, resolver: FakeResolver) -> None:
    credentials = {"X-API-Key": "key-1", "Authorization": "Bearer token-1"}
    async with client(resolver) as http:
        same = await http.request(
            "GET", f"http://trusted.test:{port}/redirect?to=/echo", credentials=credentials
        )
        elsewhere = await http.request(
            "GET",
            f"http://trusted.test:{port}/redirect?to=http://trusted2.test:{port}/echo",
            headers={"Cookie": "session=1", "X-Trace": "t-1"},
            credentials=credentials,
        )
    assert same.json()["headers"]["x-api-key"] == "key-1"
    assert same.json()["headers"]["authorization"] == "Bearer token-1"
    received = elsewhere.json()["headers"]
    assert received["host"] == f"trusted2.test:{port}"
    assert received["x-trace"] == "t-1"
    for name in ("x-api-key", "authorization", "cookie"):
        assert name not in received


async def test_redirect_methods_follow_http_semantics(port: int, resolver: FakeResolver) -> None:
    async with client(resolver) as http:
        kept = await http.request(
            "POST", f"http://trusted.test:{port}/redirect?to=/echo&status=307", json={"a": 1}
        )
        changed = await http.request(
            "POST", f"http://trusted.test:{port}/redirect?to=/echo&status=303", json={"a": 1}
        )
    assert kept.json()["method"] == "POST"
    assert kept.json()["body"] == '{"a":1}'
    assert changed.json()["method"] == "GET"
    assert changed.json()["body"] == ""


# --- size and time caps ----------------------------------------------------------


@pytest.mark.parametrize("path", ["bytes", "stream", "gzip"])
async def test_responses_over_the_size_cap_are_refused(
    path: str, port: int, resolver: FakeResolver
) -> None:
    async with client(resolver, max_response_bytes=2048) as http:
        small = await http.request("GET", f"http://trusted.test:{port}/{path}/2000")
        assert len(small.content) == 2000
        with pytest.raises(ResponseTooLarge, match="2,048 bytes"):
            await http.request("GET", f"http://trusted.test:{port}/{path}/50000")


async def test_a_declared_length_over_the_cap_is_refused_before_the_body_arrives(
    resolver: FakeResolver,
) -> None:
    # This server announces a gigabyte and then sends almost nothing: waiting for the
    # body would end in a timeout, not in the size refusal.
    async def lying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nxx")
        await writer.drain()
        await reader.read()  # hold the connection until the client leaves
        writer.close()

    server = await asyncio.start_server(lying, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client(resolver, max_response_bytes=2048, timeout_s=30) as http:
            with pytest.raises(ResponseTooLarge):
                await http.request("GET", f"http://trusted.test:{port}/")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_slow_response_hits_the_time_cap(port: int, resolver: FakeResolver) -> None:
    async with client(resolver, timeout_s=0.5) as http:
        with pytest.raises(RequestTimedOut, match=r"0\.5 s"):
            await http.request("GET", f"http://trusted.test:{port}/slow")


async def test_the_time_cap_covers_the_whole_redirect_chain(
    port: int, resolver: FakeResolver
) -> None:
    # Each hop answers in well under the cap; the three together do not.
    async with client(resolver, timeout_s=1.0) as http:
        with pytest.raises(RequestTimedOut):
            await http.request("GET", f"http://trusted.test:{port}/slow-redirect/2")


# --- the httpx client for libraries ----------------------------------------------


async def test_the_httpx_client_applies_the_same_guards(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    settings = HttpSettings(max_redirects=2)
    async with guarded_httpx_client(
        settings,
        trusted_hosts=TRUSTED,
        headers={"X-Client": "lamina"},
        follow_redirects=True,
        resolver=resolver,
        connector=connector,
    ) as http:
        response = await http.get(f"http://trusted.test:{port}/echo")
        assert response.json()["headers"]["x-client"] == "lamina"
        for url in (
            f"http://127.1:{port}/echo",
            f"http://metadata.test:{port}/",
            f"http://trusted.test:{port}/redirect?to=http://intranet.test:{port}/echo",
        ):
            with pytest.raises(UnsafeUrl) as refused:
                await http.get(url)
            assert isinstance(refused.value, httpx.RequestError)
        with pytest.raises(httpx.TooManyRedirects):
            await http.get(f"http://trusted.test:{port}/chain/3")
    assert {host for host, _ in connector.connected} == {"127.0.0.1"}
