"""Settings of the inferencing layer (``LAMINA_INFERENCING__*``).

The gateway serves the deployments of a model registry. The registry is
``deployments`` (a JSON list in the environment) or ``registry_file`` (YAML or
JSON); when both are empty, the top-level provider fields describe the one
deployment, named after the provider.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Provider = Literal["extractive", "openai", "azure_openai"]
Tier = Literal["cheap", "strong", "any"]

_AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"


class DeploymentSettings(BaseModel):
    """One model deployment the gateway may route to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", description="Unique name")
    provider: Provider = "openai"
    model: str = Field(default="gpt-4o-mini", description="Model, or Azure deployment name")
    model_version: str | None = Field(default=None, description="e.g. 2024-07-18")
    base_url: str | None = None
    api_key: SecretStr | None = None
    azure_endpoint: str | None = None
    azure_api_version: str = "2024-10-21"
    azure_ad_scope: str = _AZURE_SCOPE
    context_window: int = Field(default=128_000, ge=256)
    input_price_per_1k: float = Field(default=0.0, ge=0, description="Currency per 1k tokens")
    output_price_per_1k: float = Field(default=0.0, ge=0)
    supports_tools: bool = True
    supports_json_schema: bool = False
    region: str | None = None
    priority: int = Field(default=100, description="Lower is tried first among equals")
    tier: Tier = Field(default="any", description="cheap: simple turns; strong: complex turns")
    retires_on: date | None = Field(default=None, description="Skipped from this day on")
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Failover chain when a caller pins this deployment; empty: none",
    )

    @model_validator(mode="after")
    def _azure_needs_endpoint(self) -> DeploymentSettings:
        if self.provider == "azure_openai" and not self.azure_endpoint:
            raise ValueError(
                f"deployment {self.name!r}: azure_endpoint is required for azure_openai"
            )
        return self


class RetrySettings(BaseModel):
    max_attempts: int = Field(default=4, ge=1, le=20, description="Attempts per request, in all")
    base_delay_s: float = Field(default=0.25, ge=0, description="Backoff base (full jitter)")
    max_delay_s: float = Field(default=8.0, ge=0, description="Backoff cap per wait")
    budget_s: float = Field(default=20.0, ge=0, description="Most time spent waiting, per request")


class BreakerSettings(BaseModel):
    failure_rate: float = Field(default=0.5, gt=0, le=1, description="Trips at this rate")
    min_calls: int = Field(default=10, ge=1, description="Calls in the window before it can trip")
    window_s: float = Field(default=30.0, gt=0, description="Window the rate is taken over")
    open_s: float = Field(default=30.0, gt=0, description="Open this long before probing")
    half_open_probes: int = Field(default=2, ge=1, description="Probe calls; all must succeed")


class TimeoutSettings(BaseModel):
    connect_s: float = Field(default=5.0, gt=0, description="To open a connection")
    first_token_s: float = Field(default=30.0, gt=0, description="To the first streamed token")
    total_s: float = Field(default=120.0, gt=0, description="For a whole call")


class InferencingSettings(BaseModel):
    provider: Provider = Field(
        default="extractive",
        description="extractive (no model, default), openai (OpenAI or any OpenAI-compatible "
        "base_url) or azure_openai; used when no deployments are configured",
    )
    model: str = Field(default="gpt-4o-mini", description="Model, or Azure deployment name")
    base_url: str | None = Field(default=None, description="OpenAI-compatible server URL")
    api_key: SecretStr | None = Field(default=None, description="API key (OpenAI or Azure)")
    azure_endpoint: str | None = Field(default=None, description="https://<name>.openai.azure.com")
    azure_api_version: str = Field(default="2024-10-21", description="Azure OpenAI API version")
    azure_ad_scope: str = Field(
        default=_AZURE_SCOPE, description="Entra token scope, used when no api_key is set"
    )
    max_output_tokens: int = Field(default=800, ge=1, description="Cap on answer length")
    temperature: float = Field(default=0.2, ge=0, le=2, description="Sampling temperature")
    supports_tools: bool = Field(default=True, description="The model can call functions")
    deployments: list[DeploymentSettings] = Field(
        default_factory=list, description="Model registry as a JSON list (see docs/gateway.md)"
    )
    registry_file: Path | None = Field(
        default=None, description="Model registry as a YAML or JSON file (a list of deployments)"
    )
    http_client: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp", description="HTTP client under the openai SDK"
    )
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    usage_flush_s: float = Field(default=1.0, gt=0, description="How often usage is written")

    @field_validator("deployments", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @model_validator(mode="after")
    def _valid_registry(self) -> InferencingSettings:
        if self.provider == "azure_openai" and not self.azure_endpoint and not self.deployments:
            raise ValueError("azure_endpoint is required when provider is azure_openai")
        names = [d.name for d in self.deployments]
        if duplicated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"deployment names must be unique: {', '.join(duplicated)}")
        for deployment in self.deployments:
            if unknown := [f for f in deployment.fallbacks if f not in names]:
                raise ValueError(
                    f"deployment {deployment.name!r} falls back to unknown {', '.join(unknown)}"
                )
        return self

    def registry(self) -> list[DeploymentSettings]:
        """The configured deployments: the list, else the file, else the top-level fields."""
        if self.deployments:
            return list(self.deployments)
        if self.registry_file is not None:
            loaded = yaml.safe_load(self.registry_file.read_text("utf-8")) or []
            entries = loaded.get("deployments", []) if isinstance(loaded, dict) else loaded
            return InferencingSettings(deployments=entries).deployments
        return [
            DeploymentSettings(
                name=self.provider,
                provider=self.provider,
                model=self.model,
                base_url=self.base_url,
                api_key=self.api_key,
                azure_endpoint=self.azure_endpoint,
                azure_api_version=self.azure_api_version,
                azure_ad_scope=self.azure_ad_scope,
                supports_tools=self.supports_tools and self.provider != "extractive",
                context_window=1_000_000 if self.provider == "extractive" else 128_000,
            )
        ]


ContentCategory = Literal["Hate", "SelfHarm", "Sexual", "Violence"]
_ALL_CATEGORIES: tuple[ContentCategory, ...] = ("Hate", "SelfHarm", "Sexual", "Violence")


class ContentSafetySettings(BaseModel):
    """Azure AI Content Safety: Prompt Shields and text moderation
    (``LAMINA_CONTENT_SAFETY__*``). Without an endpoint, only the offline shield runs
    and answers are not moderated."""

    endpoint: str | None = Field(
        default=None, description="https://<resource>.cognitiveservices.azure.com; empty: off"
    )
    api_key: SecretStr | None = Field(
        default=None, description="Resource key; empty: a Microsoft Entra token (managed identity)"
    )
    ad_scope: str = Field(default=_AZURE_SCOPE, description="Entra token scope, without api_key")
    api_version: str = Field(default="2024-09-01", description="Content Safety REST API version")
    timeout_s: float = Field(default=3.0, gt=0, description="Per call; slower counts as down")
    severity_threshold: int = Field(
        default=4,
        ge=1,
        le=7,
        description="Lowest severity that flags an answer (0, 2, 4, 6 scale; 4 = medium)",
    )
    categories: list[ContentCategory] = Field(
        default_factory=lambda: list(_ALL_CATEGORIES),
        min_length=1,
        description="Harm categories to analyse",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "endpoint must be an http(s) URL, e.g. https://<name>.cognitiveservices.azure.com"
            )
        return value

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None
