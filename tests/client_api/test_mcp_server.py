"""Lamina's MCP server (/mcp) over real HTTP, used by the mcp SDK's own client.

A real Lamina app on loopback with a small corpus under access rules and the sample
tools (``lookup_employee``: read, role ``employee``; ``servicedesk-create_ticket``:
high risk). Identity comes from dev headers, and in one test from Entra-like tokens,
exactly as for the REST API.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client

from client_api.app import create_app
from client_api.settings import LaminaSettings
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.identity import AUDIENCE, running_identity_provider
from tests.support.processes import app_in_thread

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nThe payroll account is held at Kestrel Bank, reference KB-7731.\n"

LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)


@pytest.fixture(scope="module")
def lamina(corpus_data: Path) -> Iterator[str]:
    settings = dev_settings(
        corpus_data, limits={"tenants": {"tight": {"user_requests_per_minute": 3}}}
    )
    with app_in_thread(create_app(settings)) as base:
        yield base


@asynccontextmanager
async def mcp_session(base: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(f"{base}/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def tool_names(session: ClientSession) -> set[str]:
    return {tool.name for tool in (await session.list_tools()).tools}


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


# --- what a caller sees ----------------------------------------------------------------


async def test_two_users_with_different_roles_see_different_tools(lamina: str) -> None:
    async with mcp_session(lamina, dev_headers("emma", roles="employee")) as session:
        employee_tools = (await session.list_tools()).tools
    async with mcp_session(lamina, dev_headers("gus")) as session:
        guest_tools = {tool.name for tool in (await session.list_tools()).tools}

    by_name = {tool.name: tool for tool in employee_tools}
    assert set(by_name) == {"search_knowledge", "lookup_employee"}
    assert guest_tools == {"search_knowledge"}
    lookup = by_name["lookup_employee"]
    assert lookup.description and "company directory" in lookup.description
    assert lookup.inputSchema["required"] == ["query"]
    assert lookup.annotations is not None and lookup.annotations.readOnlyHint
    # High risk: it needs a person's approval, which no MCP client can wait for.
    assert "servicedesk-create_ticket" not in by_name


async def test_the_knowledge_search_returns_only_passages_the_caller_may_read(
    lamina: str,
) -> None:
    query = {"query": "payroll account Kestrel Bank", "top_k": 5}
    async with mcp_session(lamina, dev_headers("fiona", groups="finance")) as session:
        finance = await session.call_tool("search_knowledge", query)
    async with mcp_session(lamina, dev_headers("sam", groups="sales")) as session:
        sales = await session.call_tool("search_knowledge", query)

    assert not finance.isError and not sales.isError
    assert finance.structuredContent is not None and sales.structuredContent is not None
    finance_passages = finance.structuredContent["passages"]
    sales_passages = sales.structuredContent["passages"]
    assert "payroll/accounts.md" in {p["source"] for p in finance_passages}
    assert "KB-7731" in text_of(finance)
    assert "payroll/accounts.md" not in {p["source"] for p in sales_passages}
    assert "KB-7731" not in text_of(sales)
    passage = next(p for p in finance_passages if p["source"] == "payroll/accounts.md")
    assert passage["title"] == "Payroll"
    assert passage["chunk_id"]
    assert "Kestrel Bank" in passage["snippet"]


async def test_a_search_with_bad_arguments_is_an_error_result(lamina: str) -> None:
    async with mcp_session(lamina, dev_headers("sam")) as session:
        result = await session.call_tool("search_knowledge", {"query": "leave", "top_k": 500})

    assert result.isError
    assert "schema" in text_of(result)


# --- calls -------------------------------------------------------------------------------


async def test_a_permitted_tool_runs_for_its_caller(lamina: str) -> None:
    async with mcp_session(lamina, dev_headers("emma", roles="employee")) as session:
        result = await session.call_tool("lookup_employee", {"query": "Adele"})

    assert not result.isError
    [person] = json.loads(text_of(result))
    assert person["email"] == "adele.vance@contoso.com"


async def test_calls_the_policy_refuses_are_error_results_with_safe_messages(
    lamina: str,
) -> None:
    async with mcp_session(lamina, dev_headers("gus")) as session:
        not_permitted = await session.call_tool("lookup_employee", {"query": "Adele"})
    async with mcp_session(lamina, dev_headers("emma", roles="employee")) as session:
        high_risk = await session.call_tool(
            "servicedesk-create_ticket", {"title": "Laptop", "description": "Broken screen"}
        )
        invalid = await session.call_tool("lookup_employee", {"query": "A"})
        unknown = await session.call_tool("format_disk", {})

    assert not_permitted.isError
    assert "role" in text_of(not_permitted)
    assert high_risk.isError
    assert "approval" in text_of(high_risk)
    assert invalid.isError
    assert "query" in text_of(invalid)
    assert unknown.isError
    assert "no tool named 'format_disk'" in text_of(unknown)
    for result in (not_permitted, high_risk, invalid, unknown):
        assert "Traceback" not in text_of(result)


# --- the edge ----------------------------------------------------------------------------


def test_a_request_without_credentials_gets_the_rest_apis_401(lamina: str) -> None:
    mcp = httpx.post(f"{lamina}/mcp", json=LIST_TOOLS, headers=MCP_ACCEPT, timeout=10)
    rest = httpx.post(f"{lamina}/v1/chat", json={"message": "hi"}, timeout=10)

    assert mcp.status_code == rest.status_code == 401
    assert mcp.headers["content-type"] == "application/problem+json"
    assert mcp.headers["WWW-Authenticate"] == rest.headers["WWW-Authenticate"] == "Bearer"
    body = mcp.json()
    assert body["title"] == "Unauthorized"
    assert body["correlation_id"] == mcp.headers["X-Correlation-ID"]
    assert set(body) == set(rest.json())


def test_mcp_requests_count_against_the_callers_rate_limit(lamina: str) -> None:
    headers = {**MCP_ACCEPT, **dev_headers("rita", tenant="tight")}
    served = [
        httpx.post(f"{lamina}/mcp", json=LIST_TOOLS, headers=headers, timeout=10) for _ in range(3)
    ]
    refused = httpx.post(f"{lamina}/mcp", json=LIST_TOOLS, headers=headers, timeout=10)

    assert [r.status_code for r in served] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Remaining-Requests"] for r in served] == ["2", "1", "0"]
    assert "search_knowledge" in served[0].text
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1


def test_there_is_no_event_stream_or_session_to_end(lamina: str) -> None:
    headers = {**dev_headers("sam"), "Accept": "text/event-stream"}
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{lamina}/mcp", headers=headers, timeout=10)
        assert response.status_code == 405
        assert response.headers["Allow"] == "POST"


def test_the_server_is_off_when_disabled(corpus_data: Path) -> None:
    settings = dev_settings(corpus_data, api={"mcp_server": False})
    with app_in_thread(create_app(settings)) as base:
        response = httpx.post(
            f"{base}/mcp", json=LIST_TOOLS, headers={**MCP_ACCEPT, **dev_headers("sam")}
        )
    assert response.status_code == 404


async def test_entra_tokens_work_as_for_the_rest_api(corpus_data: Path) -> None:
    with running_identity_provider() as idp:
        settings = LaminaSettings(
            data_dir=corpus_data,
            log_level="WARNING",
            auth={"mode": "jwt", "openid_config_url": idp.config_url, "audience": AUDIENCE},
        )
        with app_in_thread(create_app(settings)) as base:
            token = idp.token("emma", roles=("employee",), groups=("finance",))
            async with mcp_session(base, {"Authorization": f"Bearer {token}"}) as session:
                names = await tool_names(session)
                search = await session.call_tool("search_knowledge", {"query": "payroll"})
            forged = idp.token("emma", tenant="fabrikam")
            async with httpx.AsyncClient(timeout=10) as http:
                refused = await http.post(
                    f"{base}/mcp",
                    json=LIST_TOOLS,
                    headers={**MCP_ACCEPT, "Authorization": f"Bearer {forged}"},
                )

    assert names == {"search_knowledge", "lookup_employee"}
    assert "KB-7731" in text_of(search)
    assert refused.status_code == 401


def test_importing_the_app_leaves_the_mcp_sdk_unloaded() -> None:
    # The SDK loads when the server starts serving, not for every CLI command.
    script = (
        "import sys, client_api.app\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'mcp')\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
