"""Root settings: one class per layer, composed here (``LAMINA_`` prefix, ``__`` nesting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from client_api.auth.permissions import ROLE_PERMISSIONS, USER_ROLE, Permission
from client_api.edge.caps import CapsSettings
from client_api.edge.limits import LimitsSettings
from inferencing.settings import ContentSafetySettings, InferencingSettings
from intelligence.settings import (
    AnswerCacheSettings,
    AuditSettings,
    ConversationSettings,
    IntelligenceSettings,
    JobSettings,
    SafetySettings,
)
from knowledge.settings import KnowledgeSettings
from tools.settings import ToolsSettings

ENV_PREFIX = "LAMINA_"
ENV_NESTING = "__"


class AuthSettings(BaseModel):
    """How callers prove who they are at the edge, and what their roles let them do."""

    mode: Literal["jwt", "dev"] = Field(
        default="jwt",
        description="jwt: bearer tokens validated against OpenID metadata; dev: trust "
        "X-Lamina-* identity headers (demo only, never in production)",
    )
    openid_config_url: str | None = Field(
        default=None,
        description="e.g. https://login.microsoftonline.com/<tenant>/v2.0/"
        ".well-known/openid-configuration",
    )
    audience: str | None = Field(default=None, description="Expected 'aud' (the API's app id)")
    audiences: list[str] = Field(
        default_factory=list,
        description="More accepted 'aud' values: Entra v1 tokens carry the App ID URI "
        "(api://...), v2 tokens the client id; list both",
    )
    issuer: str | None = Field(
        default=None,
        description="Expected 'iss' ({tenantid} stands for the token's tid); default the "
        "issuer in the OpenID metadata",
    )
    issuers: list[str] = Field(
        default_factory=list,
        description="Accepted 'iss' forms instead of the single issuer, {tenantid} standing for "
        "the token's tid, e.g. https://sts.windows.net/{tenantid}/ (v1) and "
        "https://login.microsoftonline.com/{tenantid}/v2.0 (v2)",
    )
    allowed_tenants: list[str] = Field(
        default_factory=list,
        description="Tenant ids ('tid') whose tokens are accepted; empty: only the tenant the "
        "issuer names (required with multi-tenant 'organizations'/'common' metadata)",
    )
    # Entra hosts keep NTP time; 30 s absorbs skew between replicas and the identity
    # provider without noticeably lengthening a leaked token's life. Five minutes (the
    # Kerberos bound) is the most any sane deployment needs.
    leeway_s: int = Field(default=30, ge=0, le=300, description="Clock skew allowed on exp/nbf")
    metadata_ttl_s: int = Field(default=3600, ge=10, description="OpenID metadata/JWKS cache")
    dev_tenant: str = Field(default="contoso", description="Tenant of dev-mode callers")
    role_permissions: dict[str, list[str]] = Field(
        default_factory=lambda: {r: [p.value for p in ps] for r, ps in ROLE_PERMISSIONS.items()},
        description="App role -> permissions it grants (chat, conversations, models, "
        "usage.read, keys.manage, ingest)",
    )
    default_roles: list[str] = Field(
        default_factory=lambda: [USER_ROLE],
        description="Roles of signed-in users (delegated tokens, dev mode) who hold none of "
        "the roles above; app-only tokens and API keys get none",
    )
    required_scopes: list[str] = Field(
        default_factory=list,
        description="A delegated token must carry at least one of these in 'scp' (else 403); "
        "empty: any",
    )
    graph_base_url: str = Field(
        default="https://graph.microsoft.com",
        description="Microsoft Graph, asked for group memberships when a token's groups "
        "claim overflowed",
    )
    group_cache_ttl_s: int = Field(
        default=300, ge=1, description="How long group memberships read from Graph are kept"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_admin_role(cls, data: Any) -> Any:
        # Silently ignoring the old setting would take usage reports away from whoever
        # the operator had named; say what replaced it instead.
        if isinstance(data, dict) and "admin_role" in data:
            raise ValueError(
                "admin_role was replaced by role_permissions: map the role to "
                '["usage.read", "keys.manage", ...] in LAMINA_AUTH__ROLE_PERMISSIONS'
            )
        return data

    @field_validator("role_permissions")
    @classmethod
    def _known_permissions(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        known = [p.value for p in Permission]
        for role, permissions in value.items():
            unknown = [p for p in permissions if p not in known]
            if unknown:
                raise ValueError(
                    f"role {role!r}: unknown permission(s) {', '.join(map(repr, unknown))}; "
                    f"expected any of {', '.join(known)}"
                )
        return value

    def accepted_audiences(self) -> list[str]:
        """``audience`` and ``audiences`` together, without repeats."""
        both = [self.audience, *self.audiences] if self.audience else list(self.audiences)
        return list(dict.fromkeys(both))


class ApiSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Bind address of lamina serve")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of lamina serve")
    publish_docs: bool = Field(
        default=False,
        description="Serve /docs and /openapi.json without authentication (always in dev mode)",
    )
    mcp_server: bool = Field(
        default=True,
        description="Serve the caller's permitted tools and knowledge search over MCP at /mcp",
    )


class TelemetrySettings(BaseModel):
    """OpenTelemetry traces and metrics (``LAMINA_TELEMETRY__*``). When enabled, every
    request has a trace whose id is the correlation id; where spans and metrics go is
    chosen by ``exporters``, none by default. With no exporter, spans are not recorded
    (nobody would receive them), but their trace ids still are the correlation ids."""

    enabled: bool = Field(
        default=True,
        description="Record traces and metrics; off: no spans, and correlation ids are random",
    )
    exporters: list[Literal["console", "otlp", "azure_monitor"]] = Field(
        default_factory=list,
        description='Where telemetry goes, e.g. ["otlp"]; otlp needs lamina[otlp], '
        "azure_monitor needs lamina[azure-monitor]",
    )
    service_name: str = Field(default="lamina", min_length=1, description="service.name")
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP collector, e.g. http://localhost:4317 (grpc) or "
        "http://localhost:4318 (http); empty: the OTEL_EXPORTER_OTLP_* variables",
    )
    otlp_protocol: Literal["grpc", "http/protobuf"] = Field(
        default="http/protobuf", description="OTLP transport"
    )
    azure_monitor_connection_string: SecretStr | None = Field(
        default=None,
        description="Application Insights connection string; empty: "
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
    )
    capture_content: bool = Field(
        default=False,
        description="Put prompt and completion text (and the question) in spans; off, spans "
        "carry sizes and ids only",
    )
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of new traces recorded (parent-based)"
    )
    trust_incoming_trace: bool = Field(
        default=False,
        description="Continue a caller's W3C traceparent (only behind a trusted gateway); "
        "off: every request starts its own trace",
    )
    metric_interval_s: float = Field(
        default=60.0, ge=1.0, description="How often metrics are exported"
    )
    drift_window_s: float = Field(
        default=3600.0,
        ge=60.0,
        description="Window of the drift summaries (retrieval scores, no-answer rate, "
        "feedback ratio per prompt version)",
    )


TEAMS_SERVICE_URL_HOSTS = (
    "smba.trafficmanager.net",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
    "smba.infra.dod.teams.microsoft.us",
)
"""The Bot Connector hosts of Teams: the public cloud, GCC, GCC High and DoD."""


class DevUser(BaseModel):
    """Someone the web page's dev-mode picker lets you act as."""

    id: str = Field(min_length=1, description="User id (X-Lamina-User)")
    name: str = Field(min_length=1, description="What the picker shows")
    groups: list[str] = Field(default_factory=list, description="X-Lamina-Groups")
    roles: list[str] = Field(default_factory=list, description="X-Lamina-Roles")


def _sample_dev_users() -> list[DevUser]:
    """People of the bundled sample corpus (``samples/corpus/acl.yaml``), each seeing a
    different part of it; every one may file a service-desk ticket (role employee)."""
    return [
        DevUser(id="dana", name="Dana (engineering)", groups=["engineering"], roles=["employee"]),
        DevUser(
            id="megan.bowen@contoso.com",
            name="Megan Bowen (finance)",
            groups=["finance"],
            roles=["employee"],
        ),
        DevUser(id="harper", name="Harper (HR)", groups=["hr"], roles=["employee"]),
        DevUser(id="guest", name="Guest (product docs only)", groups=[], roles=["employee"]),
    ]


class WebSettings(BaseModel):
    """The web chat page at ``/`` (``LAMINA_WEB__*``). With LAMINA_AUTH__MODE=jwt the page
    signs in with MSAL.js as the single-page app registered in Entra ID; in dev mode it
    offers a picker of ``dev_users`` instead."""

    enabled: bool = Field(default=True, description="Serve the chat page at / and /static")
    client_id: str | None = Field(
        default=None, description="jwt mode: application (client) id of the page's SPA app"
    )
    authority: str | None = Field(
        default=None,
        description="jwt mode: e.g. https://login.microsoftonline.com/<tenant id>",
    )
    api_scopes: list[str] = Field(
        default_factory=list,
        description="jwt mode: scopes the page requests for this API, e.g. "
        '["api://<api app id>/Chat"]',
    )
    dev_users: list[DevUser] = Field(
        default_factory=_sample_dev_users,
        description="dev mode: who the page's picker offers (JSON list of id, name, groups, "
        "roles); default people of the sample corpus",
    )


class TeamsSettings(BaseModel):
    """Microsoft Teams through the Microsoft 365 Agents SDK (``LAMINA_TEAMS__*``): the bot
    endpoint ``POST /api/messages`` (install ``lamina[teams]``)."""

    enabled: bool = Field(default=False, description="Serve the Teams bot at /api/messages")
    app_id: str | None = Field(
        default=None, description="The bot's Microsoft App ID (the 'aud' of inbound tokens)"
    )
    app_secret: SecretStr | None = Field(
        default=None, description="The bot's client secret, for replies (client credentials)"
    )
    app_tenant_id: str | None = Field(
        default=None,
        description="Tenant of a single-tenant bot registration; empty: multi-tenant "
        "(tokens from the botframework.com tenant)",
    )
    openid_config_url: str = Field(
        default="https://login.botframework.com/v1/.well-known/openidconfiguration",
        description="OpenID metadata of the Bot Framework channel, which signs inbound requests",
    )
    issuers: list[str] = Field(
        default_factory=lambda: ["https://api.botframework.com"],
        description="Accepted 'iss' of inbound tokens",
    )
    leeway_s: int = Field(
        default=300, ge=0, le=600, description="Clock skew allowed on exp/nbf of inbound tokens"
    )
    token_url: str | None = Field(
        default=None,
        description="OAuth token endpoint for replies; default the Entra endpoint of "
        "app_tenant_id (or botframework.com)",
    )
    scope: str = Field(
        default="https://api.botframework.com/.default",
        description="Scope of the token replies carry to the Bot Connector",
    )
    channel_app_ids: list[str] = Field(
        default_factory=list,
        description="Callers ('azp' of v2, 'appid' of v1 tokens) whose Entra-issued tokens a "
        "single-tenant bot accepts; empty: Entra-issued tokens are refused",
    )
    service_url_hosts: list[str] = Field(
        default_factory=lambda: list(TEAMS_SERVICE_URL_HOSTS),
        description="Hosts an activity's https serviceUrl may name ('*.' for subdomains; "
        "'http://host' also allows plain http to that host); replies go there",
    )
    anonymous_dev: bool = Field(
        default=False,
        description="Accept unauthenticated requests (the Bot Framework Emulator, on one "
        "machine only); refused when app_secret is set or LAMINA_AUTH__MODE is not dev",
    )
    stream_interval_s: float = Field(
        default=1.5, ge=0.5, le=10, description="Least time between two streamed updates"
    )
    stream_limit_s: float = Field(
        default=110.0,
        gt=0,
        le=115,
        description="A streamed answer stops before Teams' 2-minute cap; the rest is sent as "
        "a normal message",
    )
    feedback: bool = Field(
        default=True,
        description="Show like/dislike buttons on every answer; a click rates the answer as "
        "the API's feedback does (chat.feedback)",
    )


class RedisSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="redis://host:6379/0 to share state between replicas (breakers, usage, "
        "rate limits, API keys, answer cache); empty keeps it in-process and in SQLite",
    )
    connect_timeout_s: float = Field(default=0.5, gt=0, description="To connect to Redis")
    command_timeout_s: float = Field(default=0.5, gt=0, description="For each Redis command")
    retry_after_s: float = Field(
        default=5.0, gt=0, description="While Redis is down, how often to try it again"
    )


class LaminaSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTING,
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(default=Path(".lamina"), description="Where embedded stores live")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the server"
    )
    auth: AuthSettings = AuthSettings()
    api: ApiSettings = ApiSettings()
    teams: TeamsSettings = TeamsSettings()
    web: WebSettings = WebSettings()
    redis: RedisSettings = RedisSettings()
    limits: LimitsSettings = LimitsSettings()
    caps: CapsSettings = CapsSettings()
    safety: SafetySettings = SafetySettings()
    answer_cache: AnswerCacheSettings = AnswerCacheSettings()
    content_safety: ContentSafetySettings = ContentSafetySettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    inferencing: InferencingSettings = InferencingSettings()
    tools: ToolsSettings = ToolsSettings()
    intelligence: IntelligenceSettings = IntelligenceSettings()
    conversations: ConversationSettings = ConversationSettings()
    jobs: JobSettings = JobSettings()
    audit: AuditSettings = AuditSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    def knowledge_index_path(self) -> Path:
        return self.knowledge.index_path or self.data_dir / "knowledge.db"

    def usage_path(self) -> Path:
        return self.data_dir / "usage.db"

    def api_keys_path(self) -> Path:
        return self.data_dir / "api_keys.db"

    def conversations_path(self) -> Path:
        return self.intelligence.conversations_path or self.data_dir / "conversations.db"


class SettingsError(Exception):
    """Settings that cannot work; the message names each variable and what it expects."""


def env_name(location: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_NESTING.join(str(part).upper() for part in location)


def load_settings(**overrides: Any) -> LaminaSettings:
    """Read settings from the environment and ``.env``; ``overrides`` win (deep-merged)."""
    try:
        return LaminaSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            got = f" (got {error['input']!r})" if not isinstance(error["input"], dict) else ""
            lines.append(f"  {env_name(error['loc'])}: {error['msg']}{got}")
        raise SettingsError("Invalid configuration:\n" + "\n".join(lines)) from None


def require_serving_settings(settings: LaminaSettings) -> None:
    """What the server needs beyond what ingestion needs: authentication that can work,
    and a chat API within its own caps."""
    lines = _over_caps(settings)
    auth = settings.auth
    if auth.mode != "jwt":
        if lines:
            raise SettingsError("Invalid configuration:\n" + "\n".join(lines))
        return
    required = "required when LAMINA_AUTH__MODE=jwt"
    if auth.openid_config_url is None:
        lines.append(f"  {env_name(('auth', 'openid_config_url'))}: {required}")
    if not auth.accepted_audiences():
        lines.append(
            f"  {env_name(('auth', 'audience'))}: {required} (or {env_name(('auth', 'audiences'))})"
        )
    if lines:
        lines.append("  (or set LAMINA_AUTH__MODE=dev for a local demo)")
    elif not auth.allowed_tenants and _issuer_names_no_tenant(auth):
        # Multi-tenant metadata accepts every Entra tenant in the world: the operator
        # has to say which ones are customers.
        lines.append(
            f"  {env_name(('auth', 'allowed_tenants'))}: required with multi-tenant metadata "
            "('common'/'organizations') or a {tenantid} issuer: list the tenant ids to accept"
        )
    if lines:
        raise SettingsError("Invalid configuration:\n" + "\n".join(lines))


def _over_caps(settings: LaminaSettings) -> list[str]:
    caps, lines = settings.caps, []
    if settings.intelligence.history_turns > caps.max_history_turns:
        lines.append(
            f"  {env_name(('intelligence', 'history_turns'))}: at most "
            f"{env_name(('caps', 'max_history_turns'))} ({caps.max_history_turns})"
        )
    if settings.inferencing.max_output_tokens > caps.max_output_tokens:
        lines.append(
            f"  {env_name(('inferencing', 'max_output_tokens'))}: at most "
            f"{env_name(('caps', 'max_output_tokens'))} ({caps.max_output_tokens})"
        )
    return lines


def _issuer_names_no_tenant(auth: AuthSettings) -> bool:
    if auth.issuer is not None:
        return "{tenantid}" in auth.issuer
    url = (auth.openid_config_url or "").lower()
    return "/common/" in url or "/organizations/" in url


def describe_settings() -> list[tuple[str, str, str]]:
    """Every setting as (environment variable, default, description), for docs and the CLI."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, (*prefix, name))
                continue
            default = info.get_default(call_default_factory=True)
            shown = "" if default is None else str(default)
            rows.append((env_name((*prefix, name)), shown, info.description or ""))

    walk(LaminaSettings, ())
    return rows
