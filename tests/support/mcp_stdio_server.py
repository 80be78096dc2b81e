"""A tiny real MCP server for tests, built with the SDK's FastMCP.

Run as a subprocess it speaks MCP over stdio (``python tests/support/mcp_stdio_server.py``),
or over streamable HTTP on loopback with ``--http <port>`` (endpoint ``/mcp``). It
imports nothing of Lamina or of the test suite, so it runs from any directory.

``MCP_FIXTURE_PAGE_SIZE=n`` in its environment makes ``tools/list`` answer in pages of
``n`` tools, so a client has to follow ``nextCursor``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, TypedDict

from mcp import types
from mcp.server.fastmcp import Context, FastMCP


class Sum(TypedDict):
    total: int


def build_server(page_size: int | None = None) -> FastMCP[Any]:
    server: FastMCP[Any] = FastMCP("lamina-fixture", log_level="WARNING")

    @server.tool(structured_output=False)
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> Sum:
        """Add two integers."""
        return {"total": a + b}

    calls: list[str] = []

    @server.tool(structured_output=False)
    def record(note: str) -> str:
        """Remember a note: a side effect tests can look for."""
        calls.append(note)
        return "recorded"

    @server.tool()
    def recorded() -> list[str]:
        """Every note recorded so far."""
        return list(calls)

    @server.tool(structured_output=False)
    def fail(reason: str) -> str:
        """Always fail, with the given reason."""
        raise ValueError(f"refused: {reason}")

    @server.tool(structured_output=False)
    def crash() -> str:
        """End the server process at once, as a crash would."""
        os._exit(3)

    @server.tool(structured_output=False)
    def pid() -> str:
        """The server's process id."""
        return str(os.getpid())

    @server.tool(structured_output=False)
    def environment(name: str) -> str:
        """The value of one environment variable of the server, or '<unset>'."""
        return os.environ.get(name, "<unset>")

    @server.tool(structured_output=False)
    async def sleep(seconds: float) -> str:
        """Wait, then answer."""
        await asyncio.sleep(seconds)
        return "awake"

    @server.tool(name="notes.search", structured_output=False)
    def notes_search(query: str) -> str:
        """A tool whose MCP name holds a character model APIs refuse."""
        return f"no notes about {query}"

    @server.tool(structured_output=False)
    def request_header(name: str, ctx: Context[Any, Any, Any]) -> str:
        """One header of the HTTP request that carried this call ('<none>' over stdio)."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None)
        return "<none>" if headers is None else str(headers.get(name, "<absent>"))

    if page_size:
        _paginate_tool_list(server, page_size)
    return server


def _paginate_tool_list(server: FastMCP[Any], page_size: int) -> None:
    """Answer ``tools/list`` in pages: FastMCP itself always returns every tool at once."""

    # The SDK calls this with no request too, to refresh its own cache of tools.
    async def list_page(request: types.ListToolsRequest | None) -> types.ServerResult:
        tools = await server.list_tools()
        cursor = request.params.cursor if request and request.params else None
        start = int(cursor) if cursor else 0
        end = start + page_size
        return types.ServerResult(
            types.ListToolsResult(
                tools=tools[start:end], nextCursor=str(end) if end < len(tools) else None
            )
        )

    server._mcp_server.request_handlers[types.ListToolsRequest] = list_page
    # Bypassing the SDK's decorator leaves its cache of tools empty, about which it warns
    # on every call; that cache only serves input validation, which FastMCP does itself.
    logging.getLogger("mcp.server.lowlevel.server").setLevel(logging.ERROR)


if __name__ == "__main__":
    size = os.environ.get("MCP_FIXTURE_PAGE_SIZE")
    fixture = build_server(int(size) if size else None)
    if sys.argv[1:2] == ["--http"]:
        fixture.settings.port = int(sys.argv[2])
        fixture.run("streamable-http")
    else:
        fixture.run("stdio")
