"""Deterministic embeddings: hashed bag of words, so texts sharing words lie close together."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

from inferencing.simulator.completions import count_tokens

_WORD = re.compile(r"\w+")


def embed_text(text: str, dims: int) -> list[float]:
    """A unit vector of ``dims`` floats: each word adds ±1 at a position chosen by its hash.

    The same text always gives the same vector, in any process; texts sharing words have a
    positive cosine similarity. Text without words falls back to a hash of the whole string.
    """
    vector = [0.0] * dims
    features = [w.lower() for w in _WORD.findall(text)] or [text]
    for feature in features:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        vector[value % dims] += 1.0 if (value >> 63) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        # Features cancelled out: still return a unit vector, chosen by the text.
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        vector[int.from_bytes(digest, "little") % dims] = 1.0
        return vector
    return [x / norm for x in vector]


def embedding_inputs(body: Any) -> list[str] | str:
    """The texts to embed, or an error message. Token arrays are accepted as opaque words."""
    if not isinstance(body, Mapping):
        return "The request body must be a JSON object."
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, str) for item in raw):
            return list(raw)
        if all(isinstance(item, int) for item in raw):
            return [" ".join(f"t{token}" for token in raw)]
        if all(isinstance(item, list) for item in raw):
            return [" ".join(f"t{token}" for token in item) for item in raw]
    return "'input' must be a string, an array of strings or an array of token arrays."


def embeddings_body(texts: list[str], body: Mapping[str, Any], *, model: str, dims: int) -> Any:
    requested = body.get("dimensions")
    size = requested if isinstance(requested, int) and requested > 0 else dims
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(texts):
        vector = embed_text(text, size)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{size}f", *vector)).decode("ascii")
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_tokens(text) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
