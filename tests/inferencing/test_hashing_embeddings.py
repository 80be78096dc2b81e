"""The hashing embedding model's word normalisation: accents fold away, ASCII passes as is.

``normalized_words`` skips the per-character scan for combining marks when the text is
ASCII; these tests pin that both paths give the words the model hashes.
"""

from __future__ import annotations

from inferencing.providers.hashing_embeddings import HashingEmbeddingModel, normalized_words


def test_accented_words_fold_to_their_plain_spelling() -> None:
    assert normalized_words("Café Crème, ÉTÉS à Zürich") == ["cafe", "creme", "ete", "zurich"]


def test_ascii_text_is_lower_cased_without_fillers_plurals_or_contractions() -> None:
    assert normalized_words("Please, how many Days don't I get?") == [
        "how",
        "many",
        "day",
        "do",
        "not",
        "i",
        "get",
    ]


def test_a_question_with_accents_embeds_as_its_plain_spelling() -> None:
    model = HashingEmbeddingModel()
    assert model.vector("Où est le café?") == model.vector("ou est le cafe?")
