"""Chat model providers, and the factory the composition root builds them with.

The ``openai`` SDK and ``azure.identity`` are imported only when a provider needs
them, so that the extractive default starts without paying for either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from inferencing.contracts import ChatModel, ProviderAuthenticationFailed
from inferencing.settings import InferencingSettings

if TYPE_CHECKING:
    import openai

    from inferencing.providers.openai_compatible import OpenAICompatibleChatModel

AzureTokenProvider = Callable[[], Awaitable[str]]
"""Returns a Microsoft Entra access token for Azure OpenAI, e.g. from azure-identity."""

_NO_TOKEN = "Lamina could not obtain credentials for the model service."


def build_chat_model(
    settings: InferencingSettings, *, azure_token_provider: AzureTokenProvider | None = None
) -> ChatModel:
    """The chat model ``settings.provider`` names.

    - ``extractive``: :class:`~inferencing.providers.extractive.ExtractiveAnswerer`.
    - ``openai``: OpenAI, or any OpenAI-compatible server at ``settings.base_url``.
    - ``azure_openai``: the deployment ``settings.model`` at ``settings.azure_endpoint``,
      with ``settings.api_key`` if set, otherwise a Microsoft Entra token
      (``azure_token_provider`` when given, else ``DefaultAzureCredential``).

    Raises ``ValueError`` naming the setting when the configuration cannot work.
    """
    if settings.provider == "extractive":
        from inferencing.providers.extractive import ExtractiveAnswerer

        return ExtractiveAnswerer()

    import openai

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    if settings.provider == "openai":
        try:
            client = openai.AsyncOpenAI(
                api_key=api_key,
                base_url=settings.base_url,
                timeout=settings.timeout_s,
                max_retries=settings.max_retries,
            )
        except openai.OpenAIError as exc:
            raise ValueError(
                "LAMINA_INFERENCING__API_KEY is required when provider is openai "
                "(or set OPENAI_API_KEY); for a server without authentication give any value"
            ) from exc
        return _chat_model(client, settings)

    if settings.azure_endpoint is None:
        raise ValueError(
            "LAMINA_INFERENCING__AZURE_ENDPOINT is required when provider is azure_openai"
        )
    on_close: Callable[[], Awaitable[None]] | None = None
    if azure_token_provider is None and api_key is None:
        # Imported here: azure-identity costs import time and only Entra auth needs it.
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        credential = DefaultAzureCredential()
        azure_token_provider = get_bearer_token_provider(credential, settings.azure_ad_scope)
        on_close = credential.close
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=settings.azure_endpoint,
        azure_deployment=settings.model,
        api_version=settings.azure_api_version,
        api_key=api_key if azure_token_provider is None else None,
        azure_ad_token_provider=_guarded(azure_token_provider) if azure_token_provider else None,
        timeout=settings.timeout_s,
        max_retries=settings.max_retries,
    )
    return _chat_model(azure, settings, on_close=on_close)


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


def _chat_model(
    client: openai.AsyncOpenAI,
    settings: InferencingSettings,
    *,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> OpenAICompatibleChatModel:
    from inferencing.providers.openai_compatible import OpenAICompatibleChatModel

    return OpenAICompatibleChatModel(
        client,
        model=settings.model,
        name=f"{settings.provider}:{settings.model}",
        supports_tools=settings.supports_tools,
        default_max_tokens=settings.max_output_tokens,
        default_temperature=settings.temperature,
        on_close=on_close,
    )
