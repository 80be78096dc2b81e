"""The knowledge layer's :class:`~knowledge.contracts.Embedder`, over an inferencing
:class:`~inferencing.contracts.EmbeddingModel` (knowledge never imports inferencing)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

from client_api.settings import LaminaSettings
from inferencing.contracts import EmbeddingModel
from inferencing.providers import build_embedding_model
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from knowledge.contracts import EmbeddingIdentity


@dataclass(frozen=True, slots=True)
class _TenantCaller:
    """Ingestion and query embeddings are metered to the tenant, not to a user."""

    tenant_id: str
    user_id: str = ""


class InferenceEmbedder:
    """Embeds through the inferencing model; its identity is the model's name and size."""

    def __init__(self, model: EmbeddingModel, dimensions: int) -> None:
        self._model = model
        self._identity = EmbeddingIdentity(model.name, dimensions)

    @property
    def identity(self) -> EmbeddingIdentity:
        return self._identity

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        response = await self._model.embed(texts, _TenantCaller(tenant_id))
        return list(response.vectors)


async def build_knowledge_embedder(
    settings: LaminaSettings, stack: AsyncExitStack
) -> InferenceEmbedder:
    """``LAMINA_KNOWLEDGE__EMBEDDINGS``: the local model (loaded now, so the first query
    pays nothing), the hashing fallback, or a registry deployment."""
    config = settings.knowledge
    model: EmbeddingModel
    if config.embeddings == "hashing":
        model = HashingEmbeddingModel()
    elif config.embeddings == "local":
        from inferencing.providers.local_embeddings import LocalEmbeddingModel

        local = LocalEmbeddingModel()
        await local.load()
        model = local
    else:
        registry = {d.name: d for d in settings.inferencing.registry()}
        if config.embedding_deployment not in registry:
            raise ValueError(
                "LAMINA_KNOWLEDGE__EMBEDDING_DEPLOYMENT must name a deployment of the "
                f"registry when LAMINA_KNOWLEDGE__EMBEDDINGS=deployment: "
                f"{config.embedding_deployment!r}"
            )
        model = build_embedding_model(
            registry[config.embedding_deployment], timeouts=settings.inferencing.timeouts
        )
    stack.push_async_callback(model.aclose)
    dimensions = model.dimensions
    if dimensions is None:
        (probe,) = (await model.embed(["dimension probe"], _TenantCaller("lamina"))).vectors
        dimensions = len(probe)
    return InferenceEmbedder(model, dimensions)
