"""One OpenAPI operation as a Lamina tool: arguments in, one guarded HTTP call, JSON out."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from tools.contracts import (
    JsonValue,
    RiskLevel,
    ToolCaller,
    ToolExecutionFailed,
    ToolSpec,
    ToolTimeout,
)
from tools.http import GuardedHttpClient, GuardedHttpError, GuardedResponse, RequestTimedOut
from tools.openapi.auth import SourceAuth
from tools.openapi.document import Operation, ParameterBinding
from tools.plugins import Tool

logger = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 §9.2.2: repeating one of these has the effect of doing it once."""
MAX_ERROR_EXCERPT = 500


class OpenApiTool(Tool):
    """Calls one operation of an OpenAPI source through the guarded HTTP client.

    Output: the response's JSON; its text if it is text; for an empty body
    ``{"status": <code>}``; for binary content only its type and size. A non-2xx
    answer raises ``ToolExecutionFailed``: for 4xx with a short excerpt of the body
    (what was not found, which field is invalid: what a model can correct); for
    other statuses only the status, since a server error's body may hold internals.
    """

    def __init__(
        self,
        spec: ToolSpec,
        operation: Operation,
        *,
        base_url: str,
        http: GuardedHttpClient,
        auth: SourceAuth,
        timeout_s: float | None,
    ) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.operation = operation
        self._base_url = base_url.rstrip("/")
        self._http = http
        self._auth = auth

    def __repr__(self) -> str:
        return f"OpenApiTool({self.spec.name!r}, {self.operation.method} {self.operation.path})"

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        name = self.spec.name
        operation = self.operation
        path = operation.path
        query: list[tuple[str, str]] = []
        headers = {"Accept": "application/json, text/plain;q=0.9, */*;q=0.1"}
        for binding in operation.bindings:
            value = arguments.get(binding.argument)
            if value is None:
                continue
            if binding.location == "path":
                path = path.replace("{" + binding.name + "}", _path_segment(value, binding))
            elif binding.location == "query":
                query.extend(_query_pairs(value, binding))
            else:
                headers[binding.name] = _text(value, binding.json_encoded)
        content: bytes | None = None
        if operation.body_argument is not None and operation.body_argument in arguments:
            content = json.dumps(arguments[operation.body_argument]).encode()
            headers["Content-Type"] = operation.body_media_type or "application/json"

        try:
            credentials = await self._auth.headers()
        except Exception:
            logger.exception("tool %r: could not get an access token", name)
            raise ToolExecutionFailed(
                name, "could not get an access token for the API; the error has been logged"
            ) from None
        try:
            response = await self._http.request(
                operation.method,
                self._base_url + path,
                headers=headers,
                credentials=credentials,
                params=httpx.QueryParams(tuple(query)),
                content=content,
            )
        except RequestTimedOut as exc:
            raise ToolTimeout(name, f"the API gave no complete answer in time ({exc})") from None
        except GuardedHttpError as exc:
            raise ToolExecutionFailed(name, f"the call was refused: {exc}") from None
        except httpx.HTTPError as exc:
            logger.warning("tool %r: %s %s failed: %r", name, operation.method, path, exc)
            raise ToolExecutionFailed(name, "could not reach the API") from None

        if not response.is_success:
            raise ToolExecutionFailed(name, _failure(name, response, credentials))
        return _output(response)


def tool_spec(
    name: str,
    operation: Operation,
    *,
    risk: RiskLevel | None,
    roles: frozenset[str],
    tenants: frozenset[str],
    origin: str,
    timeout_s: float,
) -> ToolSpec:
    """The spec of an operation's tool; risk defaults to read for safe methods, else write."""
    return ToolSpec(
        name=name,
        description=operation.description,
        parameters=operation.parameters,
        risk=risk or (RiskLevel.READ if operation.method in READ_METHODS else RiskLevel.WRITE),
        required_roles=roles,
        idempotent=operation.method in IDEMPOTENT_METHODS,
        tenants=tenants,
        origin=origin,
        timeout_s=timeout_s,
    )


# --- arguments on the wire ---------------------------------------------------------


def _text(value: Any, json_encoded: bool = False) -> str:
    if json_encoded:
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _path_segment(value: Any, binding: ParameterBinding) -> str:
    if isinstance(value, list) and not binding.json_encoded:
        text = ",".join(_text(item) for item in value)
    else:
        text = _text(value, binding.json_encoded)
    segment = quote(text, safe="")
    # "." and ".." would be read as relative steps, turning /orders/.. into /; escaped,
    # they stay a value.
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _query_pairs(value: Any, binding: ParameterBinding) -> list[tuple[str, str]]:
    if isinstance(value, list) and not binding.json_encoded:
        items = [_text(item) for item in value]
        return (
            [(binding.name, item) for item in items]
            if binding.explode
            else [(binding.name, ",".join(items))]
        )
    return [(binding.name, _text(value, binding.json_encoded))]


# --- responses ---------------------------------------------------------------------


def _output(response: GuardedResponse) -> JsonValue:
    if not response.content:
        return {"status": response.status_code}
    if response.is_json:
        try:
            return response.json()
        except ValueError:
            return response.text()
    media = response.media_type
    if not media or media.startswith("text/") or media.endswith(("+xml", "/xml", "yaml")):
        return response.text()
    return {"status": response.status_code, "content_type": media, "bytes": len(response.content)}


def _failure(name: str, response: GuardedResponse, credentials: Mapping[str, str]) -> str:
    head = f"the API answered {response.status_code} {response.reason_phrase}".rstrip()
    excerpt = _excerpt(response, credentials)
    if 400 <= response.status_code < 500:
        return f"{head}: {excerpt}" if excerpt else head
    if excerpt:
        logger.warning("tool %r: %s; body: %s", name, head, excerpt)
    return head


def _excerpt(response: GuardedResponse, credentials: Mapping[str, str]) -> str:
    if not response.content or response.media_type in ("text/html", "application/xhtml+xml"):
        return ""
    if response.is_json:
        try:
            text = json.dumps(response.json(), ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            text = response.text()
    else:
        text = response.text()
    text = re.sub(r"\s+", " ", text).strip()
    # An API that echoes the request must not hand our credentials to a model.
    for value in credentials.values():
        for secret in {value, value.removeprefix("Bearer ")}:
            if len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
    if len(text) > MAX_ERROR_EXCERPT:
        text = text[: MAX_ERROR_EXCERPT - 1] + "…"
    return text
