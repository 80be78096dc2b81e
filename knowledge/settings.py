"""Settings of the knowledge layer (``LAMINA_KNOWLEDGE__*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class KnowledgeSettings(BaseModel):
    index_path: Path | None = Field(
        default=None, description="SQLite index file; default <data_dir>/knowledge.db"
    )
    chunk_tokens: int = Field(default=200, ge=32, le=2000, description="Target chunk size in words")
    chunk_overlap: int = Field(
        default=30, ge=0, le=500, description="Overlap between chunks, words"
    )
    top_k: int = Field(default=5, ge=1, le=50, description="Passages retrieved per query")
    max_file_mb: float = Field(default=50, gt=0, description="Larger files are skipped")
    acl_file_name: str = Field(default="acl.yaml", description="ACL file looked for at the root")
