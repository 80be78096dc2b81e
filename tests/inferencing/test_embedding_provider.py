"""Embeddings through the openai SDK, against the simulator."""

from __future__ import annotations

import pytest

from inferencing.contracts import EmbeddingModel, ProviderRateLimited
from inferencing.providers import build_embedding_model
from inferencing.settings import DeploymentSettings
from inferencing.simulator import Fault, SimulatorServer
from tests.inferencing.conftest import Caller


async def test_texts_become_one_vector_each_in_order(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = build_embedding_model(
        DeploymentSettings(
            name="e", base_url=simulator.openai_base_url, api_key="k", model="embed-small"
        )
    )
    assert isinstance(model, EmbeddingModel)
    result = await model.embed(["annual leave", "parental leave", "annual leave"], caller)
    empty = await model.embed([], caller)
    await model.aclose()
    assert len(result.vectors) == 3
    assert len({len(v) for v in result.vectors}) == 1
    assert result.vectors[0] == result.vectors[2] != result.vectors[1]
    assert result.usage is not None and result.usage.input_tokens > 0
    assert empty.vectors == ()
    (sent,) = [r for r in simulator.requests() if r.path.endswith("/embeddings")]
    assert sent.body["model"] == "embed-small"


async def test_azure_embeddings_use_the_deployment_route_and_failures_are_typed(
    simulator: SimulatorServer, caller: Caller
) -> None:
    model = build_embedding_model(
        DeploymentSettings(
            name="e",
            provider="azure_openai",
            azure_endpoint=simulator.base_url,
            api_key="azure-key",
            model="embeddings",
        )
    )
    await model.embed(["hello"], caller)
    simulator.script_embedding_faults(Fault(kind="rate_limited", retry_after_s=2))
    with pytest.raises(ProviderRateLimited):
        await model.embed(["hello"], caller)
    await model.aclose()
    sent = simulator.requests()[0]
    assert sent.path == "/openai/deployments/embeddings/embeddings"
    assert sent.headers["api-key"] == "azure-key"


def test_the_extractive_provider_has_no_embeddings() -> None:
    with pytest.raises(ValueError, match="no embeddings"):
        build_embedding_model(DeploymentSettings(name="x", provider="extractive"))
