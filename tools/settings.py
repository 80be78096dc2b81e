"""Settings of the tools layer (``LAMINA_TOOLS__*``).

Lists of sources (MCP servers, OpenAPI documents) are JSON in one variable, e.g.
``LAMINA_TOOLS__MCP_SERVERS='[{"name": "files", "transport": "stdio", "command": "..."}]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from tools.contracts import RiskLevel

SOURCE_NAME_PATTERN = r"^[A-Za-z0-9_]{1,32}$"
"""Names of MCP servers and OpenAPI sources: they prefix tool names (``<source>-<tool>``)."""


class TenantToolSettings(BaseModel):
    """Which tools one tenant may use (``LAMINA_TOOLS__TENANTS='{"contoso": {...}}'``)."""

    enabled: list[str] | None = Field(
        default=None, description="Only these tools for the tenant; default all"
    )
    disabled: list[str] = Field(default_factory=list, description="Never these tools")


class ApprovalSettings(BaseModel):
    """Human approval of high-risk tool calls (``LAMINA_TOOLS__APPROVALS__*``)."""

    ttl_s: float = Field(
        default=3600.0, gt=0, le=30 * 86_400, description="A pending approval expires after this"
    )
    approver_roles: list[str] = Field(
        default_factory=list,
        description="Roles that may decide any approval of their tenant (besides the requester)",
    )
    backend: Literal["auto", "sqlite", "redis"] = Field(
        default="auto", description="auto: Redis when LAMINA_REDIS__URL is set, else SQLite"
    )
    path: Path | None = Field(
        default=None, description="SQLite file; default <data_dir>/approvals.db"
    )
    redis_prefix: str = Field(default="lamina:approvals:", min_length=1, description="Redis keys")


class HttpSettings(BaseModel):
    """The guarded HTTP client every URL-fetching tool uses (``LAMINA_TOOLS__HTTP__*``)."""

    allowed_hosts: list[str] | None = Field(
        default=None,
        description="Only these hosts ('example.com', '*.example.com'); default any public host",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Whole-request time cap")
    max_response_bytes: int = Field(
        default=5_000_000, ge=1_024, description="Longer responses are refused"
    )
    max_redirects: int = Field(default=5, ge=0, le=20, description="Redirects followed at most")


class McpServerSettings(BaseModel):
    """One external MCP server whose tools Lamina offers, behind the same policy."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN, description="Prefix of its tools' names")
    transport: Literal["stdio", "http"] = "stdio"
    command: str | None = Field(default=None, description="stdio: the program to start")
    args: list[str] = Field(default_factory=list, description="stdio: its arguments")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: extra environment")
    url: str | None = Field(default=None, description="http: the streamable-HTTP endpoint")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="http: extra request headers (e.g. an API key)"
    )
    entra_scope: str | None = Field(
        default=None, description="http: send an Entra token for this scope (azure-identity)"
    )
    trusted_private_network: bool = Field(
        default=False, description="http: the server may be on a private address"
    )
    tenants: list[str] | None = Field(
        default=None, description="Only these tenants see its tools; default every tenant"
    )
    risk: RiskLevel = Field(default=RiskLevel.WRITE, description="Risk of its tools")
    tool_risks: dict[str, RiskLevel] = Field(
        default_factory=dict, description="Risk by the server's tool name, overriding risk"
    )
    roles: list[str] = Field(default_factory=list, description="Roles that may use its tools")
    timeout_s: float | None = Field(default=None, gt=0, le=600, description="Per-call timeout")

    @model_validator(mode="after")
    def _check_transport(self) -> McpServerSettings:
        if self.transport == "stdio" and not self.command:
            raise ValueError(f"MCP server {self.name!r}: transport 'stdio' needs a command")
        if self.transport == "http" and not self.url:
            raise ValueError(f"MCP server {self.name!r}: transport 'http' needs a url")
        return self


class OpenApiSourceSettings(BaseModel):
    """One OpenAPI 3 document whose operations become tools."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN, description="Prefix of its tools' names")
    spec: str = Field(description="Path or URL of the OpenAPI 3 document (JSON or YAML)")
    base_url: str | None = Field(
        default=None, description="Where to send calls; default the document's first server"
    )
    auth: Literal["none", "api_key", "bearer", "entra"] = "none"
    api_key: SecretStr | None = Field(default=None, description="auth=api_key: the key")
    api_key_header: str = Field(default="X-API-Key", description="auth=api_key: its header")
    bearer_token: SecretStr | None = Field(default=None, description="auth=bearer: the token")
    entra_scope: str | None = Field(
        default=None, description="auth=entra: client-credentials scope, e.g. api://x/.default"
    )
    operations: list[str] | None = Field(
        default=None, description="Only these operationIds; default every operation"
    )
    operation_risks: dict[str, RiskLevel] = Field(
        default_factory=dict,
        description="Risk by operationId; default read for GET/HEAD, write otherwise",
    )
    roles: list[str] = Field(default_factory=list, description="Roles that may use its tools")
    tenants: list[str] | None = Field(
        default=None, description="Only these tenants see its tools; default every tenant"
    )
    trusted_private_network: bool = Field(
        default=False, description="The API may be on a private address (an internal service)"
    )
    timeout_s: float | None = Field(default=None, gt=0, le=600, description="Per-call timeout")

    @model_validator(mode="after")
    def _check_auth(self) -> OpenApiSourceSettings:
        needed = {"api_key": self.api_key, "bearer": self.bearer_token, "entra": self.entra_scope}
        if self.auth in needed and not needed[self.auth]:
            field = {"api_key": "api_key", "bearer": "bearer_token", "entra": "entra_scope"}
            raise ValueError(
                f"OpenAPI source {self.name!r}: auth {self.auth!r} needs {field[self.auth]}"
            )
        return self


class ToolsSettings(BaseModel):
    load_entry_points: bool = Field(
        default=True, description="Discover plugins in the 'lamina.tools' entry-point group"
    )
    enabled: list[str] | None = Field(
        default=None, description="Only these tools (by name); default all discovered"
    )
    default_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Per-call timeout of tools that set none"
    )
    max_output_chars: int = Field(
        default=20_000, ge=100, description="Longer tool output is truncated"
    )
    tenants: dict[str, TenantToolSettings] = Field(
        default_factory=dict, description="Per-tenant enabled/disabled tools (JSON object)"
    )
    approvals: ApprovalSettings = ApprovalSettings()
    http: HttpSettings = HttpSettings()
    mcp_servers: list[McpServerSettings] = Field(
        default_factory=list, description="External MCP servers whose tools are offered (JSON)"
    )
    openapi: list[OpenApiSourceSettings] = Field(
        default_factory=list, description="OpenAPI 3 documents imported as tools (JSON)"
    )
