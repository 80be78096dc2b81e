"""Settings of the inferencing layer (``LAMINA_INFERENCING__*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator


class InferencingSettings(BaseModel):
    provider: Literal["extractive", "openai", "azure_openai"] = Field(
        default="extractive",
        description="extractive (no model, default), openai (OpenAI or any OpenAI-compatible "
        "base_url) or azure_openai",
    )
    model: str = Field(default="gpt-4o-mini", description="Model, or Azure deployment name")
    base_url: str | None = Field(default=None, description="OpenAI-compatible server URL")
    api_key: SecretStr | None = Field(default=None, description="API key (OpenAI or Azure)")
    azure_endpoint: str | None = Field(default=None, description="https://<name>.openai.azure.com")
    azure_api_version: str = Field(default="2024-10-21", description="Azure OpenAI API version")
    azure_ad_scope: str = Field(
        default="https://cognitiveservices.azure.com/.default",
        description="Entra token scope, used when no api_key is set",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Per model call")
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries of a failed call")
    max_output_tokens: int = Field(default=800, ge=1, description="Cap on answer length")
    temperature: float = Field(default=0.2, ge=0, le=2, description="Sampling temperature")
    supports_tools: bool = Field(default=True, description="The model can call functions")

    @model_validator(mode="after")
    def _azure_needs_endpoint(self) -> InferencingSettings:
        if self.provider == "azure_openai" and not self.azure_endpoint:
            raise ValueError("azure_endpoint is required when provider is azure_openai")
        return self
