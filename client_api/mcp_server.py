"""Lamina as an MCP server: the caller's tools and a security-trimmed knowledge search,
over streamable HTTP at ``/mcp``, behind the REST API's own authentication.

- **Who may call.** ``POST /mcp`` is an ordinary route that depends on ``ChatCaller``:
  the same credentials as the REST API (Entra ID token, API key, or dev headers), the
  ``chat`` permission, the same requests-per-minute limits, and the same
  ``application/problem+json`` 401/403/429 answers.
- **What a caller sees.** ``tools/list`` is built per request from the principal: the
  tools the toolset lets them use (roles, tenant), without high-risk ones, plus
  ``search_knowledge``, which retrieves only passages they may read. A high-risk tool
  runs only after a person approves that exact call in Lamina's approval flow; an MCP
  client has no way to wait for that decision, so such tools are neither offered nor
  run here (a call is refused by the policy like any unapproved one).
- **Every call through the policy.** ``tools/call`` goes to ``Toolset.call``, so the
  arguments are checked against the schema, and roles, tenant, risk, timeout, output
  cap and audit apply. A ``ToolError`` becomes an MCP error result (``isError``) with
  its message, which is written to be safe for users and models.
- **Stateless, JSON answers.** Each POST is one complete exchange with no MCP session:
  every request is authenticated on its own anyway, any replica can answer any request
  (no sticky sessions, no session table to share or bound), and Lamina sends no
  server-initiated requests or notifications, which are what sessions and event
  streams are for. So ``GET`` (an event stream) and ``DELETE`` (ending a session) are
  answered 405, as the MCP specification allows.

``mcp`` is imported when the app starts serving, not when this module is imported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from jsonschema.validators import Draft202012Validator
from starlette.types import Receive, Scope, Send

from client_api.auth.dependencies import ChatCaller
from client_api.problems import Problem
from intelligence.contracts import SEARCH_KNOWLEDGE, Principal
from knowledge.contracts import KnowledgeError, RetrievalQuery, Retriever
from tools.contracts import (
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolError,
    Toolset,
    ToolSpec,
)

if TYPE_CHECKING:
    from mcp import types
    from mcp.server.lowlevel import Server
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from client_api.composition import Services

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
MAX_SEARCH_RESULTS = 20
_MAX_QUERY_CHARS = 2_000
_SNIPPET_CHARS = 1_200
_PRINCIPAL = "mcp_principal"
"""Where the route leaves the authenticated principal in the request's state for the
MCP handlers, which the SDK runs in tasks of its own and hands only the request."""

_INSTRUCTIONS = (
    "Lamina, your organisation's assistant backend. search_knowledge finds passages in "
    "the documents you may read, with their titles and sources; the other tools act on "
    "your organisation's systems with your permissions."
)


def search_tool_schema(max_results: int = MAX_SEARCH_RESULTS) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": _MAX_QUERY_CHARS,
                "description": "What to look for, in natural language or keywords",
            },
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_results,
                "description": "How many passages to return at most",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    }


class McpTools:
    """What the MCP server offers one principal, and how a call runs: the toolset's
    tools (high-risk ones left out) and ``search_knowledge``."""

    def __init__(self, toolset: Toolset, retriever: Retriever, *, default_top_k: int) -> None:
        self._toolset = toolset
        self._retriever = retriever
        self._default_top_k = min(default_top_k, MAX_SEARCH_RESULTS)
        self._search_schema = search_tool_schema()
        self._search_validator = Draft202012Validator(self._search_schema)

    def specs(self, principal: Principal) -> list[ToolSpec]:
        """The toolset's tools this principal may call over MCP."""
        specs = []
        for spec in self._toolset.list_tools(principal):
            if spec.risk not in (RiskLevel.READ, RiskLevel.WRITE):
                continue  # needs a person's approval, which an MCP client cannot wait for
            if spec.name == SEARCH_KNOWLEDGE:
                log.warning(
                    "tool %r is hidden over MCP: the knowledge search has its name",
                    SEARCH_KNOWLEDGE,
                )
                continue
            specs.append(spec)
        return specs

    def list_tools(self, principal: Principal) -> list[types.Tool]:
        from mcp import types

        search = types.Tool(
            name=SEARCH_KNOWLEDGE,
            description=(
                "Search the organisation's documents you may read. Returns the best "
                "passages, each with its title, source, section and a snippet of its text."
            ),
            inputSchema=self._search_schema,
            annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=False),
        )
        return [search, *(_mcp_tool(spec) for spec in self.specs(principal))]

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any], principal: Principal
    ) -> types.CallToolResult:
        """Run one call; every failure is an error result, never an exception."""
        try:
            if name == SEARCH_KNOWLEDGE:
                output = await self._search(arguments, principal)
            else:
                output = (await self._toolset.call(name, arguments, principal)).output
        except ToolError as exc:
            return _error_result(exc.message)
        except KnowledgeError as exc:
            return _error_result(str(exc))  # the knowledge layer's messages are user-safe
        except Exception:
            log.exception("MCP call of %r failed", name)
            return _error_result("the tool failed; the error has been logged")
        return _result(output)

    async def _search(self, arguments: Mapping[str, Any], principal: Principal) -> JsonValue:
        errors = tuple(sorted(e.message for e in self._search_validator.iter_errors(arguments)))
        if errors:
            message = "the arguments do not match the tool's schema: " + "; ".join(errors)
            raise InvalidToolArguments(SEARCH_KNOWLEDGE, message, errors)
        top_k = int(arguments.get("top_k", self._default_top_k))
        result = await self._retriever.retrieve(
            RetrievalQuery(text=str(arguments["query"]), top_k=top_k), principal
        )
        return {
            "passages": [
                {
                    "chunk_id": passage.chunk.chunk_id,
                    "document_id": passage.chunk.document_id,
                    "title": passage.chunk.title,
                    "source": passage.chunk.source,
                    "section": passage.chunk.section,
                    "page": passage.chunk.page,
                    "snippet": _snippet(passage.chunk.text),
                    "score": round(passage.score, 4),
                }
                for passage in result.passages
            ]
        }


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[: _SNIPPET_CHARS - 1] + "…"


def _mcp_tool(spec: ToolSpec) -> types.Tool:
    from mcp import types

    return types.Tool(
        name=spec.name,
        description=spec.description,
        inputSchema=dict(spec.parameters),
        annotations=types.ToolAnnotations(
            readOnlyHint=spec.risk == RiskLevel.READ, idempotentHint=spec.idempotent
        ),
    )


def _result(output: JsonValue) -> types.CallToolResult:
    from mcp import types

    text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structuredContent=output if isinstance(output, dict) else None,
    )


def _error_result(message: str) -> types.CallToolResult:
    from mcp import types

    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)], isError=True
    )


def build_mcp_server(tools: McpTools, *, version: str) -> Server[Any, Request]:
    """The SDK's low-level server with Lamina's two handlers; the principal of each
    request comes from the request the route authenticated."""
    from mcp import types
    from mcp.server.lowlevel import Server

    server: Server[Any, Request] = Server("lamina", version=version, instructions=_INSTRUCTIONS)

    def principal() -> Principal:
        request = server.request_context.request
        found = None if request is None else getattr(request.state, _PRINCIPAL, None)
        if not isinstance(found, Principal):  # only the authenticating route reaches here
            raise RuntimeError("MCP request without an authenticated principal")
        return found

    async def list_tools(request: types.ListToolsRequest) -> types.ServerResult:
        return types.ServerResult(types.ListToolsResult(tools=tools.list_tools(principal())))

    async def call_tool(request: types.CallToolRequest) -> types.ServerResult:
        params = request.params
        result = await tools.call_tool(params.name, params.arguments or {}, principal())
        return types.ServerResult(result)

    # Registered as they are rather than through the SDK's decorators: those keep one
    # process-wide cache of the last tool list, to validate arguments against, but each
    # caller here sees a list of their own, and the policy validates arguments itself.
    server.request_handlers[types.ListToolsRequest] = list_tools
    server.request_handlers[types.CallToolRequest] = call_tool
    return server


class _McpExchange(Response):
    """Hands an authenticated request to the session manager, which answers it itself."""

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        super().__init__()
        self._manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._manager.handle_request(scope, receive, send)


class McpEndpoint:
    """``POST /mcp`` and the MCP session manager behind it, which runs while the app
    serves (:meth:`running`, entered in the app's lifespan)."""

    def __init__(self, version: str) -> None:
        self._version = version
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def running(self, services: Services) -> AsyncIterator[None]:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

        tools = McpTools(
            services.toolset, services.retriever, default_top_k=services.settings.knowledge.top_k
        )
        manager = StreamableHTTPSessionManager(
            build_mcp_server(tools, version=self._version), stateless=True, json_response=True
        )
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def handle(self, request: Request, principal: ChatCaller) -> Response:
        manager = self._manager
        if manager is None:
            raise Problem(503, "Starting", "The MCP server is not running yet.")
        setattr(request.state, _PRINCIPAL, principal)
        return _McpExchange(manager)


def mount_mcp_server(app: FastAPI) -> McpEndpoint:
    """Add ``POST /mcp`` to ``app``; enter :meth:`McpEndpoint.running` in its lifespan."""
    endpoint = McpEndpoint(version=app.version)
    app.add_api_route(
        MCP_PATH,
        endpoint.handle,
        methods=["POST"],
        include_in_schema=False,
        summary="MCP (streamable HTTP): the caller's tools and knowledge search",
    )
    return endpoint
