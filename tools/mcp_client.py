"""Tools from external MCP servers, behind the same execution policy as every tool.

Each configured server (:class:`~tools.settings.McpServerSettings`) becomes an
:class:`McpToolSource`: it starts the server (stdio) or connects to it (streamable
HTTP), initializes an MCP session, lists the server's tools (following pagination)
and offers each as an :class:`McpTool` named ``<server>-<tool>``. The policy then
treats them like any other tool: their JSON schema is checked before the server is
called, and roles, tenants, risk, timeout, output cap and audit all apply. Their risk
comes from configuration (default ``write``), never from the server's own hints,
which an MCP server is free to get wrong.

Start-up is all or nothing (:func:`open_mcp_tools` raises
:class:`McpServerUnavailable`, naming the server): every replica of a deployment then
offers the same tools, and a typo in a command or URL is found at deploy time rather
than by users. At run time a dropped connection (the stdio server died, the HTTP
server restarted) fails the call in flight, and the next call reconnects once.

The server sees Lamina's identity (the configured headers, or an Entra token of
Lamina's own), never the caller's: who may call which tool is decided by Lamina's
policy before the call is sent.

``mcp`` is imported only when a source starts, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import httpx
from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for

from tools.contracts import (
    DEFAULT_TOOL_TIMEOUT_S,
    JsonValue,
    RiskLevel,
    ToolCaller,
    ToolError,
    ToolExecutionFailed,
    ToolSpec,
)
from tools.plugins import TOOL_NAME_PATTERN, Tool
from tools.settings import McpServerSettings

if TYPE_CHECKING:
    from anyio import CancelScope
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from mcp import ClientSession
    from mcp.shared.message import SessionMessage
    from mcp.types import CallToolResult, ContentBlock
    from mcp.types import Tool as RemoteTool

    Streams: TypeAlias = tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 30.0
"""Time a server has to start, initialize and list its tools."""
RECONNECT_COOLDOWN_S = 5.0
"""After a failed reconnect, calls fail at once for this long instead of each waiting
on a server that is down."""
_MAX_TOOL_PAGES = 100
_MAX_ERROR_CHARS = 500
_CONNECTION_CLOSED = -32000
"""The SDK's code for a request whose session ended before the answer came."""
_SESSION_UNKNOWN = 32600
"""The SDK's code for a streamable-HTTP session the server no longer knows (it answered
404, e.g. after a restart): the server refused the request without running it."""
_LOST = "the connection to the tool's MCP server was lost; the call may not have run"
_UNAVAILABLE = "the tool's MCP server is unavailable right now; try again later"


class McpServerUnavailable(ToolError):
    """A configured MCP server could not be started or reached at start-up.
    ``tool`` is ``mcp:<server>``; the message says what went wrong, for the operator."""


class AccessToken(Protocol):
    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> int:
        """Seconds since the epoch."""
        ...


class AsyncTokenCredential(Protocol):
    """What this module needs of an azure-identity async credential
    (e.g. ``azure.identity.aio.DefaultAzureCredential``)."""

    async def get_token(self, *scopes: str) -> AccessToken: ...


HttpClientFactory: TypeAlias = Callable[[McpServerSettings], httpx.AsyncClient]
"""Makes the HTTP client one ``http`` server is reached with, e.g. the guarded client of
the tools layer, which lets the server's host be on a private network when
``trusted_private_network`` is set. Each call returns a new client; the source adds the
configured headers and Entra auth to it and closes it when the connection ends."""


# --- the tools -------------------------------------------------------------------


class McpTool(Tool):
    """One tool of an MCP server; :meth:`invoke` calls it over the source's session."""

    def __init__(
        self, source: McpToolSource, remote_name: str, spec: ToolSpec, timeout_s: float | None
    ) -> None:
        self._source = source
        self.remote_name = remote_name
        """The tool's name on its server."""
        self.spec = spec
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"McpTool({self.spec.name!r}, risk={self.spec.risk.value})"

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        result = await self._source.call(self.spec.name, self.remote_name, dict(arguments))
        return tool_output(self.spec.name, result)


def tool_output(tool: str, result: CallToolResult) -> JsonValue:
    """A tool result as JSON: its structured content when the server gave some, else its
    text; a result flagged as an error becomes ``ToolExecutionFailed`` with the server's
    text, shortened (MCP servers write it for the model to read)."""
    if result.isError:
        text = "\n".join(_block_text(block) for block in result.content).strip()
        raise ToolExecutionFailed(
            tool, "the tool reported an error: " + _shorten(text or "no details given")
        )
    if result.structuredContent is not None:
        return result.structuredContent
    parts = [_block_json(block) for block in result.content]
    if all(isinstance(part, str) for part in parts):
        return "\n".join(str(part) for part in parts)
    return parts


def _block_text(block: ContentBlock) -> str:
    part = _block_json(block)
    return part if isinstance(part, str) else ""


def _block_json(block: ContentBlock) -> JsonValue:
    if block.type == "text":
        return block.text
    if block.type == "resource_link":
        return {"type": "resource_link", "uri": str(block.uri), "name": block.name}
    if block.type == "resource":
        resource = block.resource
        text = getattr(resource, "text", None)
        if isinstance(text, str):
            return {"type": "resource", "uri": str(resource.uri), "text": text}
        return {"type": "resource", "uri": str(resource.uri), "omitted": "binary content"}
    # Images and audio are base64 data a model cannot use as text, and would only fill
    # the output cap.
    return {"type": block.type, "mime_type": block.mimeType, "omitted": "binary content"}


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


# --- naming and specs ------------------------------------------------------------

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_TOOL_NAME = 64


def exposed_tool_names(server: str, remote_names: Sequence[str]) -> dict[str, str]:
    """Lamina's name of each remote tool: ``<server>-<tool>``, with characters model APIs
    refuse (MCP allows ``.`` and ``/``) replaced by ``_``. A name that would be too long,
    or would clash with another, ends in a short hash of the remote name instead."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for remote in remote_names:
        name = f"{server}-{_UNSAFE_NAME_CHARACTERS.sub('_', remote)}"
        if len(name) > _MAX_TOOL_NAME or name in taken:
            digest = hashlib.sha256(remote.encode()).hexdigest()[:8]
            name = f"{name[: _MAX_TOOL_NAME - 9]}_{digest}"
        names[remote] = name
        taken.add(name)
    return names


def _parameters(server: str, remote: RemoteTool) -> dict[str, Any] | None:
    """The remote input schema as a tool's ``parameters``, or ``None`` if unusable."""
    schema = copy.deepcopy(dict(remote.inputSchema))
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        logger.warning(
            "MCP server %r: tool %r skipped: its input schema is not of type object",
            server,
            remote.name,
        )
        return None
    # Some model APIs refuse an object schema without properties.
    schema.setdefault("properties", {})
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        logger.warning(
            "MCP server %r: tool %r skipped: its input schema is invalid (%s)",
            server,
            remote.name,
            exc.message,
        )
        return None
    return schema


def _description(server: str, remote: RemoteTool) -> str:
    title = remote.annotations.title if remote.annotations else None
    return (
        remote.description
        or remote.title
        or title
        or f"The {remote.name!r} tool of the {server!r} MCP server."
    )


# --- one connection --------------------------------------------------------------


class _ConnectionLost(Exception):
    """The session ended: the server went away, or the transport failed."""


class _Connection:
    """One live MCP session, held open by a task of its own.

    The SDK's transports run anyio task groups, which must be left by the task that
    entered them; calls arrive from request tasks, and a reconnect may happen in any of
    them. So each connection has one task that enters the transport and the session,
    waits until told to stop (or until the server goes away), and leaves them again.
    """

    def __init__(
        self,
        server: str,
        transport: Callable[[], AbstractAsyncContextManager[Streams]],
        timeout_s: float,
    ) -> None:
        self._server = server
        self._transport = transport
        self._timeout_s = timeout_s
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._session: ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.tools: list[RemoteTool] = []
        """What the server listed when the session opened."""

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def mark_lost(self) -> None:
        self._lost.set()

    async def open(self) -> None:
        """Start the session and list the server's tools; raise if that fails."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._hold(ready), name=f"mcp-{self._server}")
        try:
            await ready
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._stop.set()
        task = self._task
        if task is None:
            return
        if self._session is None:
            task.cancel()  # still starting: there is no session to end politely
        # Waited for, not awaited: a closer being cancelled must not cut the transport's
        # own shutdown short (for stdio: close stdin, wait, then terminate the process).
        await asyncio.wait({task})

    async def request(self, call: Callable[[ClientSession], Awaitable[T]]) -> T:
        """Run ``call`` on the session; raise :class:`_ConnectionLost` if the session ends
        first, rather than waiting for an answer that will never come."""
        if self._session is None or self.lost:
            raise _ConnectionLost
        pending = asyncio.ensure_future(call(self._session))
        ended = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({pending, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not pending.done():
                pending.cancel()
                pending.add_done_callback(_consume)
        if pending.done():
            return pending.result()
        raise _ConnectionLost

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        import anyio
        from mcp import ClientSession
        from mcp.shared.message import SessionMessage
        from mcp.types import Implementation

        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                # Messages pass through a stream of ours, so that the end of the
                # server's output (a dead process, a closed transport) ends the session.
                inbox_writer, inbox = anyio.create_memory_object_stream[
                    SessionMessage | Exception
                ]()
                # Closed here whatever happens: their readers may be cancelled before
                # they ever run, and an unclosed stream is a leak.
                for stream in (read, inbox_writer, inbox):
                    stack.push_async_callback(stream.aclose)
                session = await stack.enter_async_context(
                    ClientSession(
                        inbox, write, client_info=Implementation(name="lamina", version="0.1.0")
                    )
                )
                async with anyio.create_task_group() as watch:
                    watch.start_soon(_forward, read, inbox_writer, watch.cancel_scope)
                    try:
                        with anyio.fail_after(self._timeout_s):
                            await session.initialize()
                            self.tools = await _list_tools(session)
                    except TimeoutError:
                        raise TimeoutError(f"no answer within {self._timeout_s:g} s") from None
                    self._session = session
                    ready.set_result(None)
                    await self._stop.wait()
                    watch.cancel_scope.cancel()
            if ready.done() and not self._stop.is_set():
                logger.warning("MCP server %r: the server closed the connection", self._server)
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif not self._stop.is_set():
                logger.warning(
                    "MCP server %r: the connection ended: %s", self._server, describe(exc)
                )
        finally:
            self._lost.set()
            if not ready.done():
                ready.set_exception(_ConnectionLost("the server closed the connection"))


async def _forward(
    source: MemoryObjectReceiveStream[SessionMessage | Exception],
    sink: MemoryObjectSendStream[SessionMessage | Exception],
    scope: CancelScope,
) -> None:
    async with sink:
        async for message in source:
            await sink.send(message)
    scope.cancel()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as unhandled."""
    if not task.cancelled():
        task.exception()


async def _list_tools(session: ClientSession) -> list[RemoteTool]:
    from mcp.types import PaginatedRequestParams

    tools: list[RemoteTool] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(_MAX_TOOL_PAGES):
        params = PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.nextCursor
        if not cursor or cursor in seen:  # a server repeating a cursor would loop forever
            break
        seen.add(cursor)
    return tools


def describe(exc: BaseException) -> str:
    """What went wrong, for an operator: the first real cause inside exception groups."""
    from mcp import McpError

    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {exc.filename or exc}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {_without_query(exc.request.url)}"
    if isinstance(exc, httpx.TransportError):
        where = _without_query(exc.request.url) if _has_request(exc) else "the server"
        return f"cannot reach {where}: {type(exc).__name__} {exc}".strip()
    if isinstance(exc, TimeoutError):
        return str(exc) or "no answer in time"
    if isinstance(exc, McpError):
        return f"MCP error {exc.error.code}: {exc.error.message}"
    if isinstance(exc, _ConnectionLost):
        return str(exc) or "the server closed the connection"
    return f"{type(exc).__name__}: {exc}"


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - raises when the error carries no request
    except RuntimeError:
        return False
    return True


def _without_query(url: httpx.URL) -> str:
    # A query string can carry a key; it has no place in a log line.
    return str(url.copy_with(query=None, fragment=None))


# --- Entra ID ----------------------------------------------------------------------


class EntraTokenAuth(httpx.Auth):
    """A bearer token for ``scope`` from an azure-identity credential on every request,
    fetched again a few minutes before it expires."""

    _REFRESH_MARGIN_S = 300

    def __init__(self, credential: AsyncTokenCredential, scope: str) -> None:
        self._credential = credential
        self._scope = scope
        self._token: AccessToken | None = None

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self._token
        if token is None or token.expires_on - self._REFRESH_MARGIN_S <= time.time():
            token = self._token = await self._credential.get_token(self._scope)
        request.headers["Authorization"] = f"Bearer {token.token}"
        yield request


# --- one server --------------------------------------------------------------------


class McpToolSource:
    """The tools of one MCP server, over one session kept open until :meth:`aclose`.

    ``start()`` (or ``async with``) connects, initializes and lists the tools; then
    :attr:`tools` holds one :class:`McpTool` per usable remote tool.
    """

    def __init__(
        self,
        settings: McpServerSettings,
        *,
        credential: AsyncTokenCredential | None = None,
        http_client_factory: HttpClientFactory | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if settings.entra_scope and credential is None:
            raise ValueError(f"MCP server {settings.name!r}: entra_scope needs a credential")
        self.settings = settings
        self._credential = credential
        self._http_client_factory = http_client_factory
        self._connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._retry_at = 0.0
        self._tools: list[McpTool] = []

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def tools(self) -> list[McpTool]:
        return list(self._tools)

    async def __aenter__(self) -> McpToolSource:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect and list the tools; raise :class:`McpServerUnavailable` if that fails."""
        try:
            connection = await self._connect()
        except Exception as exc:
            logger.debug("MCP server %r failed to start", self.name, exc_info=True)
            raise McpServerUnavailable(
                f"mcp:{self.name}",
                f"the MCP server {self.name!r} ({self._target()}) could not be started: "
                + describe(exc),
            ) from None
        self._connection = connection
        self._tools = self._make_tools(connection.tools)
        logger.info(
            "MCP server %r: %d tool(s): %s",
            self.name,
            len(self._tools),
            ", ".join(tool.spec.name for tool in self._tools) or "none",
        )

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def call(self, tool: str, remote_name: str, arguments: dict[str, Any]) -> CallToolResult:
        """Call ``remote_name`` on the server (for :class:`McpTool`); connection failures
        become ``ToolExecutionFailed`` with a message safe for users and models."""
        import anyio
        from mcp import McpError

        # A request that provably never ran (it could not be sent, or the server refused
        # the session before looking at it) is sent again once on a fresh session; one
        # that may have run is not, since a write must not happen twice.
        for _ in range(2):
            connection = await self._live_connection(tool)
            try:
                return await connection.request(
                    lambda session: session.call_tool(remote_name, arguments)
                )
            except _ConnectionLost:
                raise ToolExecutionFailed(tool, _LOST) from None
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                connection.mark_lost()
            except McpError as exc:
                if exc.error.code == _CONNECTION_CLOSED:
                    connection.mark_lost()
                    raise ToolExecutionFailed(tool, _LOST) from None
                if exc.error.code == _SESSION_UNKNOWN:
                    connection.mark_lost()
                    continue
                # A protocol error's text is whatever the server put there: log it, do
                # not pass it on.
                logger.warning(
                    "MCP server %r refused %r: %s", self.name, remote_name, describe(exc)
                )
                raise ToolExecutionFailed(
                    tool, f"the tool's MCP server refused the call (error {exc.error.code})"
                ) from None
            logger.info("MCP server %r: the session had ended; sending again", self.name)
        raise ToolExecutionFailed(tool, _UNAVAILABLE)

    async def _live_connection(self, tool: str) -> _Connection:
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.lost:
                return connection
            if self._closed or time.monotonic() < self._retry_at:
                raise ToolExecutionFailed(tool, _UNAVAILABLE)
            if connection is not None:
                self._connection = None
                await connection.close()
            try:
                connection = await self._connect()
            except Exception as exc:
                self._retry_at = time.monotonic() + RECONNECT_COOLDOWN_S
                logger.warning("MCP server %r: reconnecting failed: %s", self.name, describe(exc))
                raise ToolExecutionFailed(tool, _UNAVAILABLE) from None
            logger.info("MCP server %r: reconnected", self.name)
            self._connection = connection
            return connection

    async def _connect(self) -> _Connection:
        connection = _Connection(self.name, self._transport, self._connect_timeout_s)
        await connection.open()
        return connection

    def _transport(self) -> AbstractAsyncContextManager[Streams]:
        if self.settings.transport == "stdio":
            return self._stdio_transport()
        return self._http_transport()

    @asynccontextmanager
    async def _stdio_transport(self) -> AsyncIterator[Streams]:
        from mcp import StdioServerParameters, stdio_client

        assert self.settings.command is not None  # the settings' validator saw to it
        # The SDK starts the process with a minimal environment (PATH, HOME, ...) plus
        # the configured one, so none of Lamina's own secrets reach the server.
        parameters = StdioServerParameters(
            command=self.settings.command, args=self.settings.args, env=dict(self.settings.env)
        )
        async with stdio_client(parameters) as streams:
            yield streams

    @asynccontextmanager
    async def _http_transport(self) -> AsyncIterator[Streams]:
        from mcp.client.streamable_http import streamable_http_client

        assert self.settings.url is not None  # the settings' validator saw to it
        if self._http_client_factory is not None:
            client = self._http_client_factory(self.settings)
        else:
            # The SDK's defaults: a response stream may stay open for minutes.
            client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=300.0))
        async with client:
            client.headers.update(
                {name: value.get_secret_value() for name, value in self.settings.headers.items()}
            )
            if self.settings.entra_scope is not None:
                assert self._credential is not None  # checked in __init__
                client.auth = EntraTokenAuth(self._credential, self.settings.entra_scope)
            async with streamable_http_client(self.settings.url, http_client=client) as (
                read,
                write,
                _,
            ):
                yield read, write

    def _target(self) -> str:
        if self.settings.transport == "stdio":
            return f"command {self.settings.command!r}"
        return f"url {_without_query(httpx.URL(self.settings.url or ''))!r}"

    def _make_tools(self, remote_tools: Sequence[RemoteTool]) -> list[McpTool]:
        settings = self.settings
        unknown = sorted(set(settings.tool_risks) - {tool.name for tool in remote_tools})
        if unknown:
            logger.warning(
                "MCP server %r: tool_risks names tools the server does not offer: %s",
                self.name,
                ", ".join(unknown),
            )
        names = exposed_tool_names(self.name, [tool.name for tool in remote_tools])
        tools: list[McpTool] = []
        for remote in remote_tools:
            parameters = _parameters(self.name, remote)
            if parameters is None:
                continue
            name = names[remote.name]
            if not TOOL_NAME_PATTERN.fullmatch(name):  # only an empty remote name gets here
                logger.warning("MCP server %r: tool %r skipped: unusable name", self.name, name)
                continue
            risk = settings.tool_risks.get(remote.name, settings.risk)
            spec = ToolSpec(
                name=name,
                description=_description(self.name, remote),
                parameters=parameters,
                risk=risk,
                required_roles=frozenset(settings.roles),
                timeout_s=settings.timeout_s or DEFAULT_TOOL_TIMEOUT_S,
                # A write is not assumed safe to retry, whatever the server hints.
                idempotent=risk == RiskLevel.READ,
                tenants=frozenset(settings.tenants or ()),
                origin=f"mcp:{self.name}",
            )
            tools.append(McpTool(self, remote.name, spec, settings.timeout_s))
        return tools


# --- every configured server -------------------------------------------------------


async def open_mcp_tools(
    servers: Sequence[McpServerSettings],
    stack: AsyncExitStack,
    *,
    credential: AsyncTokenCredential | None = None,
    http_client_factory: HttpClientFactory | None = None,
) -> list[Tool]:
    """Start every configured MCP server and return their tools; ``stack`` closes the
    sessions (and a credential this function made) at shutdown.

    All servers start concurrently. If any cannot be started, the others are closed
    again and :class:`McpServerUnavailable` names every one that failed: a deployment
    offers all its configured tools or does not start.

    Args:
        servers: ``ToolsSettings.mcp_servers``.
        stack: the composition root's exit stack.
        credential: an azure-identity async credential, for servers with an
            ``entra_scope``; default a ``DefaultAzureCredential`` made when one is needed.
        http_client_factory: makes the HTTP client of each ``http`` server (see
            :data:`HttpClientFactory`); default a plain ``httpx.AsyncClient``.
    """
    if not servers:
        return []
    names = [server.name for server in servers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            "LAMINA_TOOLS__MCP_SERVERS: each server needs its own name; repeated: "
            + ", ".join(repeated)
        )
    # The sessions and a credential made here close together, on the caller's stack,
    # or at once if start-up fails: the caller's stack holds more than these.
    opened = AsyncExitStack()
    if credential is None and any(server.entra_scope for server in servers):
        # Imported here: azure-identity costs import time and only Entra auth needs it.
        from azure.identity.aio import DefaultAzureCredential

        default_credential = DefaultAzureCredential()
        opened.push_async_callback(default_credential.close)
        credential = default_credential
    sources = [
        McpToolSource(server, credential=credential, http_client_factory=http_client_factory)
        for server in servers
    ]
    outcomes = await asyncio.gather(*(source.start() for source in sources), return_exceptions=True)
    for source, outcome in zip(sources, outcomes, strict=True):
        if outcome is None:
            opened.push_async_callback(source.aclose)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if failures:
        await opened.aclose()
        unavailable = [f for f in failures if isinstance(f, McpServerUnavailable)]
        if len(unavailable) < len(failures):  # not a start-up failure: a bug, or cancellation
            raise next(f for f in failures if not isinstance(f, McpServerUnavailable))
        raise McpServerUnavailable(
            ", ".join(f.tool for f in unavailable), "; ".join(f.message for f in unavailable)
        )
    stack.push_async_callback(opened.aclose)
    return [tool for source in sources for tool in source.tools]
