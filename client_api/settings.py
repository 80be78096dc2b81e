"""Root settings: one class per layer, composed here (``LAMINA_`` prefix, ``__`` nesting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferencing.settings import InferencingSettings
from intelligence.settings import IntelligenceSettings
from knowledge.settings import KnowledgeSettings
from tools.settings import ToolsSettings

ENV_PREFIX = "LAMINA_"
ENV_NESTING = "__"


class AuthSettings(BaseModel):
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
    issuer: str | None = Field(
        default=None, description="Expected 'iss'; default the issuer in the OpenID metadata"
    )
    leeway_s: int = Field(default=60, ge=0, le=600, description="Clock skew allowed on exp/nbf")
    metadata_ttl_s: int = Field(default=3600, ge=10, description="OpenID metadata/JWKS cache")
    dev_tenant: str = Field(default="contoso", description="Tenant of dev-mode callers")
    admin_role: str = Field(
        default="Lamina.Admin", description="App role that may read usage reports"
    )


class ApiSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Bind address of lamina serve")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of lamina serve")
    publish_docs: bool = Field(
        default=False,
        description="Serve /docs and /openapi.json without authentication (always in dev mode)",
    )


class RedisSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="redis://host:6379/0 to share gateway state (breakers, usage) between "
        "replicas; empty keeps it in-process",
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
    redis: RedisSettings = RedisSettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    inferencing: InferencingSettings = InferencingSettings()
    tools: ToolsSettings = ToolsSettings()
    intelligence: IntelligenceSettings = IntelligenceSettings()

    def knowledge_index_path(self) -> Path:
        return self.knowledge.index_path or self.data_dir / "knowledge.db"

    def usage_path(self) -> Path:
        return self.data_dir / "usage.db"

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
    """What the server needs beyond what ingestion needs: authentication that can work."""
    if settings.auth.mode == "jwt":
        missing = [
            env_name(("auth", name))
            for name in ("openid_config_url", "audience")
            if getattr(settings.auth, name) is None
        ]
        if missing:
            raise SettingsError(
                "Invalid configuration:\n"
                + "\n".join(f"  {m}: required when LAMINA_AUTH__MODE=jwt" for m in missing)
                + "\n  (or set LAMINA_AUTH__MODE=dev for a local demo)"
            )


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
