"""What the knowledge benchmarks share: the local model as a knowledge ``Embedder``, an
on-disk cache of vectors, a throw-away index, and the machine figures every result carries.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.processes import REPO
from inferencing.providers.local_embeddings import LocalEmbeddingModel
from knowledge.contracts import EmbeddingIdentity

RESULTS = REPO / "bench" / "results"

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who the embedding calls are metered to: nobody real, this is a benchmark."""

    tenant_id: str
    user_id: str = "bench"


class LocalEmbedder:
    """The knowledge layer's :class:`~knowledge.contracts.Embedder` over the local
    all-MiniLM-L6-v2 int8 model, the default embedding model of a Lamina deployment."""

    def __init__(self, *, batch_size: int = 32, threads: int | None = None) -> None:
        self._model = LocalEmbeddingModel(batch_size=batch_size, threads=threads)
        self.identity = EmbeddingIdentity(self._model.name, self._model.dimensions)

    async def load(self) -> None:
        await self._model.load()

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        response = await self._model.embed(texts, _Caller(tenant_id))
        return list(response.vectors)


class VectorCache:
    """Vectors by (model, text), kept in one ``.npz`` file so that reruns skip the model.

    Saved after every :meth:`fill` batch: an interrupted run resumes where it stopped.
    """

    def __init__(self, path: Path, identity: EmbeddingIdentity) -> None:
        self._path = path
        self._identity = identity
        self._rows: dict[str, npt.NDArray[np.float32]] = {}
        if path.exists():
            with np.load(path) as stored:
                if str(stored["model"]) == identity.model:
                    keys = stored["keys"].tolist()
                    self._rows = dict(zip(keys, stored["vectors"], strict=True))

    def _key(self, text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts of ``texts`` that have no vector yet, in order."""
        return [t for t in dict.fromkeys(texts) if self._key(t) not in self._rows]

    def add(self, texts: Sequence[str], vectors: Sequence[Sequence[float]]) -> None:
        for text, vector in zip(texts, vectors, strict=True):
            self._rows[self._key(text)] = np.asarray(vector, dtype=np.float32)

    def save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._rows)
        matrix = np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        partial = self._path.with_name(self._path.name + ".partial.npz")
        np.savez(partial, model=np.array(self._identity.model), keys=np.array(keys), vectors=matrix)
        partial.replace(self._path)

    def matrix(self, texts: Sequence[str]) -> Matrix:
        """One row per text of ``texts``, in order (every text must be cached)."""
        return np.stack([self._rows[self._key(t)] for t in texts]).astype(np.float32)


def machine() -> dict[str, Any]:
    """Cores, load average and Python: what a reader needs to weigh the figures."""
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
