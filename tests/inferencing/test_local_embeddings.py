"""The local all-MiniLM-L6-v2 (int8 ONNX) embedding model, run for real from its packages."""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from inferencing.contracts import EmbeddingModel, ProviderUnavailable
from inferencing.providers.local_embeddings import DIMENSIONS, MODEL_NAME, LocalEmbeddingModel
from tests.inferencing.conftest import Caller


@pytest.fixture(scope="module")
def model() -> LocalEmbeddingModel:
    """One model for the module: it holds no connection, and loading it takes a while."""
    return LocalEmbeddingModel(batch_size=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub and no network: any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"local embeddings opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


async def test_vectors_are_unit_length_and_name_the_model(
    model: LocalEmbeddingModel, caller: Caller
) -> None:
    result = await model.embed(["How many days of annual leave do I get?", ""], caller)
    assert isinstance(model, EmbeddingModel)
    assert (
        (model.name, model.dimensions) == (MODEL_NAME, DIMENSIONS) == ("all-MiniLM-L6-v2-int8", 384)
    )
    assert result.model == MODEL_NAME
    assert [len(v) for v in result.vectors] == [384, 384]
    assert [math.fsum(x * x for x in v) for v in result.vectors] == [
        pytest.approx(1.0, abs=1e-5)
    ] * 2
    assert result.usage is not None and result.usage.input_tokens > 10


async def test_paraphrases_score_higher_than_unrelated_texts(
    model: LocalEmbeddingModel, caller: Caller
) -> None:
    # No word in common between the question and its paraphrase: a lexical model
    # (hashing) cannot match them, a semantic one must.
    question, paraphrase, unrelated, near_topic = (
        await model.embed(
            [
                "How much holiday do I get each year?",
                "What is my annual leave allowance?",
                "The build pipeline failed because the disk was full.",
                "Expense claims must be filed within thirty days.",
            ],
            caller,
        )
    ).vectors
    # Measured: 0.49 for the paraphrase, 0.11 and -0.03 for the others.
    assert cosine(question, paraphrase) > cosine(question, near_topic) + 0.25
    assert cosine(question, paraphrase) > cosine(question, unrelated) + 0.25


async def test_the_same_text_always_gives_the_same_vector(
    model: LocalEmbeddingModel, caller: Caller
) -> None:
    first = await model.embed(["parental leave policy", "x", "parental leave policy"], caller)
    again = await model.embed(["parental leave policy"], caller)
    assert first.vectors[0] == first.vectors[2] == again.vectors[0]
    assert first.vectors[0] != first.vectors[1]


async def test_a_batch_gives_what_one_text_at_a_time_gives(
    model: LocalEmbeddingModel, caller: Caller
) -> None:
    texts = [
        "Kestrel on-call rotation",
        "Project Falcon's budget was approved by the finance committee in March.",
        "hi",
        "Atlas keeps customer data for ninety days, then deletes it unless a legal hold applies.",
        "VPN",
        "Who approves travel over 5000 euros?",
        "Remote work is allowed three days a week with your manager's agreement.",
    ]
    together = await model.embed(texts, caller)  # batches of 4, padded to their longest
    for text, vector in zip(texts, together.vectors, strict=True):
        (alone,) = (await model.embed([text], caller)).vectors
        assert alone == pytest.approx(vector, abs=1e-5)


async def test_texts_beyond_256_tokens_are_cut(model: LocalEmbeddingModel, caller: Caller) -> None:
    long = " ".join(f"clause {n} of the travel policy applies." for n in range(80))
    longer = long + " An appendix about parking permits follows with many details."
    short = " ".join(f"clause {n} of the travel policy applies." for n in range(10))
    vectors = (await model.embed([long, longer, short], caller)).vectors
    assert vectors[0] == pytest.approx(vectors[1], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[2], abs=1e-3)


async def test_no_texts_need_no_model(caller: Caller, tmp_path: Path) -> None:
    missing = tmp_path / "absent.onnx"
    model = LocalEmbeddingModel(model_path=missing, tokenizer_path=missing)
    result = await model.embed([], caller)
    assert (result.vectors, result.model) == ((), MODEL_NAME)


async def test_files_other_than_the_pinned_ones_are_refused(caller: Caller, tmp_path: Path) -> None:
    other = tmp_path / "model.onnx"
    other.write_bytes(b"not the model")
    with pytest.raises(ProviderUnavailable, match="not the pinned file of all-MiniLM-L6-v2-int8"):
        await LocalEmbeddingModel(model_path=other).embed(["hello"], caller)
    with pytest.raises(ProviderUnavailable, match="cannot be read"):
        await LocalEmbeddingModel(model_path=tmp_path / "absent.onnx").load()


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LocalEmbeddingModel(batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        LocalEmbeddingModel(threads=0)
