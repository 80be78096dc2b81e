"""Group overage: memberships read from a fake Microsoft Graph on loopback.

The resolver talks real HTTP to ``tests/support/graph.py``; the validator
fetches real metadata and keys from ``tests/support/identity.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from client_api.auth.dependencies import Authenticator, ChatCaller
from client_api.auth.groups import GraphGroupResolver, GroupsUnavailable
from client_api.auth.jwt import JwtValidator, has_group_overage
from client_api.problems import install_problem_handlers
from client_api.settings import AuthSettings
from tests.support.graph import FakeGraph, StaticGraphToken, running_graph
from tests.support.identity import AUDIENCE, TENANT, IdentityProvider, running_identity_provider
from tests.support.processes import app_in_thread

ALICE_GROUPS = ["g-1", "g-2", "g-3", "g-4", "g-5"]
# Entra's overage marker in access tokens: the groups claim moved to a claim source.
OVERAGE: dict[str, Any] = {
    "_claim_names": {"groups": "src1"},
    "_claim_sources": {
        "src1": {"endpoint": "https://graph.windows.net/x/users/y/getMemberObjects"}
    },
}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with running_graph(alice=ALICE_GROUPS, bob=[]) as fake:
        yield fake


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with running_identity_provider() as provider:
        yield provider


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def resolver_for(
    graph: FakeGraph, http: httpx.AsyncClient, **kwargs: Any
) -> tuple[GraphGroupResolver, StaticGraphToken]:
    tokens = StaticGraphToken()
    return GraphGroupResolver(http, tokens, base_url=graph.base_url, **kwargs), tokens


def auth_settings(idp: IdentityProvider) -> AuthSettings:
    return AuthSettings(openid_config_url=idp.config_url, audience=AUDIENCE)


# --- the resolver ------------------------------------------------------------------------


async def test_every_page_is_followed(graph: FakeGraph, http: httpx.AsyncClient) -> None:
    resolver, tokens = resolver_for(graph, http)
    assert await resolver.groups(TENANT, "alice") == frozenset(ALICE_GROUPS)
    assert graph.count() == 3  # five groups, two a page
    first, *rest = graph.requests
    assert first.path == "/v1.0/users/alice/transitiveMemberOf/microsoft.graph.group"
    assert first.query["$select"] == ["id"]
    assert [r.query["$skiptoken"] for r in rest] == [["2"], ["4"]]
    assert tokens.tenants == [TENANT]  # the Graph token is asked for in the user's tenant


async def test_memberships_are_cached_per_tenant_and_user_for_the_ttl(
    graph: FakeGraph, http: httpx.AsyncClient
) -> None:
    clock = ManualClock()
    graph.page_size = 10
    resolver, _ = resolver_for(graph, http, cache_ttl_s=60, clock=clock)
    assert await resolver.groups(TENANT, "alice") == frozenset(ALICE_GROUPS)
    assert await resolver.groups(TENANT, "alice") == frozenset(ALICE_GROUPS)
    assert graph.count() == 1
    assert await resolver.groups(TENANT, "bob") == frozenset()  # empty is an answer too
    assert await resolver.groups(TENANT, "bob") == frozenset()
    await resolver.groups("fabrikam", "alice")  # another tenant's alice is another user
    assert graph.count() == 3
    clock.now += 61
    graph.memberships["alice"] = ["g-new"]
    assert await resolver.groups(TENANT, "alice") == {"g-new"}
    assert graph.count() == 4


async def test_concurrent_requests_of_one_user_share_one_lookup(
    graph: FakeGraph, http: httpx.AsyncClient
) -> None:
    resolver, _ = resolver_for(graph, http)
    results = await asyncio.gather(*(resolver.groups(TENANT, "alice") for _ in range(5)))
    assert all(r == frozenset(ALICE_GROUPS) for r in results)
    assert graph.count() == 3  # one paged lookup, not five


@pytest.mark.parametrize("status", [503, 429, 403, 404])
async def test_a_failing_graph_fails_closed(
    graph: FakeGraph, http: httpx.AsyncClient, status: int
) -> None:
    graph.status, graph.retry_after = status, "17"
    resolver, _ = resolver_for(graph, http)
    with pytest.raises(GroupsUnavailable) as caught:
        await resolver.groups(TENANT, "alice")
    assert caught.value.retry_after_s == 17
    # A failure is not cached: once Graph is back, the groups are read.
    graph.status = 200
    assert await resolver.groups(TENANT, "alice") == frozenset(ALICE_GROUPS)


async def test_an_unknown_user_fails_closed(graph: FakeGraph, http: httpx.AsyncClient) -> None:
    resolver, _ = resolver_for(graph, http)
    with pytest.raises(GroupsUnavailable):
        await resolver.groups(TENANT, "nobody")


async def test_an_unreachable_graph_fails_closed(http: httpx.AsyncClient) -> None:
    resolver = GraphGroupResolver(http, StaticGraphToken(), base_url="http://127.0.0.1:9")
    with pytest.raises(GroupsUnavailable):
        await resolver.groups(TENANT, "alice")


async def test_a_wrong_graph_token_fails_closed(graph: FakeGraph, http: httpx.AsyncClient) -> None:
    resolver = GraphGroupResolver(
        http, StaticGraphToken(token_value="expired"), base_url=graph.base_url
    )
    with pytest.raises(GroupsUnavailable):
        await resolver.groups(TENANT, "alice")
    assert graph.count() == 1


async def test_the_graph_token_never_follows_a_next_link_elsewhere(
    graph: FakeGraph, http: httpx.AsyncClient
) -> None:
    with running_graph(alice=ALICE_GROUPS) as elsewhere:
        graph.next_link_base = elsewhere.base_url
        resolver, _ = resolver_for(graph, http)
        with pytest.raises(GroupsUnavailable):
            await resolver.groups(TENANT, "alice")
        assert graph.count() == 1
        assert elsewhere.count() == 0


# --- overage tokens through the validator ----------------------------------------------


def test_the_overage_markers() -> None:
    assert has_group_overage(OVERAGE)
    assert has_group_overage({"hasgroups": True})
    assert not has_group_overage({"groups": ["g-1"]})
    assert not has_group_overage({"hasgroups": "true", "_claim_names": {"name": "x"}})


@pytest.mark.parametrize("marker", [OVERAGE, {"hasgroups": True}], ids=["claim_names", "hasgroups"])
async def test_an_overage_token_gets_its_groups_from_graph(
    idp: IdentityProvider, graph: FakeGraph, http: httpx.AsyncClient, marker: dict[str, Any]
) -> None:
    resolver, tokens = resolver_for(graph, http)
    validator = JwtValidator(auth_settings(idp), http, groups=resolver)
    token = idp.token("alice", omit=("groups",), extra=marker)
    principal = await validator.principal(token)
    assert principal.groups == frozenset(ALICE_GROUPS)
    assert tokens.tenants == [TENANT]


async def test_a_token_without_overage_never_calls_graph(
    idp: IdentityProvider, graph: FakeGraph, http: httpx.AsyncClient
) -> None:
    resolver, tokens = resolver_for(graph, http)
    validator = JwtValidator(auth_settings(idp), http, groups=resolver)
    assert (await validator.principal(idp.token("alice", groups=("hr",)))).groups == {"hr"}
    assert (await validator.principal(idp.token("bob"))).groups == frozenset()
    assert graph.count() == 0
    assert tokens.tenants == []


async def test_an_overage_token_is_refused_with_503_when_graph_is_down(
    idp: IdentityProvider, graph: FakeGraph
) -> None:
    graph.status = 503

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Built inside the server's event loop, as the real app does.
        async with httpx.AsyncClient() as http:
            settings = auth_settings(idp)
            resolver, _ = resolver_for(graph, http)
            validator = JwtValidator(settings, http, groups=resolver)
            app.state.authenticator = Authenticator(settings, validator)
            yield

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/whoami")
    async def whoami(principal: ChatCaller) -> dict[str, list[str]]:
        return {"groups": sorted(principal.groups)}

    token = idp.token("alice", omit=("groups",), extra=OVERAGE)
    headers = {"Authorization": f"Bearer {token}"}
    with app_in_thread(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            refused = await client.get("/whoami", headers=headers)
            graph.status = 200
            accepted = await client.get("/whoami", headers=headers)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "5"
    assert "group memberships" in refused.json()["detail"]
    assert accepted.status_code == 200
    assert accepted.json() == {"groups": ALICE_GROUPS}
