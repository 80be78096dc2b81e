"""Chat model providers, and the factory the composition root builds them with.

The ``openai`` SDK and ``azure.identity`` are imported only when a provider needs
them, so that the extractive default starts without paying for either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from inferencing.contracts import (
    ChatModel,
    EmbeddingModel,
    ModelCapabilities,
    ProviderAuthenticationFailed,
)
from inferencing.settings import DeploymentSettings, TimeoutSettings

if TYPE_CHECKING:
    import openai

AzureTokenProvider = Callable[[], Awaitable[str]]
"""Returns a Microsoft Entra access token for Azure OpenAI, e.g. from azure-identity."""

_NO_TOKEN = "Lamina could not obtain credentials for the model service."


def build_chat_model(
    deployment: DeploymentSettings,
    *,
    timeouts: TimeoutSettings | None = None,
    http_client: Literal["aiohttp", "httpx"] = "httpx",
    max_output_tokens: int | None = None,
    temperature: float | None = None,
    azure_token_provider: AzureTokenProvider | None = None,
) -> ChatModel:
    """The chat model of one deployment.

    - ``extractive``: :class:`~inferencing.providers.extractive.ExtractiveAnswerer`.
    - ``openai``: OpenAI, or any OpenAI-compatible server at ``deployment.base_url``.
    - ``azure_openai``: the deployment ``deployment.model`` at ``azure_endpoint``, with
      ``api_key`` if set, otherwise a Microsoft Entra token (``azure_token_provider``
      when given, else ``DefaultAzureCredential``).

    The SDK never retries on its own (``max_retries=0``): the gateway owns retries, and
    two layers of them would multiply. ``timeouts`` bound connecting and each call.
    Raises ``ValueError`` naming the setting when the configuration cannot work.
    """
    if deployment.provider == "extractive":
        from inferencing.providers.extractive import ExtractiveAnswerer

        return ExtractiveAnswerer()

    from inferencing.providers.openai_compatible import OpenAICompatibleChatModel
    from inferencing.providers.openai_wire import WireForwarder, WireTarget

    timeouts = timeouts or TimeoutSettings()
    connection = _connect(deployment, timeouts, http_client, azure_token_provider)
    client = connection.client
    if deployment.provider == "openai":
        base = (deployment.base_url or "https://api.openai.com/v1").rstrip("/")
        target = WireTarget(
            f"{base}/chat/completions",
            # The client's key: the setting, or OPENAI_API_KEY, as the SDK resolved it.
            headers={"Authorization": f"Bearer {client.api_key}"} if client.api_key else {},
            model=deployment.model,
        )
    else:
        assert deployment.azure_endpoint is not None  # checked by _connect
        target = WireTarget(
            f"{deployment.azure_endpoint.rstrip('/')}/openai/deployments/{deployment.model}"
            f"/chat/completions?api-version={deployment.azure_api_version}",
            headers={"api-key": connection.api_key} if connection.api_key else {},
            bearer=connection.token,
        )
    return OpenAICompatibleChatModel(
        client,
        model=deployment.model,
        name=f"{deployment.provider}:{deployment.model}",
        capabilities=ModelCapabilities(
            streaming=True,
            tool_calls=deployment.supports_tools,
            json_schema=deployment.supports_json_schema,
            generative=True,
            context_window=deployment.context_window,
        ),
        default_max_tokens=max_output_tokens,
        default_temperature=temperature,
        on_close=connection.on_close,
        forwarder=WireForwarder(target, timeouts),
    )


def build_embedding_model(
    deployment: DeploymentSettings,
    *,
    dimensions: int | None = None,
    timeouts: TimeoutSettings | None = None,
    azure_token_provider: AzureTokenProvider | None = None,
) -> EmbeddingModel:
    """The embedding model of an ``openai`` or ``azure_openai`` deployment (the same
    settings as a chat deployment; ``model`` names the embedding model or deployment)."""
    if deployment.provider == "extractive":
        raise ValueError(
            f"deployment {deployment.name!r}: the extractive provider has no embeddings"
        )
    from inferencing.providers.openai_compatible import OpenAIEmbeddingModel
    from inferencing.telemetry import ModelTarget

    connection = _connect(deployment, timeouts or TimeoutSettings(), "httpx", azure_token_provider)
    return OpenAIEmbeddingModel(
        connection.client,
        model=deployment.model,
        dimensions=dimensions,
        on_close=connection.on_close,
        target=ModelTarget.of(deployment),
    )


@dataclass(frozen=True, slots=True)
class _Connection:
    """An SDK client for a deployment, and what else talking to it needs: the API key
    it uses (None with Entra ID), the guarded Entra token provider, and what to close."""

    client: openai.AsyncOpenAI
    api_key: str | None
    token: AzureTokenProvider | None
    on_close: Callable[[], Awaitable[None]] | None


def _connect(
    deployment: DeploymentSettings,
    timeouts: TimeoutSettings,
    http_client: Literal["aiohttp", "httpx"],
    azure_token_provider: AzureTokenProvider | None,
) -> _Connection:
    import openai

    common: dict[str, Any] = {
        "timeout": openai.Timeout(timeouts.total_s, connect=timeouts.connect_s),
        "max_retries": 0,
    }
    if http_client == "aiohttp":
        common["http_client"] = openai.DefaultAioHttpClient(timeout=common["timeout"])
    api_key = deployment.api_key.get_secret_value() if deployment.api_key else None
    if deployment.provider == "openai":
        try:
            client = openai.AsyncOpenAI(api_key=api_key, base_url=deployment.base_url, **common)
        except openai.OpenAIError as exc:
            raise ValueError(
                f"deployment {deployment.name!r} needs an api_key "
                "(LAMINA_INFERENCING__API_KEY, or OPENAI_API_KEY); for a server without "
                "authentication give any value"
            ) from exc
        return _Connection(client, api_key, None, None)

    if deployment.azure_endpoint is None:
        raise ValueError(
            f"deployment {deployment.name!r} needs an azure_endpoint "
            "(LAMINA_INFERENCING__AZURE_ENDPOINT)"
        )
    on_close: Callable[[], Awaitable[None]] | None = None
    if azure_token_provider is None and api_key is None:
        # Imported here: azure-identity costs import time and only Entra auth needs it.
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        credential = DefaultAzureCredential()
        azure_token_provider = get_bearer_token_provider(credential, deployment.azure_ad_scope)
        on_close = credential.close
    token = _guarded(azure_token_provider) if azure_token_provider else None
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=deployment.azure_endpoint,
        azure_deployment=deployment.model,
        api_version=deployment.azure_api_version,
        api_key=api_key if token is None else None,
        azure_ad_token_provider=token,
        **common,
    )
    return _Connection(azure, api_key if token is None else None, token, on_close)


def _guarded(token_provider: AzureTokenProvider) -> AzureTokenProvider:
    """A token provider whose failures are ours: the SDK would pass them on unchanged."""

    async def token() -> str:
        try:
            value = await token_provider()
        except Exception as exc:
            raise ProviderAuthenticationFailed(
                _NO_TOKEN, details={"error": type(exc).__name__, "message": str(exc)}
            ) from exc
        if not value:
            raise ProviderAuthenticationFailed(_NO_TOKEN, details={"error": "empty token"})
        return value

    return token
