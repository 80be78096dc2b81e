"""Lamina calls a real MCP server's tools through the execution policy.

The server is the FastMCP fixture (tests/support/mcp_stdio_server.py), started as a
subprocess over stdio, or served over streamable HTTP by uvicorn on loopback. The
policy's refusals are checked against the server's own record of what ran: a refused
call never reaches it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import free_port, stop_process
from tools.contracts import (
    InvalidToolArguments,
    RiskLevel,
    ToolApprovalRequired,
    ToolExecutionFailed,
    ToolPermissionDenied,
    Toolset,
    ToolTimeout,
    UnknownTool,
)
from tools.mcp_client import (
    McpServerUnavailable,
    McpToolSource,
    exposed_tool_names,
    open_mcp_tools,
)
from tools.plugins import Tool
from tools.policy import build_toolset
from tools.settings import McpServerSettings, ToolsSettings
from tools.testing import StaticCaller

FIXTURE_SERVER = Path(__file__).resolve().parents[1] / "support" / "mcp_stdio_server.py"

ENGINEER = StaticCaller(tenant_id="contoso", user_id="ann", roles={"engineer"})


def stdio_settings(**overrides: Any) -> McpServerSettings:
    settings: dict[str, Any] = {
        "name": "fixture",
        "transport": "stdio",
        "command": sys.executable,
        "args": [str(FIXTURE_SERVER)],
        **overrides,
    }
    return McpServerSettings.model_validate(settings)


def policy(tools: list[Tool]) -> Toolset:
    return build_toolset(ToolsSettings(load_entry_points=False), extra=tools)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def recorded(toolset: Toolset, server: str = "fixture") -> list[str]:
    """What the server's ``record`` tool has been asked to remember."""
    result = await toolset.call(f"{server}-recorded", {}, ENGINEER)
    notes: list[str] = result.output["result"]
    return notes


# --- through the policy, over stdio -------------------------------------------------


async def test_a_real_stdio_servers_tools_run_through_the_policy(stack: AsyncExitStack) -> None:
    settings = stdio_settings(
        roles=["engineer"],
        tenants=["contoso"],
        tool_risks={"echo": "read", "add": "read", "recorded": "read"},
        timeout_s=20,
    )
    tools = await open_mcp_tools([settings], stack)
    toolset = policy(tools)

    specs = {spec.name: spec for spec in toolset.list_tools(ENGINEER)}
    assert {"fixture-echo", "fixture-add", "fixture-record", "fixture-notes_search"} <= set(specs)
    echo = specs["fixture-echo"]
    assert echo.origin == "mcp:fixture"
    assert echo.description == "Return the text unchanged."
    assert echo.parameters["type"] == "object"
    assert echo.parameters["required"] == ["text"]
    assert echo.risk == RiskLevel.READ
    assert echo.required_roles == frozenset({"engineer"})
    assert echo.tenants == frozenset({"contoso"})
    assert echo.timeout_s == 20
    # Not named in tool_risks: the configured default, whatever the server says.
    assert specs["fixture-record"].risk == RiskLevel.WRITE
    assert not specs["fixture-record"].idempotent

    assert (await toolset.call("fixture-echo", {"text": "hello"}, ENGINEER)).output == "hello"
    # Structured content is preferred to its text rendering.
    assert (await toolset.call("fixture-add", {"a": 2, "b": 3}, ENGINEER)).output == {"total": 5}
    # MCP allows '.' in names, model APIs do not.
    result = await toolset.call("fixture-notes_search", {"query": "q3"}, ENGINEER)
    assert result.output == "no notes about q3"
    assert (await toolset.call("fixture-record", {"note": "n1"}, ENGINEER)).output == "recorded"
    assert await recorded(toolset) == ["n1"]


async def test_arguments_are_checked_against_the_remote_schema_before_the_server_is_called(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(await open_mcp_tools([stdio_settings()], stack))

    with pytest.raises(InvalidToolArguments) as wrong_type:
        await toolset.call("fixture-record", {"note": 42}, ENGINEER)
    assert any(error.startswith("note:") for error in wrong_type.value.errors)
    with pytest.raises(InvalidToolArguments):
        await toolset.call("fixture-record", {}, ENGINEER)

    assert await recorded(toolset) == []


async def test_roles_and_tenants_decide_who_sees_and_calls_the_servers_tools(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(
        await open_mcp_tools([stdio_settings(roles=["engineer"], tenants=["contoso"])], stack)
    )
    no_role = StaticCaller(tenant_id="contoso", user_id="bob", roles={"sales"})
    other_tenant = StaticCaller(tenant_id="fabrikam", user_id="eve", roles={"engineer"})

    assert "fixture-record" in {spec.name for spec in toolset.list_tools(ENGINEER)}
    for outsider in (no_role, other_tenant):
        assert not [s for s in toolset.list_tools(outsider) if s.origin == "mcp:fixture"]
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("fixture-record", {"note": "bob"}, no_role)
    # Another tenant's tool is reported like one that does not exist.
    with pytest.raises(UnknownTool):
        await toolset.call("fixture-record", {"note": "eve"}, other_tenant)

    assert await recorded(toolset) == []


async def test_a_tool_configured_high_risk_is_refused_without_approval(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(await open_mcp_tools([stdio_settings(tool_risks={"record": "high"})], stack))
    [spec] = [s for s in toolset.list_tools(ENGINEER) if s.name == "fixture-record"]
    assert spec.risk == RiskLevel.HIGH

    with pytest.raises(ToolApprovalRequired):
        await toolset.call("fixture-record", {"note": "drop tables"}, ENGINEER)

    assert await recorded(toolset) == []


async def test_a_tool_error_reaches_the_caller_as_a_safe_short_message(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(await open_mcp_tools([stdio_settings()], stack))

    with pytest.raises(ToolExecutionFailed) as failed:
        await toolset.call("fixture-fail", {"reason": "quota exhausted " * 100}, ENGINEER)

    assert failed.value.tool == "fixture-fail"
    assert failed.value.message.startswith("the tool reported an error: ")
    assert "refused: quota exhausted" in failed.value.message
    assert len(failed.value.message) < 600
    assert "Traceback" not in failed.value.message


async def test_a_call_past_its_timeout_is_abandoned_and_the_session_still_works(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(await open_mcp_tools([stdio_settings(timeout_s=0.5)], stack))
    before = (await toolset.call("fixture-pid", {}, ENGINEER)).output

    with pytest.raises(ToolTimeout):
        await toolset.call("fixture-sleep", {"seconds": 60}, ENGINEER)

    assert (await toolset.call("fixture-echo", {"text": "still here"}, ENGINEER)).output == (
        "still here"
    )
    assert (await toolset.call("fixture-pid", {}, ENGINEER)).output == before


async def test_a_server_that_died_fails_the_call_in_flight_and_is_restarted_on_the_next(
    stack: AsyncExitStack,
) -> None:
    toolset = policy(await open_mcp_tools([stdio_settings()], stack))
    first = (await toolset.call("fixture-pid", {}, ENGINEER)).output

    with pytest.raises(ToolExecutionFailed) as lost:
        await toolset.call("fixture-crash", {}, ENGINEER)
    assert "connection to the tool's MCP server was lost" in lost.value.message

    second = (await toolset.call("fixture-pid", {}, ENGINEER)).output
    assert second != first
    assert (await toolset.call("fixture-echo", {"text": "back"}, ENGINEER)).output == "back"


async def test_tool_lists_are_read_across_pages(stack: AsyncExitStack) -> None:
    whole = await open_mcp_tools([stdio_settings()], stack)
    paged = await open_mcp_tools(
        [stdio_settings(name="paged", env={"MCP_FIXTURE_PAGE_SIZE": "2"})], stack
    )

    assert len(whole) > 4
    assert [t.spec.name.removeprefix("paged-") for t in paged] == [
        t.spec.name.removeprefix("fixture-") for t in whole
    ]


async def test_the_server_gets_its_configured_environment_and_none_of_laminas(
    stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINA_TEST_SECRET", "s3cret")
    toolset = policy(await open_mcp_tools([stdio_settings(env={"REGION": "westeurope"})], stack))

    async def server_env(name: str) -> Any:
        return (await toolset.call("fixture-environment", {"name": name}, ENGINEER)).output

    assert await server_env("REGION") == "westeurope"
    assert await server_env("LAMINA_TEST_SECRET") == "<unset>"


# --- start-up ----------------------------------------------------------------------


async def test_a_server_that_cannot_start_stops_start_up_with_its_name(
    stack: AsyncExitStack,
) -> None:
    servers = [
        stdio_settings(),
        stdio_settings(name="missing", command="/nonexistent/mcp-server"),
        stdio_settings(name="quits", args=["-c", "raise SystemExit(2)"]),
    ]

    with pytest.raises(McpServerUnavailable) as refused:
        await open_mcp_tools(servers, stack)

    text = str(refused.value)
    assert "'missing'" in text
    assert "command not found: /nonexistent/mcp-server" in text
    assert "'quits'" in text
    assert "'fixture'" not in text


async def test_a_server_that_never_answers_stops_start_up_after_the_connect_timeout() -> None:
    silent = stdio_settings(name="silent", args=["-c", "import time; time.sleep(120)"])
    source = McpToolSource(silent, connect_timeout_s=0.5)

    with pytest.raises(McpServerUnavailable, match=r"'silent'.*no answer within 0.5 s"):
        await source.start()
    assert source.tools == []


async def test_two_servers_with_one_name_are_refused(stack: AsyncExitStack) -> None:
    with pytest.raises(ValueError, match="repeated: fixture"):
        await open_mcp_tools([stdio_settings(), stdio_settings()], stack)


def test_remote_names_become_unique_names_model_apis_accept() -> None:
    long = "x" * 80
    names = exposed_tool_names("files", ["read.file", "read_file", "a/b", long])

    assert names["read.file"] == "files-read_file"
    assert names["a/b"] == "files-a_b"
    # "read_file" would clash with the sanitised "read.file": it gets a hash instead.
    assert names["read_file"].startswith("files-read_file_")
    assert len(set(names.values())) == 4
    assert all(len(name) <= 64 for name in names.values())


# --- streamable HTTP -------------------------------------------------------------------


@dataclass
class HttpServer:
    url: str
    port: int


@contextmanager
def fixture_over_http(port: int | None = None) -> Iterator[HttpServer]:
    """The fixture server as its own process, over streamable HTTP (stateful sessions,
    event-stream responses), on a loopback port."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, str(FIXTURE_SERVER), "--http", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the MCP fixture server did not start") from None
                time.sleep(0.05)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", port)
    finally:
        stop_process(process, timeout_s=10)


@dataclass(frozen=True)
class FixedToken:
    token: str
    expires_on: int


class StaticCredential:
    """Stands in for an azure-identity credential: a token per scope, counted."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str) -> FixedToken:
        self.requests.append(scopes)
        return FixedToken(f"token-for-{' '.join(scopes)}", int(time.time()) + 3600)


def http_settings(url: str, **overrides: Any) -> McpServerSettings:
    return McpServerSettings.model_validate(
        {"name": "remote", "transport": "http", "url": url, **overrides}
    )


async def test_a_streamable_http_servers_tools_run_with_the_configured_credentials(
    stack: AsyncExitStack,
) -> None:
    credential = StaticCredential()
    made_for: list[McpServerSettings] = []

    def client_factory(server: McpServerSettings) -> httpx.AsyncClient:
        made_for.append(server)
        return httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0))

    with fixture_over_http() as server:
        settings = http_settings(
            server.url,
            headers={"X-Tenant-Key": "k-123"},
            entra_scope="api://tools/.default",
            trusted_private_network=True,
            tool_risks={"echo": "read"},
        )
        tools = await open_mcp_tools(
            [settings], stack, credential=credential, http_client_factory=client_factory
        )
        toolset = policy(tools)

        async def header(name: str) -> Any:
            return (await toolset.call("remote-request_header", {"name": name}, ENGINEER)).output

        assert (await toolset.call("remote-echo", {"text": "over http"}, ENGINEER)).output == (
            "over http"
        )
        assert (await toolset.call("remote-add", {"a": 1, "b": 1}, ENGINEER)).output == {"total": 2}
        assert await header("x-tenant-key") == "k-123"
        assert await header("authorization") == "Bearer token-for-api://tools/.default"
        # One token serves every request until it nears its expiry.
        assert credential.requests == [("api://tools/.default",)]
        assert [s.name for s in made_for] == ["remote"]
        assert made_for[0].trusted_private_network
        await stack.aclose()


async def test_a_call_to_a_restarted_http_server_goes_to_a_new_session(
    stack: AsyncExitStack,
) -> None:
    port = free_port()
    with fixture_over_http(port) as server:
        source = await stack.enter_async_context(McpToolSource(http_settings(server.url)))
        toolset = policy(list(source.tools))
        assert (await toolset.call("remote-record", {"note": "one"}, ENGINEER)).output == (
            "recorded"
        )

    with fixture_over_http(port):
        # The new server refuses the old session without running anything, so the call
        # is sent again on a new session.
        assert (await toolset.call("remote-record", {"note": "two"}, ENGINEER)).output == (
            "recorded"
        )
        assert await recorded(toolset, "remote") == ["two"]
        await stack.aclose()


async def test_an_unreachable_http_server_stops_start_up_with_its_name(
    stack: AsyncExitStack,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp?key=secret"

    with pytest.raises(McpServerUnavailable) as refused:
        await open_mcp_tools([http_settings(url)], stack)

    text = str(refused.value)
    assert "'remote'" in text
    assert "cannot reach" in text
    assert "secret" not in text


def test_importing_the_mcp_client_leaves_the_sdk_unloaded() -> None:
    script = (
        "import sys, tools.mcp_client\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'azure'))\n"
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
